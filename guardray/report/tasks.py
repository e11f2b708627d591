"""The report's Ray work, each function run as one task where the data is: score every row with one scorer
(a refit probe applied to its feature column, or a guard column), write every row's labels, merge those files
into `scores.parquet`, and compute one scorer's metrics for one target from three columns of it.

The driver holds metrics only: no task returns rows, each writes its own files whole (safe to retry).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from guardray.columns import (HISTORY_TURNS, ID, N_TOKENS, PERSONA, SOURCE, SPLIT, Target, batch_matrix, feature_schema,
                              scan_batches)
from guardray.errors import StageError
from guardray.held_out import figures_fixed_on, held_out_figures, operating_points
from guardray.evaluate import (at_threshold, by_source, fpr_at_recall, length_buckets, score_metrics,
                               threshold_for_recall, threshold_sweep)
from guardray.probes import artifact
from guardray.probes.registry import PROBE_TYPES
from guardray.jobspec import JobSpec
from guardray.storage import Location
from guardray.telemetry import peak_rss_mb

SCORES_FILE, SCORES_DIR, LABELS_FILE = "scores.parquet", "scores", "labels.parquet"
META = [ID, SPLIT, SOURCE]
MERGE_BATCH_ROWS = 65536


@dataclass(frozen=True)
class Scorer:
    """One score to evaluate: a refit probe applied to its feature column, or a column that is a score already."""

    name: str  # a probe's `<target>/<feature>-<type>`, or the guard column's own name
    column: str  # the feature column a probe reads, or the score column itself
    threshold: float
    artifact: Location | None = None  # None: `column` holds the score
    id: dict[str, Any] | None = None  # the probe's structured identity (with its target)
    allow_pickle: bool = False  # only a non-linear type that this job's own grid asked for


def scorers(spec: JobSpec, probes: Location, guards: Sequence[str]) -> list[Scorer]:
    """Every refit probe of the probes stage, then each guard column some target is compared with (once)."""
    summary = probes.join("summary.json").read_json()
    # Choosing a non-linear type in the spec's grid is the opt-in to its pickled artifact; a pickle that turns
    # up for any other type (a planted or swapped artifact) is refused by `artifact.load`.
    pickled = {g.type for g in spec.probes.grid if g.type in PROBE_TYPES and not PROBE_TYPES[g.type].linear}
    found = [Scorer(p["name"], p["id"]["feature"], spec.evaluate.probe_threshold,
                    probes.join("artifacts", p["name"]), p["id"], p["id"].get("type") in pickled)
             for p in summary["probes"]]
    left_out = [Scorer(e["name"], e["feature"], spec.evaluate.probe_threshold, probes.join("artifacts", e["name"]),
                       None, e["type"] in pickled) for e in summary.get("leave_one_source_out", []) if e["name"]]
    return found + left_out + [Scorer(g, g, spec.evaluate.guard_threshold) for g in dict.fromkeys(guards)]


# -------------------------------------------------------------------------------------------- scores
def score_one(features: Location, out: Location, scorer: Scorer, index: int) -> None:
    """Runs on a worker: score every row of the parts, batch by batch, streaming (id, score) to scores/<index>;
    the features of a batch are dropped once scored."""
    schema = pa.schema([("id", pa.string()), ("score", pa.float64())])
    probe = artifact.load(scorer.artifact, allow_pickle=scorer.allow_pickle) if scorer.artifact else None

    def write(f: Any) -> None:
        with pq.ParquetWriter(f, schema) as writer:
            for batch in scan_batches(features, {"id": pc.field("id"), scorer.column: pc.field(scorer.column)}):
                score = probe_scores(probe, batch, scorer.column) if probe else known(batch.column(scorer.column))
                writer.write_table(pa.table({"id": batch.column("id").cast(pa.string()), "score": score},
                                            schema=schema))

    out.join(SCORES_DIR, f"{index:05d}.parquet").write_with(write)


def probe_scores(probe: Any, batch: pa.RecordBatch, column: str) -> pa.Array:
    """The probe's score of each row; null where the row has no features (a response pooling on a row without
    a reply), so the metrics leave it out like an unknown label."""
    valid = batch.column(column).is_valid()
    if valid.false_count == 0:
        return pa.array(probe.score(batch_matrix(batch, column)), pa.float64())
    scored = iter(probe.score(batch_matrix(batch.filter(valid), column)).tolist()) if valid.true_count else iter(())
    return pa.array([next(scored) if ok else None for ok in valid.to_pylist()], pa.float64())


def known(scores: pa.Array) -> pa.Array:
    """A guard score column as float64 with NaN (a row the guard did not judge: no reply) turned into null."""
    values = scores.cast(pa.float64())
    return pc.if_else(pc.is_nan(values), pa.scalar(None, pa.float64()), values)


def write_labels(features: Location, out: Location, resolved: Sequence[Target]) -> None:
    """Runs on a worker: every row's id, split, source and each target's label (null where unknown), computed in
    the scan by the same expressions the probes trained on, streamed to scores/labels.parquet."""
    context = [f for f in feature_schema(features) if f.name in (HISTORY_TURNS, PERSONA)]  # conversation rows
    projection = {**{c: pc.field(c) for c in META}, N_TOKENS: pc.field(N_TOKENS),
                  **{f.name: pc.field(f.name) for f in context}, **{t.name: t.expression for t in resolved}}
    schema = pa.schema([*(pa.field(c, pa.string()) for c in META), pa.field(N_TOKENS, pa.int32()), *context,
                        *(pa.field(t.name, pa.bool_()) for t in resolved)])

    def write(f: Any) -> None:
        with pq.ParquetWriter(f, schema) as writer:
            for batch in scan_batches(features, projection):
                writer.write_table(pa.Table.from_batches([batch]).cast(schema))

    out.join(SCORES_DIR, LABELS_FILE).write_with(write)


def merge_scores(out: Location, names: list[str]) -> None:
    """scores/labels.parquet + scores/<i>.parquet → one scores.parquet (id, split, source, n_tokens, a label column
    per target, a score column per scorer), a batch at a time; the files are row-aligned (same parts, same order),
    which is checked on the ids."""
    out.join(SCORES_DIR).refresh()  # written by other workers: no stale listing cache (gcsfs)
    files = {LABELS_FILE: out.join(SCORES_DIR, LABELS_FILE),
             **{n: out.join(SCORES_DIR, f"{i:05d}.parquet") for i, n in enumerate(names)}}
    with contextlib.ExitStack() as stack:
        readers = {n: pq.ParquetFile(stack.enter_context(f.fs.open_input_file(f.path))) for n, f in files.items()}
        counts = {n: r.metadata.num_rows for n, r in readers.items()}
        if len(set(counts.values())) > 1:
            raise StageError(f"report: the scorers scored different rows: {counts}")
        labels = readers[LABELS_FILE].schema_arrow
        kept = labels.names  # id, split, source, n_tokens, a conversation's context, the labels
        schema = pa.schema([*labels,
                            *(pa.field(n, pa.float64()) for n in names)])

        def write(f: Any) -> None:
            batches = {n: r.iter_batches(batch_size=MERGE_BATCH_ROWS) for n, r in readers.items()}
            with pq.ParquetWriter(f, schema) as writer:
                for head in batches[LABELS_FILE]:
                    columns = {c: head.column(c) for c in kept}
                    for n in names:
                        batch = next(batches[n])
                        if not batch.column("id").equals(head.column("id")):
                            raise StageError(f"report: the scores of {n} are not row-aligned with the labels")
                        columns[n] = batch.column("score")
                    writer.write_table(pa.table(columns, schema=schema))

        out.join(SCORES_FILE).write_with(write)
    out.join(SCORES_DIR).delete()


def read_scores(stage: Location, target: str, scorers: Sequence[str], split: str | None = "test",
                extra: Sequence[str] = ()) -> pd.DataFrame:
    """`label` (= the target) and the given score columns of the rows where the target and those scores are
    known (of `split`, when given), read from scores.parquet (nothing else)."""
    location = stage.join(SCORES_FILE)
    location.refresh()
    where = pc.field(target).is_valid()
    for s in scorers:
        where &= pc.field(s).is_valid()
    if split is not None:
        where &= pc.field("split") == split
    dataset = pads.dataset(location.path, filesystem=location.fs, format="parquet")
    columns = {"label": pc.field(target), **{c: pc.field(c) for c in [*scorers, *extra]}}
    return dataset.to_table(columns=columns, filter=where).to_pandas()


# ------------------------------------------------------------------------------------------- metrics
def evaluate_scorer(spec: JobSpec, out: Location, target: str, scorer: str, threshold: float) -> dict[str, Any]:
    """Runs on a worker: one scorer's metrics for one target, on the rows where that target is known. Rows of a
    held-out source are left out: their figures are the held-out table's (`evaluate_held_out`)."""
    rows = read_scores(out, target, [scorer], split=None, extra=["split", "source", N_TOKENS])
    split = np.where(rows["source"].isin(held_out_sources(spec)), "held_out", rows["split"].to_numpy(object))
    y, scores = rows["label"].to_numpy(bool), rows[scorer].to_numpy(np.float64)
    metrics = scorer_metrics(spec, f"{target}:{scorer}", threshold, y, scores, split, rows["source"].to_numpy(object))
    test = split == "test"
    buckets = length_buckets(rows[N_TOKENS].to_numpy(np.int64)[test])
    return {**metrics, "by_length": by_group(y[test], scores[test], buckets, threshold, spec),
            **by_context(spec, out, target, scorer, threshold), "peak_rss_mb": peak_rss_mb()}


