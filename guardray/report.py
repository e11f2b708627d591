"""The report stage: score every row with every refit probe and the guard scores, compare per target, render.

Writes `scores.parquet` (one row per features row: id, split, source, one nullable label column per target, one
score column per scorer), `report.json` (all metrics; `targets: {name: section}`), `report.md`, PNG plots (per
target under `<target>/`, and `auc_by_target.png`) and, when the responses were judged, `mined_prompts.parquet`.
`guardray report` re-renders the markdown and plots from `report.json` + `scores.parquet` without recomputing.

Each target has a section: its best probe (by CV) against its matching guard score (`targets.guard_column`), on
the test rows where that target's label is known. For a feedback target (`response_unsafe`, `slipped_through`)
the guard is the INPUT guard: the section answers "from the prompt's activations, before any token is
generated, how well does a probe predict the label, compared with the input guard's score?".

Work goes where the data is. One Ray task per scorer streams its own column, keeps the scores and drops the
features, and writes `scores/<i>.parquet`; one task writes every row's labels (computed in the scan); one task
merges those files a batch at a time into `scores.parquet`; one task per (target, scorer) reads three columns of
it and computes the metrics. The driver holds metrics only.
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from guardray import targets
from guardray.columns import (GUARD_RESPONSE_SCORE, GUARD_SCORE, ID, PROMPT, RESPONSE, SOURCE, SPLIT, Target,
                              batch_matrix, feature_schema, require, scan_batches)
from guardray.errors import InputError, StageError, ray_get
from guardray.evaluate import (at_threshold, by_source, fpr_at_recall, score_metrics, threshold_for_recall,
                               threshold_sweep)
from guardray.metrics import peak_rss_mb
from guardray.probes import artifact
from guardray.probes.torch_probe import TORCH_PROBE_TYPE
from guardray.spec import JobSpec
from guardray.storage import Location

log = logging.getLogger(__name__)
SCORES_FILE, SCORES_DIR, LABELS_FILE = "scores.parquet", "scores", "labels.parquet"
MINED_FILE, SUMMARY_PLOT = "mined_prompts.parquet", "auc_by_target.png"
MINED_SCHEMA = pa.schema([(ID, pa.string()), (SOURCE, pa.string()), (SPLIT, pa.string()),
                          (GUARD_SCORE, pa.float64()), (GUARD_RESPONSE_SCORE, pa.float64()),
                          ("slipped_through", pa.bool_())])
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


@dataclass(frozen=True)
class Plan:
    """What one target's section compares: its probes, its best probe, its guard score (or none) and why."""

    target: Target
    probes: tuple[str, ...]
    best_probe: str
    guard: str | None
    guard_note: str | None


# ------------------------------------------------------------------------------------------------ plan
def plan_targets(spec: JobSpec, summary: dict[str, Any], schema: pa.Schema) -> dict[str, Plan]:
    """Per target (from the probes' summary): its probes, best probe and matching guard column (schema only)."""
    names = summary.get("targets") or [summary["best"]["id"].get("target", spec.probes.all_targets[0])]
    resolved = targets.resolve_all(names, schema, spec.feedback)
    best = summary.get("best_by_target") or {names[0]: summary["best"]}
    plans = {}
    for name, target in resolved.items():
        probes = tuple(p["name"] for p in summary["probes"] if p["id"].get("target", names[0]) == name)
        guard, note = (targets.guard_column(spec, name, schema.names) if spec.guard.enabled else (None, None))
        if guard is not None and guard not in schema.names:
            guard, note = None, f"{guard} is not in the features: no guard comparison"
        plans[name] = Plan(target, probes, best[name]["name"], guard, note)
    return plans


def scorers(spec: JobSpec, probes: Location, plans: dict[str, Plan]) -> list[Scorer]:
    """Every refit probe, then each guard column some target is compared with (once, whatever the targets)."""
    summary = probes.join("summary.json").read_json()
    from guardray.probes.registry import PROBE_TYPES

    # Choosing a non-linear type in the spec's grid is the opt-in to its pickled artifact; a pickle that turns
    # up for any other type (a planted or swapped artifact) is refused by `artifact.load`.
    pickled = {g.type for g in spec.probes.grid if g.type in PROBE_TYPES and not PROBE_TYPES[g.type].linear}
    found = [Scorer(p["name"], p["id"]["feature"], spec.evaluate.probe_threshold,
                    probes.join("artifacts", p["name"]), p["id"], p["id"].get("type") in pickled)
             for p in summary["probes"]]
    guards = dict.fromkeys(p.guard for p in plans.values() if p.guard)
    return found + [Scorer(g, g, spec.evaluate.guard_threshold) for g in guards]


# ------------------------------------------------------------------------------------------------- run
def run_report(spec: JobSpec, inputs: dict[str, Location], out: Location) -> dict[str, Any]:
    import ray

    features, probes = inputs["features"], inputs["probes"]
    summary = probes.join("summary.json").read_json()
    schema = feature_schema(features)
    plans = plan_targets(spec, summary, schema)
    found = scorers(spec, probes, plans)
    require(schema, [*META, *(s.column for s in found)], stage="report", where=features.uri, written_by="features")
    remote = ray.remote(num_cpus=1, max_retries=1)  # each task rewrites its own files whole: safe to retry
    ray_get([remote(write_labels).remote(features, out, [p.target for p in plans.values()]),
             *(remote(score_one).remote(features, out, s, i) for i, s in enumerate(found))])
    ray_get(remote(merge_scores).remote(out, [s.name for s in found], list(plans)))
    pairs = [(t, s) for t, p in plans.items() for s in (*p.probes, *([p.guard] if p.guard else []))]
    thresholds = {s.name: s.threshold for s in found}
    entries = ray_get([remote(evaluate_scorer).remote(spec, out, t, s, thresholds[s]) for t, s in pairs])
    by_target: dict[str, dict[str, Any]] = {t: {} for t in plans}
    for (t, s), entry in zip(pairs, entries):
        by_target[t][s] = entry
    cv = pd.read_csv(io.StringIO(probes.join("cv_results.csv").read_text()))
    sections = {t: build_section(spec, plans[t], by_target[t], cv, found) for t in plans}
    comparisons = ray_get([remote(compare).remote(out, t, s["best_probe"], s["guard_scorer"],
                                                  spec.evaluate.probe_threshold, spec.evaluate.guard_threshold)
                           for t, s in sections.items() if s["guard_scorer"]])
    for section, comparison in zip([s for s in sections.values() if s["guard_scorer"]], comparisons):
        section["comparison"] = comparison
    for section in sections.values():
        section["comparison_table"] = comparison_markdown(section)
        section["answer"] = answer(section)
    report = assemble(spec, sections)
    report["mined_prompts"] = _mine(spec, inputs, out, schema, sections, remote)
    out.join("report.json").write_json(report)
    if spec.evaluate.plots:
        ray_get(remote(render).remote(report, out))
    else:
        out.join("report.md").write_text(markdown(report, {}))
    for section in sections.values():
        print(f"{section['target']}:\n{section['comparison_table']}")
    return {"probes": sum(len(s["probes"]) for s in sections.values()), "test_rows": report["test_rows"],
            "best_probe": report["best_probe"], "targets": list(sections),
            "task_peak_rss_mb": max((t["peak_rss_mb"] or 0) for t in report["tasks"].values())}