def by_group(y: np.ndarray, scores: np.ndarray, groups: np.ndarray, threshold: float,
             spec: JobSpec) -> dict[str, dict[str, Any]]:
    """`by_source`'s metrics per group of in-distribution test rows, plus the share of each group's positives
    (`detection_at_1pct_fpr`) and negatives (`fpr_at_1pct_fpr`) at the scorer's 1% FPR point fixed on all of
    these rows: a fixed operating point, as a deployment has, rather than a default threshold that a guard's
    scale may never reach."""
    point = operating_points(y, scores)["at_1pct_fpr"]
    found = by_source(y, scores, groups, threshold, spec.evaluate)
    for group, metrics in found.items():
        rows = groups == group
        flagged = scores[rows] >= point if point is not None else None
        metrics["detection_at_1pct_fpr"] = (float(flagged[y[rows]].mean())
                                            if flagged is not None and y[rows].any() else None)
        metrics["fpr_at_1pct_fpr"] = (float(flagged[~y[rows]].mean())
                                      if flagged is not None and not y[rows].all() else None)
    return found


def by_context(spec: JobSpec, out: Location, target: str, scorer: str, threshold: float) -> dict[str, Any]:
    """With conversation rows: the in-distribution test rows' metrics (recall = the detection rate of harmful
    last turns) by how many turns came before the last user turn (0, 1-2, 3+) and by whether a persona was
    there: `by_history` and `by_persona`. Empty without conversation rows."""
    names = pads.dataset(out.join(SCORES_FILE).path, filesystem=out.fs, format="parquet").schema.names
    if HISTORY_TURNS not in names:
        return {}
    rows = read_scores(out, target, [scorer], split="test", extra=["source", HISTORY_TURNS, PERSONA])
    rows = rows[~rows["source"].isin(held_out_sources(spec))]
    y, scores = rows["label"].to_numpy(bool), rows[scorer].to_numpy(np.float64)
    turns = rows[HISTORY_TURNS].to_numpy(np.int64)
    history = np.where(turns == 0, "0 turns", np.where(turns <= 2, "1-2 turns", "3+ turns")).astype(object)
    persona = np.where(rows[PERSONA].to_numpy(bool), "persona", "no persona").astype(object)
    return {"by_history": by_group(y, scores, history, threshold, spec),
            "by_persona": by_group(y, scores, persona, threshold, spec)}