def assemble(spec: JobSpec, sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """report.json: `targets` holds every section; the first target's section is also spread at the top level
    (best_probe, probes, guard, comparison, ...) as the single-target report had it."""
    first = next(iter(sections.values()))
    tasks = {f"{t}:{name}": {"peak_rss_mb": entry.pop("peak_rss_mb", None)}
             for t, s in sections.items() for name, entry in [*s["probes"].items(), *_guard_items(s)]}
    # report.json is written with sorted keys: `target_order` keeps the spec's order of the sections
    return {**first, "job": spec.name, "targets": sections, "target_order": list(sections), "tasks": tasks,
            "scorers": list(dict.fromkeys(n for s in sections.values() for n in [*s["probes"], s["guard_scorer"]] if n))}


def _guard_items(section: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(section["guard_scorer"], section["guard"])] if "guard" in section else []


# -------------------------------------------------------------------------------------- scoring tasks
def score_one(features: Location, out: Location, scorer: Scorer, index: int) -> None:
    """Runs on a worker: score every row of the parts, batch by batch, streaming (id, score) to scores/<index>;
    the features of a batch are dropped once scored."""
    schema = pa.schema([(ID, pa.string()), ("score", pa.float64())])
    with tempfile.TemporaryDirectory() as tmp:
        probe = (artifact.load(_download(scorer.artifact, Path(tmp)), allow_pickle=scorer.allow_pickle)
                 if scorer.artifact else None)

        def write(f: Any) -> None:
            with pq.ParquetWriter(f, schema) as writer:
                for batch in scan_batches(features, {ID: pc.field(ID), scorer.column: pc.field(scorer.column)}):
                    column = batch.column(scorer.column)
                    score = (pa.array(probe.score(batch_matrix(batch, scorer.column)), pa.float64()) if probe
                             else column.cast(pa.float64()))
                    writer.write_table(pa.table({ID: batch.column(ID).cast(pa.string()), "score": score},
                                                schema=schema))

        out.join(SCORES_DIR, f"{index:05d}.parquet").write_with(write)


def write_labels(features: Location, out: Location, resolved: Sequence[Target]) -> None:
    """Runs on a worker: every row's id, split, source and each target's label (null where unknown), computed in
    the scan by the same expressions the probes trained on, streamed to scores/labels.parquet."""
    projection = {**{c: pc.field(c) for c in META}, **{t.name: t.expression for t in resolved}}
    schema = pa.schema([*(pa.field(c, pa.string()) for c in META), *(pa.field(t.name, pa.bool_()) for t in resolved)])

    def write(f: Any) -> None:
        with pq.ParquetWriter(f, schema) as writer:
            for batch in scan_batches(features, projection):
                writer.write_table(pa.Table.from_batches([batch]).cast(schema))

    out.join(SCORES_DIR, LABELS_FILE).write_with(write)


def merge_scores(out: Location, names: list[str], label_columns: list[str]) -> None:
    """scores/labels.parquet + scores/<i>.parquet → one scores.parquet (id, split, source, a label column per
    target, a score column per scorer), a batch at a time; the files are row-aligned (same parts, same order),
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
        schema = pa.schema([*(labels.field(c) for c in [*META, *label_columns]),
                            *(pa.field(n, pa.float64()) for n in names)])

        def write(f: Any) -> None:
            batches = {n: r.iter_batches(batch_size=MERGE_BATCH_ROWS) for n, r in readers.items()}
            with pq.ParquetWriter(f, schema) as writer:
                for head in batches[LABELS_FILE]:
                    columns = {c: head.column(c) for c in [*META, *label_columns]}
                    for n in names:
                        batch = next(batches[n])
                        if not batch.column(ID).equals(head.column(ID)):
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
        where &= pc.field(SPLIT) == split
    dataset = pads.dataset(location.path, filesystem=location.fs, format="parquet")
    columns = {"label": pc.field(target), **{c: pc.field(c) for c in [*scorers, *extra]}}
    return dataset.to_table(columns=columns, filter=where).to_pandas()


def evaluate_scorer(spec: JobSpec, out: Location, target: str, scorer: str, threshold: float) -> dict[str, Any]:
    """Runs on a worker: one scorer's metrics for one target, on the rows where that target is known."""
    rows = read_scores(out, target, [scorer], split=None, extra=[SPLIT, SOURCE])
    return {**scorer_metrics(spec, f"{target}:{scorer}", threshold, rows["label"].to_numpy(bool),
                             rows[scorer].to_numpy(np.float64), rows[SPLIT].to_numpy(object),
                             rows[SOURCE].to_numpy(object)),
            "peak_rss_mb": peak_rss_mb()}


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
            guard_threshold: float) -> dict[str, Any]:
    """Probe vs guard at default thresholds and with the guard matched to the probe's recall (test split)."""
    test = read_scores(stage, target, [probe, guard])
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