def held_out_sources(spec: JobSpec) -> list[str]:
    """The sources the probes never train on (`split: test`): out of the in-distribution figures."""
    return [s.source_name for s in spec.dataset.sources if s.held_out]


def evaluate_held_out(spec: JobSpec, out: Location, target: str, scorer: str, held: list[str]) -> dict[str, Any]:
    """Runs on a worker: one scorer's figures on the held-out sources (`guardray.held_out`), at thresholds fixed
    on the in-distribution test rows of this target."""
    rows = read_scores(out, target, [scorer], split="test", extra=["source"])
    return held_out_figures(rows["label"].to_numpy(bool), rows[scorer].to_numpy(np.float64),
                            rows["source"].to_numpy(object), held, spec.evaluate.bootstrap, spec.evaluate.seed)


def evaluate_left_out(spec: JobSpec, out: Location, target: str, probe: str, guard: str | None,
                      entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs on a worker: per left-out source S of this target (`evaluate.leave_one_source_out`), S's test rows
    scored by the headline probe (which trained on S; thresholds fixed on every in-distribution test row), by
    the probe fitted without S and by the guard (thresholds of both fixed on the in-distribution test rows of
    the other sources: what a deployment that never saw S would have chosen)."""
    fitted = [e for e in entries if e["name"]]
    rows = read_scores(out, target, [probe, *([guard] if guard else []), *(e["name"] for e in fitted)],
                       split="test", extra=["source"])
    y, sources = rows["label"].to_numpy(bool), rows["source"].to_numpy(object)
    inside = ~np.isin(sources, held_out_sources(spec))
    ev = spec.evaluate
    found: dict[str, Any] = {}
    for e in entries:
        on, others = sources == e["source"], inside & (sources != e["source"])
        record = {"train_rows": e["train_rows"], "train_sources": e["train_sources"]}
        if not e["name"]:
            found[e["source"]] = {**record, "skipped": e["skipped"]}
            continue
        found[e["source"]] = {
            **record, "probe": figures_fixed_on(inside, on, y, rows[probe], ev.bootstrap, ev.seed),
            "left_out_probe": figures_fixed_on(others, on, y, rows[e["name"]], ev.bootstrap, ev.seed),
            **({"guard": figures_fixed_on(others, on, y, rows[guard], ev.bootstrap, ev.seed)} if guard else {})}
    return found


def scorer_metrics(spec: JobSpec, name: str, t: float, y: np.ndarray, scores: np.ndarray, split: np.ndarray,
                   sources: np.ndarray) -> dict[str, Any]:
    """test / train metrics, per source and the threshold sweep of one scorer."""
    ev = spec.evaluate
    test, train = split == "test", split == "train"
    if not test.any():
        return {"test": None, "train": None, "by_source": {}, "sweep": []}
    return {
        "test": score_metrics(y[test], scores[test], t, ev, name=f"{name} test"),
        "train": (score_metrics(y[train], scores[train], t, ev.model_copy(update={"bootstrap": 0}),
                                name=f"{name} train") if train.any() else None),
        "by_source": by_source(y[test], scores[test], sources[test], t, ev),
        "sweep": threshold_sweep(y[test], scores[test], ev.sweep),
    }


def compare(stage: Location, target: str, probe: str, guard: str, probe_threshold: float,
            guard_threshold: float, held: Sequence[str] = ()) -> dict[str, Any]:
    """Probe vs guard at default thresholds and with the guard matched to the probe's recall (the test split's
    in-distribution rows: not those of the `held` sources)."""
    test = read_scores(stage, target, [probe, guard], extra=["source"])
    test = test[~test["source"].isin(list(held))]
    y, probe_scores, guard_scores = test["label"].to_numpy(bool), test[probe].to_numpy(), test[guard].to_numpy()
    if not len(y):
        return {"probe": probe, "guard": guard, "matched_guard_threshold": None, "guard_at_matched": None,
                "fpr_at_99_recall": {"probe": None, "guard": None, "guard_over_probe": None}}
    probe_at = at_threshold(y, probe_scores, probe_threshold)
    matched = threshold_for_recall(y, guard_scores, probe_at["recall"])
    probe_fpr = fpr_at_recall(y, probe_scores, 0.99)
    guard_fpr = fpr_at_recall(y, guard_scores, 0.99)
    return {
        "probe": probe, "guard": guard,
        "matched_guard_threshold": matched,
        "guard_at_matched": at_threshold(y, guard_scores, matched) if matched is not None else None,
        "fpr_at_99_recall": {"probe": probe_fpr, "guard": guard_fpr,
                             "guard_over_probe": (guard_fpr / probe_fpr) if probe_fpr else None},
    }