def _download(location: Location, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in location.list():
        (target / name).write_bytes(location.join(name).read_bytes())
    return target


# ---------------------------------------------------------------------------------------- mined prompts
def _mine(spec: JobSpec, inputs: dict[str, Location], out: Location, schema: pa.Schema,
          sections: dict[str, dict[str, Any]], remote: Any) -> dict[str, Any] | None:
    """mined_prompts.parquet when the responses were judged and the responses stage is an input."""
    if GUARD_RESPONSE_SCORE not in schema.names:
        return None
    if "responses" not in inputs:
        return {"skipped": "no responses stage among the report's inputs"}
    probe = sections["response_unsafe"]["best_probe"] if "response_unsafe" in sections else None
    return ray_get(remote(mine_prompts).remote(spec, inputs["features"], inputs["responses"], out, probe))


def mine_prompts(spec: JobSpec, features: Location, responses: Location, out: Location,
                 probe: str | None) -> dict[str, Any]:
    """Runs on a worker: the rows whose response the guard flags (`response_unsafe`), with `slipped_through`,
    the guard scores, the prompt and response text (joined by id from the responses stage) and the best
    response_unsafe probe's score. Each input is scanned with a pushed-down filter (the label, then the ids),
    so only the mined rows are held."""
    schema = feature_schema(features)
    unsafe = targets.resolve("response_unsafe", schema, spec.feedback)
    has_guard = GUARD_SCORE in schema.names  # the response guard without the input guard: no slipped_through
    slipped = (targets.resolve("slipped_through", schema, spec.feedback).expression if has_guard
               else pc.scalar(pa.scalar(None, pa.bool_())))
    guard = pc.field(GUARD_SCORE).cast(pa.float64()) if has_guard else pc.scalar(pa.scalar(None, pa.float64()))
    projection = {ID: pc.field(ID), SOURCE: pc.field(SOURCE), SPLIT: pc.field(SPLIT),
                  GUARD_SCORE: guard, GUARD_RESPONSE_SCORE: pc.field(GUARD_RESPONSE_SCORE).cast(pa.float64()),
                  "slipped_through": slipped}
    mined = pa.Table.from_batches(list(scan_batches(features, projection, unsafe.expression)),
                                  schema=MINED_SCHEMA)
    mined = mined.append_column("order", pa.array(np.arange(mined.num_rows), pa.int64()))
    ids = mined.column(ID)
    texts = _by_id(responses.join("dataset.parquet"), [PROMPT, RESPONSE], ids, written_by="responses")
    table = mined.join(texts, ID, join_type="left outer")
    if probe is not None:
        scores = _by_id(out.join(SCORES_FILE), [probe], ids, written_by="report").rename_columns([ID, "probe_score"])
        table = table.join(scores, ID, join_type="left outer")
    table = table.sort_by("order").drop_columns(["order"])
    order = [ID, SOURCE, SPLIT, PROMPT, RESPONSE, GUARD_SCORE, GUARD_RESPONSE_SCORE,
             "slipped_through", *(["probe_score"] if probe is not None else [])]
    out.join(MINED_FILE).write_table(table.select(order))
    return {"file": MINED_FILE, "rows": table.num_rows,
            "slipped_through": int(pc.sum(table.column("slipped_through").cast(pa.int64())).as_py() or 0),
            "probe": probe, "response_threshold": spec.feedback.response_threshold,
            "input_threshold": spec.feedback.input_threshold}


def _by_id(location: Location, columns: list[str], ids: pa.ChunkedArray, written_by: str) -> pa.Table:
    """`id` and `columns` of the rows of a parquet file (or directory) whose id is among `ids` (a pushed-down
    filter: only those rows are decoded into the result)."""
    location.refresh()
    dataset = pads.dataset(location.path, filesystem=location.fs, format="parquet")
    require(dataset.schema, [ID, *columns], stage="report", where=location.uri, written_by=written_by)
    batches = dataset.to_batches(columns=[ID, *columns], filter=pc.field(ID).isin(ids.combine_chunks()),
                                 batch_readahead=2, fragment_readahead=1)
    return pa.Table.from_batches(list(batches), schema=pa.schema([dataset.schema.field(c) for c in [ID, *columns]]))


# -------------------------------------------------------------------------------------- report sections
def build_section(spec: JobSpec, plan: Plan, entries: dict[str, dict[str, Any]], cv: pd.DataFrame,
                  found: list[Scorer]) -> dict[str, Any]:
    """One target's part of the report, from its scorers' metrics: small, built on the driver."""
    selection = f"{spec.probes.cv.metric}_mean"
    name = plan.target.name
    cv = cv[cv["target"] == name] if "target" in cv else cv
    ranked = cv.sort_values(selection, ascending=False, kind="stable")
    probes = {n: {**entries[n], "id": next(s.id for s in found if s.name == n)} for n in plan.probes}
    best = probes[plan.best_probe]["test"]
    section: dict[str, Any] = {
        "target": name, "feedback": plan.target.derived, "best_probe": plan.best_probe,
        "guard_scorer": plan.guard, "guard_note": plan.guard_note,
        "test_rows": best["count"] if best else 0, "probes": probes,
        "cv_leaderboard": ranked.head(15).to_dict(orient="records"),
        "cv_best_by_feature": ranked.groupby("feature", sort=False).head(1).set_index("feature")[selection].to_dict(),
    }
    if plan.guard:
        section["guard"] = entries[plan.guard]
    return section


def _auc(entry: dict[str, Any] | None) -> tuple[float | None, list[float] | None]:
    test = (entry or {}).get("test") or {}
    return test.get("roc_auc"), (test.get("ci95") or {}).get("roc_auc")


def _auc_text(entry: dict[str, Any] | None) -> str:
    """ROC AUC, precision at 99% recall and recall at 1% FPR, with the bootstrap CIs there are."""
    auc, ci = _auc(entry)
    test = (entry or {}).get("test") or {}
    ci95 = test.get("ci95") or {}

    def interval(bounds: list[float] | None) -> str:
        return f" (95% CI {_fmt(bounds[0])}–{_fmt(bounds[1])})" if bounds else ""

    precision = (test.get("precision_at_recall") or {}).get("0.99")
    recall = (test.get("recall_at_fpr") or {}).get("0.01")
    return (f"ROC AUC {_fmt(auc)}{interval(ci)}, precision at 99% recall {_fmt(precision)}"
            f"{interval(ci95.get('precision@0.99'))}, recall at 1% FPR {_fmt(recall)}")


def answer(section: dict[str, Any]) -> str:
    """The section's headline sentence: the probe against the matching guard score, with CIs."""
    target, probe = section["target"], section["probes"][section["best_probe"]]
    test = probe["test"] or {"count": 0, "n_true": 0}
    rows = f"{test['count']} held-out prompts with a known `{target}` label ({test['n_true']} positive)"
    if section["feedback"]:
        head = (f"From the prompt's activations, before any token is generated, the best probe "
                f"`{section['best_probe']}` predicts `{target}` with test {_auc_text(probe)}")
        guard_words = f"the input guard's score (`{section['guard_scorer']}`) for the same target"
    else:
        head = f"The best probe `{section['best_probe']}` predicts `{target}` with test {_auc_text(probe)}"
        guard_words = f"the guard's score (`{section['guard_scorer']}`)"
    if not section["guard_scorer"]:
        return f"{head}, on {rows}; no guard score to compare with."
    sentence = f"{head}; {guard_words} gives {_auc_text(section['guard'])} on the same {rows}."
    (p, _), (g, _) = _auc(probe), _auc(section["guard"])
    if p is not None and g is not None:
        sentence += f" Probe minus guard: {p - g:+.3f}."
    return sentence


def _fmt(value: Any, digits: int = 3) -> str:
    return "–" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def comparison_markdown(section: dict[str, Any]) -> str:
    """The headline table of one target: best probe (and the torch probe, when trained) vs its guard score."""
    rows = [("probe " + section["best_probe"], section["probes"][section["best_probe"]]["test"])]
    rows += [("probe " + name, entry["test"]) for name, entry in section["probes"].items()
             if entry["id"]["type"] == TORCH_PROBE_TYPE]
    if "guard" in section:
        guard = section["guard_scorer"]
        rows.append(("guard" if guard == GUARD_SCORE else f"guard {guard}", section["guard"]["test"]))
    lines = ["| scorer | threshold | accuracy | precision | recall | precision@0.99 | ROC AUC | ROC AUC 95% CI | "
             "AP | recall@1% FPR |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in rows:
        if m is None:
            lines.append(f"| {name} | – | – | – | – | – | – | – | – | – |")
            continue
        ci = (m.get("ci95") or {}).get("roc_auc")
        lines.append(f"| {name} | {_fmt(m['threshold'], 2)} | {_fmt(m['accuracy'])} | {_fmt(m['precision'])} | "
                     f"{_fmt(m['recall'])} | {_fmt(m['precision_at_recall'].get('0.99'))} | {_fmt(m['roc_auc'])} | "
                     f"{f'{_fmt(ci[0])}–{_fmt(ci[1])}' if ci else '–'} | {_fmt(m['average_precision'])} | "
                     f"{_fmt(m['recall_at_fpr'].get('0.01'))} |")
    comparison = section.get("comparison")
    if comparison and comparison["guard_at_matched"]:
        g = comparison["guard_at_matched"]
        lines.append(f"| guard (matched recall) | {_fmt(g['threshold'], 2)} | {_fmt(g['accuracy'])} | "
                     f"{_fmt(g['precision'])} | {_fmt(g['recall'])} | – | – | – | – | – |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- rendering
def render(report: dict[str, Any], out: Location) -> None:
    """report.md and the PNG plots, from the report dict and the test split's scores of the plotted scorers."""
    plots: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, section in _ordered(report):
            plotted = [section["best_probe"], *([section["guard_scorer"]] if section["guard_scorer"] else [])]
            plots[name] = [str(p.relative_to(tmp)) for p in
                           make_plots(section, read_scores(out, name, plotted), Path(tmp) / name)]
        plots[""] = [str(summary_plot(report, Path(tmp) / SUMMARY_PLOT).relative_to(tmp))]
        for files in plots.values():
            for relative in files:
                out.join(relative).write_bytes((Path(tmp) / relative).read_bytes())
    out.join("report.md").write_text(markdown(report, plots))


def markdown(report: dict[str, Any], plots: dict[str, list[str]]) -> str:
    sections = _ordered(report)
    parts = [f"# guardray report: {report['job']}", "", f"Targets: {', '.join(f'`{t}`' for t, _ in sections)}.", ""]
    parts += [f"- **{t}**: {s['answer']}" + (f" *Note: {s['guard_note']}.*" if s["guard_note"] else "")
              for t, s in sections]
    parts += [""] + [f"![{p}]({p})" for p in plots.get("", [])] + [""]
    mined = report.get("mined_prompts")
    if mined and "rows" in mined:
        parts += [f"Mined prompts: {mined['rows']} rows whose response the guard flags (guard_response_score > "
                  f"{mined['response_threshold']:g}), {mined['slipped_through']} of them slipped through the input "
                  f"guard (guard_score <= {mined['input_threshold']:g}): `{mined['file']}`.", ""]
    elif mined:
        parts += [f"Mined prompts: skipped ({mined['skipped']}).", ""]
    for name, section in sections:
        parts += section_markdown(section, plots.get(name, []))
    return "\n".join(parts) + "\n"


def section_markdown(section: dict[str, Any], plots: list[str]) -> list[str]:
    """Today's single-target report, one heading level down, for one target."""
    parts = [f"## Target `{section['target']}`", "", section["answer"], ""]
    if section["guard_note"]:
        parts += [f"Note: {section['guard_note']}.", ""]
    parts += [f"{section['test_rows']} held-out rows with a known label. Best probe by CV: `{section['best_probe']}`.",
              "", "### Probe vs guard (test split)", "", section["comparison_table"], ""]
    comparison = section.get("comparison")
    if comparison:
        f = comparison["fpr_at_99_recall"]
        parts += [f"False-positive rate at 99% recall: probe {_fmt(f['probe'])}, guard {_fmt(f['guard'])} "
                  f"(guard/probe = {_fmt(f['guard_over_probe'], 1)}).", ""]
    best = section["probes"][section["best_probe"]]["test"] or {}
    if "ci95" in best:
        parts += [f"Bootstrap 95% CI of the best probe: ROC AUC {best['ci95']['roc_auc']}, precision@0.99 "
                  f"{best['ci95']['precision@0.99']}.", ""]
    parts += ["### ROC AUC by layer and pooling (test)", "",
              "| feature | probe | CV (selection metric) | test ROC AUC | test AP |", "|---|---|---|---|---|"]
    for name, entry in sorted(section["probes"].items()):
        feature, kind, test = entry["id"]["feature"], entry["id"]["type"], entry["test"] or {}
        cv = section.get("cv_best_by_feature", {}).get(feature)
        parts.append(f"| {feature} | {kind} | {_fmt(cv)} | {_fmt(test.get('roc_auc'))} | "
                     f"{_fmt(test.get('average_precision'))} |")
    parts += ["", "### Per source (test, best probe vs guard)", "",
              f"| source | rows | {section['target']} | probe accuracy | probe recall | guard accuracy | guard recall |",
              "|---|---|---|---|---|---|---|"]
    guard_src = section.get("guard", {}).get("by_source", {})
    for source, m in section["probes"][section["best_probe"]]["by_source"].items():
        g = guard_src.get(source, {})
        parts.append(f"| {source} | {m['count']} | {m['n_true']} | {_fmt(m['accuracy'])} | {_fmt(m['recall'])} | "
                     f"{_fmt(g.get('accuracy'))} | {_fmt(g.get('recall'))} |")
    for name, entry in [(section["best_probe"], section["probes"][section["best_probe"]]), *_guard_items(section)]:
        parts += ["", f"### Threshold sweep: {name}", "",
                  "| threshold | precision | recall | accuracy | tn | fp | fn | tp |", "|---|---|---|---|---|---|---|---|"]
        for s in entry["sweep"]:
            c = s["confusion"]
            parts.append(f"| {s['threshold']:g} | {_fmt(s['precision'])} | {_fmt(s['recall'])} | {_fmt(s['accuracy'])} | "
                         f"{c['tn']} | {c['fp']} | {c['fn']} | {c['tp']} |")
    parts += ["", "### CV leaderboard", "", "| feature | type | params | ROC AUC (mean ± std) | AP | fit s |",
              "|---|---|---|---|---|---|"]
    for r in section["cv_leaderboard"]:
        parts.append(f"| {r['feature']} | {r['type']} | {r['params']} | {_fmt(r['roc_auc_mean'])} ± "
                     f"{_fmt(r['roc_auc_std'])} | {_fmt(r['average_precision_mean'])} | {_fmt(r['fit_seconds'], 2)} |")
    parts += ["", "### Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return parts


def make_plots(section: dict[str, Any], test: pd.DataFrame, directory: Path) -> list[Path]:
    """PR and ROC curves and score histograms of the best probe and the guard, and test AUC by layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import PrecisionRecallDisplay, RocCurveDisplay

    if test["label"].nunique() < 2:
        log.warning("%s: test split has one class only: no curves plotted", section["target"])
        return []
    directory.mkdir(parents=True, exist_ok=True)
    guard = section["guard_scorer"]
    scorers = [section["best_probe"]] + ([guard] if guard else [])
    paths = []
    for name, display in (("pr_curve.png", PrecisionRecallDisplay), ("roc_curve.png", RocCurveDisplay)):
        fig, ax = plt.subplots(figsize=(6, 5))
        for scorer in scorers:
            display.from_predictions(test["label"], test[scorer], name=scorer, ax=ax)
        ax.set_title(f"{section['target']}: {name.removesuffix('.png').replace('_', ' ')}")
        paths.append(_save(fig, directory / name))
    fig, ax = plt.subplots(figsize=(6, 4))
    by_pooling: dict[str, list[tuple[int, float]]] = {}
    for entry in section["probes"].values():
        auc, _ = _auc(entry)
        by_pooling.setdefault(entry["id"]["pooling"], []).append((entry["id"]["layer"], auc or float("nan")))
    for pooling, points in sorted(by_pooling.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=pooling)
    guard_auc, _ = _auc(section.get("guard"))
    if guard_auc is not None:
        ax.axhline(guard_auc, color="gray", linestyle="--", label=guard)
    ax.set_xlabel("layer"), ax.set_ylabel("test ROC AUC"), ax.legend(), ax.set_title(f"{section['target']}: AUC by layer")
    paths.append(_save(fig, directory / "auc_by_layer.png"))
    fig, axes = plt.subplots(1, len(scorers), figsize=(5 * len(scorers), 4), squeeze=False)
    for ax, scorer in zip(axes[0], scorers):
        for label, color in ((False, "tab:blue"), (True, "tab:red")):
            ax.hist(test.loc[test["label"] == label, scorer], bins=30, alpha=0.6, color=color,
                    label=section["target"] if label else f"not {section['target']}")
        ax.set_title(f"{scorer} scores"), ax.legend()
    paths.append(_save(fig, directory / "score_histograms.png"))
    return paths


def summary_plot(report: dict[str, Any], path: Path) -> Path:
    """Test ROC AUC by target, best probe vs matching guard, with bootstrap 95% CIs as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, _ in _ordered(report)]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names) + 2), 4))
    x = np.arange(len(names))
    for offset, (label, pick) in zip((-0.2, 0.2), (("probe", lambda s: s["probes"][s["best_probe"]]),
                                                     ("guard", lambda s: s.get("guard")))):
        values, low, high = [], [], []
        for _, s in _ordered(report):
            auc, ci = _auc(pick(s))
            values.append(np.nan if auc is None else auc)
            low.append(0.0 if not ci or auc is None else max(0.0, auc - ci[0]))
            high.append(0.0 if not ci or auc is None else max(0.0, ci[1] - auc))
        ax.bar(x + offset, values, width=0.4, yerr=[low, high], capsize=3, label=label)
    ax.set_xticks(x, names, rotation=20), ax.set_ylim(0, 1.05), ax.set_ylabel("test ROC AUC")
    ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
    ax.legend(), ax.set_title("ROC AUC by target (95% CI)")
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, path)


def _ordered(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The sections in the spec's order (report.json's keys are sorted)."""
    return [(t, report["targets"][t]) for t in report.get("target_order", report["targets"])]


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rerender(stage: Location) -> str:
    """Re-render report.md and plots from a finished report directory; returns the comparison tables."""
    report = stage.join("report.json").read_json()
    if "targets" not in report:
        raise InputError(f"{stage.uri}: report.json predates per-target reports; run the report stage again")
    render(report, stage)
    return "\n\n".join(f"{t}:\n{s['comparison_table']}" for t, s in _ordered(report))
