"""The report stage: score the held-out split with every refit probe and the guard, compare, render.

Writes `scores.parquet` (every score per row), `report.json` (all metrics), `report.md` and PNG plots.
`guardray report` re-renders the markdown and plots from `report.json` + `scores.parquet` without recomputing.

Work goes where the data is. One Ray task per scorer (each refit probe, and the guard) streams its own column's
labelled rows batch by batch, keeps the scores and drops the features, computes that scorer's metrics and writes
`scores/<name>.parquet`; one task then merges those files into `scores.parquet` a batch at a time; the comparison
and the plots read two score columns of the test split. The driver holds metrics only.
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from guardray.columns import column_batches
from guardray.errors import StageError, ray_get
from guardray.evaluate import (at_threshold, by_source, fpr_at_recall, score_metrics, threshold_for_recall,
                               threshold_sweep)
from guardray.metrics import peak_rss_mb
from guardray.probes import artifact
from guardray.probes.torch_probe import TORCH_PROBE_TYPE
from guardray.spec import JobSpec
from guardray.storage import Location

log = logging.getLogger(__name__)
GUARD = "guard"
GUARD_COLUMN = "guard_score"
SCORES_FILE, SCORES_DIR = "scores.parquet", "scores"
SCORE_META = ["id", "split", "source", "label"]
MERGE_BATCH_ROWS = 65536


@dataclass(frozen=True)
class Scorer:
    """One score to evaluate: a refit probe applied to its feature column, or a column that is a score already."""

    name: str
    column: str  # the feature column a probe reads, or the score column itself
    threshold: float
    artifact: Location | None = None  # None: `column` holds the score
    id: dict[str, Any] | None = None  # the probe's structured identity


def scorers(spec: JobSpec, probes: Location) -> list[Scorer]:
    summary = probes.join("summary.json").read_json()
    found = [Scorer(p["name"], p["id"]["feature"], spec.evaluate.probe_threshold,
                    probes.join("artifacts", p["name"]), p["id"]) for p in summary["probes"]]
    if spec.guard.enabled:
        found.append(Scorer(GUARD, GUARD_COLUMN, spec.evaluate.guard_threshold))
    return found


def run_report(spec: JobSpec, inputs: dict[str, Location], out: Location) -> dict[str, Any]:
    import ray

    summary = inputs["probes"].join("summary.json").read_json()
    found = scorers(spec, inputs["probes"])
    remote = ray.remote(num_cpus=1, max_retries=1)  # each task rewrites its own files whole: safe to retry
    entries = ray_get([remote(score_one).remote(spec, inputs["features"], out, s) for s in found])
    ray_get(remote(merge_scores).remote(out, [s.name for s in found]))
    cv = inputs["probes"].join("cv_results.csv").read_text()
    report = build_report(spec, summary, dict(zip((s.name for s in found), entries)), pd.read_csv(io.StringIO(cv)))
    if GUARD in report["scorers"]:
        report["comparison"] = ray_get(remote(compare).remote(out, report["best_probe"], spec.evaluate.probe_threshold,
                                                              spec.evaluate.guard_threshold))
    report["comparison_table"] = comparison_markdown(report)
    out.join("report.json").write_json(report)
    if spec.evaluate.plots:
        ray_get(remote(render).remote(report, out))
    else:
        out.join("report.md").write_text(markdown(report, []))
    print(report["comparison_table"])
    return {"probes": len(report["probes"]), "test_rows": report["test_rows"], "best_probe": report["best_probe"],
            "task_peak_rss_mb": max((t["peak_rss_mb"] or 0) for t in report["tasks"].values())}


def score_one(spec: JobSpec, features: Location, out: Location, scorer: Scorer) -> dict[str, Any]:
    """Runs on a worker: score every labelled row, batch by batch, write the scores, return the metrics."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = artifact.load(_download(scorer.artifact, Path(tmp))) if scorer.artifact else None
        feature = scorer.column if probe else None
        extra = ["id", "split", "source"] + ([] if probe else [scorer.column])
        pieces: dict[str, list[Any]] = {c: [] for c in [*SCORE_META, "score"]}
        for part in column_batches(features, feature, spec.probes.target, None, extra):
            score = probe.score(part.x) if probe else part.extra[scorer.column].to_numpy(zero_copy_only=False)
            for c in ("id", "split", "source"):
                pieces[c].extend(part.extra[c].chunks)
            pieces["label"].append(part.y)
            pieces["score"].append(np.asarray(score, dtype=np.float64))
    table = pa.table({"id": pa.chunked_array(pieces["id"], pa.string()),
                      "split": pa.chunked_array(pieces["split"], pa.string()),
                      "source": pa.chunked_array(pieces["source"], pa.string()),
                      "label": np.concatenate(pieces["label"]) if pieces["label"] else np.empty(0, bool),
                      "score": np.concatenate(pieces["score"]) if pieces["score"] else np.empty(0)})
    out.join(SCORES_DIR, f"{scorer.name}.parquet").write_table(table)
    return {**scorer_metrics(spec, scorer, table), "id": scorer.id, "peak_rss_mb": peak_rss_mb()}


def scorer_metrics(spec: JobSpec, scorer: Scorer, table: pa.Table) -> dict[str, Any]:
    """test / train metrics, per source and the threshold sweep of one scorer."""
    ev = spec.evaluate
    y, scores = table.column("label").to_numpy(), table.column("score").to_numpy()
    test = pc.equal(table.column("split"), "test").to_numpy(zero_copy_only=False)
    train = pc.equal(table.column("split"), "train").to_numpy(zero_copy_only=False)
    sources = table.column("source").to_numpy(zero_copy_only=False)
    t = scorer.threshold
    return {
        "test": score_metrics(y[test], scores[test], t, ev, name=f"{scorer.name} test"),
        "train": score_metrics(y[train], scores[train], t, ev.model_copy(update={"bootstrap": 0}),
                               name=f"{scorer.name} train"),
        "by_source": by_source(y[test], scores[test], sources[test], t, ev),
        "sweep": threshold_sweep(y[test], scores[test], ev.sweep),
    }


def merge_scores(out: Location, names: list[str]) -> None:
    """scores/<name>.parquet → one scores.parquet (id, split, source, label, then a column per scorer), a batch
    at a time; the per-scorer files are row-aligned (same parts, same order), which is checked on the ids."""
    out.join(SCORES_DIR).refresh()  # written by other workers: no stale listing cache (gcsfs)
    files = {n: out.join(SCORES_DIR, f"{n}.parquet") for n in names}
    with contextlib.ExitStack() as stack:
        readers = {n: pq.ParquetFile(stack.enter_context(f.fs.open_input_file(f.path))) for n, f in files.items()}
        counts = {n: r.metadata.num_rows for n, r in readers.items()}
        if len(set(counts.values())) > 1:
            raise StageError(f"report: the scorers scored different rows: {counts}")
        first = names[0]
        meta = readers[first].schema_arrow
        schema = pa.schema([*(meta.field(c) for c in SCORE_META), *(pa.field(n, pa.float64()) for n in names)])

        def write(f: Any) -> None:
            batches = {n: r.iter_batches(batch_size=MERGE_BATCH_ROWS) for n, r in readers.items()}
            with pq.ParquetWriter(f, schema) as writer:
                for head in batches[first]:
                    columns = {c: head.column(c) for c in SCORE_META}
                    for n in names:
                        batch = head if n == first else next(batches[n])
                        if not batch.column("id").equals(head.column("id")):
                            raise StageError(f"report: the scores of {n} are not row-aligned with {first}")
                        columns[n] = batch.column("score")
                    writer.write_table(pa.table(columns, schema=schema))

        out.join(SCORES_FILE).write_with(write)
    out.join(SCORES_DIR).delete()


def test_scores(stage: Location, scorers: list[str]) -> pd.DataFrame:
    """label and the given score columns of the test split, read from scores.parquet (nothing else)."""
    location = stage.join(SCORES_FILE)
    location.refresh()
    table = pq.read_table(location.path, filesystem=location.fs, columns=["label", *scorers],
                          filters=[("split", "=", "test")])
    return table.to_pandas()


def _download(location: Location, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in location.list():
        (target / name).write_bytes(location.join(name).read_bytes())
    return target


def build_report(spec: JobSpec, summary: dict[str, Any], entries: dict[str, dict[str, Any]],
                 cv: pd.DataFrame) -> dict[str, Any]:
    """The report dict from each scorer's metrics: small, built on the driver."""
    selection = f"{spec.probes.cv.metric}_mean"
    ranked = cv.sort_values(selection, ascending=False, kind="stable")
    tasks = {name: {"peak_rss_mb": entry.pop("peak_rss_mb")} for name, entry in entries.items()}
    report: dict[str, Any] = {
        "job": spec.name, "target": spec.probes.target, "best_probe": summary["best"]["name"],
        "test_rows": next(iter(entries.values()))["test"]["count"], "scorers": list(entries),
        "probes": {n: e for n, e in entries.items() if n != GUARD}, "tasks": tasks,
        "cv_leaderboard": ranked.head(15).to_dict(orient="records"),
        "cv_best_by_feature": ranked.groupby("feature", sort=False).head(1).set_index("feature")[selection].to_dict(),
    }
    if GUARD in entries:
        report["guard"] = entries[GUARD]
    return report


def compare(stage: Location, probe: str, probe_threshold: float, guard_threshold: float) -> dict[str, Any]:
    """Probe vs guard at default thresholds and with the guard matched to the probe's recall (test split)."""
    test = test_scores(stage, [probe, GUARD])
    y, probe_scores, guard_scores = test["label"].to_numpy(), test[probe].to_numpy(), test[GUARD].to_numpy()
    probe_at = at_threshold(y, probe_scores, probe_threshold)
    matched = threshold_for_recall(y, guard_scores, probe_at["recall"])
    probe_fpr = fpr_at_recall(y, probe_scores, 0.99)
    guard_fpr = fpr_at_recall(y, guard_scores, 0.99)
    return {
        "probe": probe,
        "matched_guard_threshold": matched,
        "guard_at_matched": at_threshold(y, guard_scores, matched) if matched is not None else None,
        "fpr_at_99_recall": {"probe": probe_fpr, "guard": guard_fpr,
                             "guard_over_probe": (guard_fpr / probe_fpr) if probe_fpr else None},
    }


def _fmt(value: Any, digits: int = 3) -> str:
    return "–" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def comparison_markdown(report: dict[str, Any]) -> str:
    """The headline table: best probe (and the torch probe, when trained) vs guard on the test split."""
    rows = [("probe " + report["best_probe"], report["probes"][report["best_probe"]]["test"])]
    rows += [("probe " + name, entry["test"]) for name, entry in report["probes"].items()
             if entry["id"]["type"] == TORCH_PROBE_TYPE]
    if "guard" in report:
        rows.append(("guard", report["guard"]["test"]))
    lines = ["| scorer | threshold | accuracy | precision | recall | precision@0.99 | ROC AUC | recall@1% FPR |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in rows:
        lines.append(f"| {name} | {_fmt(m['threshold'], 2)} | {_fmt(m['accuracy'])} | {_fmt(m['precision'])} | "
                     f"{_fmt(m['recall'])} | {_fmt(m['precision_at_recall'].get('0.99'))} | {_fmt(m['roc_auc'])} | "
                     f"{_fmt(m['recall_at_fpr'].get('0.01'))} |")
    comparison = report.get("comparison")
    if comparison and comparison["guard_at_matched"]:
        g = comparison["guard_at_matched"]
        lines.append(f"| guard (matched recall) | {_fmt(g['threshold'], 2)} | {_fmt(g['accuracy'])} | "
                     f"{_fmt(g['precision'])} | {_fmt(g['recall'])} | – | – | – |")
    return "\n".join(lines)


def render(report: dict[str, Any], out: Location) -> None:
    """report.md and the PNG plots, from the report dict and the test split's scores of the plotted scorers."""
    plotted = [report["best_probe"]] + ([GUARD] if "guard" in report else [])
    with tempfile.TemporaryDirectory() as tmp:
        plots = make_plots(report, test_scores(out, plotted), Path(tmp))
        for path in plots:
            out.join(path.name).write_bytes(path.read_bytes())
    out.join("report.md").write_text(markdown(report, [p.name for p in plots]))


def markdown(report: dict[str, Any], plots: list[str]) -> str:
    parts = [f"# guardray report: {report['job']}", "",
             f"Target `{report['target']}`, {report['test_rows']} held-out rows. Best probe by CV: "
             f"`{report['best_probe']}`.", "", "## Probe vs guard (test split)", "", report["comparison_table"], ""]
    comparison = report.get("comparison")
    if comparison:
        f = comparison["fpr_at_99_recall"]
        parts += [f"False-positive rate at 99% recall: probe {_fmt(f['probe'])}, guard {_fmt(f['guard'])} "
                  f"(guard/probe = {_fmt(f['guard_over_probe'], 1)}).", ""]
    best = report["probes"][report["best_probe"]]["test"]
    if "ci95" in best:
        parts += [f"Bootstrap 95% CI of the best probe: ROC AUC {best['ci95']['roc_auc']}, precision@0.99 "
                  f"{best['ci95']['precision@0.99']}.", ""]
    parts += ["## ROC AUC by layer and pooling (test)", "", "| feature | probe | CV (selection metric) | test ROC AUC | test AP |",
              "|---|---|---|---|---|"]
    for name, entry in sorted(report["probes"].items()):
        feature, kind = entry["id"]["feature"], entry["id"]["type"]
        cv = report.get("cv_best_by_feature", {}).get(feature)
        parts.append(f"| {feature} | {kind} | {_fmt(cv)} | {_fmt(entry['test']['roc_auc'])} | "
                     f"{_fmt(entry['test']['average_precision'])} |")
    parts += ["", "## Per source (test, best probe vs guard)", "",
              "| source | rows | harmful | probe accuracy | probe recall | guard accuracy | guard recall |",
              "|---|---|---|---|---|---|---|"]
    probe_src = report["probes"][report["best_probe"]]["by_source"]
    guard_src = report.get("guard", {}).get("by_source", {})
    for source, m in probe_src.items():
        g = guard_src.get(source, {})
        parts.append(f"| {source} | {m['count']} | {m['n_true']} | {_fmt(m['accuracy'])} | {_fmt(m['recall'])} | "
                     f"{_fmt(g.get('accuracy'))} | {_fmt(g.get('recall'))} |")
    for name, entry in [(report["best_probe"], report["probes"][report["best_probe"]]),
                        *([("guard", report["guard"])] if "guard" in report else [])]:
        parts += ["", f"## Threshold sweep: {name}", "", "| threshold | precision | recall | accuracy | tn | fp | fn | tp |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in entry["sweep"]:
            c = s["confusion"]
            parts.append(f"| {s['threshold']:g} | {_fmt(s['precision'])} | {_fmt(s['recall'])} | {_fmt(s['accuracy'])} | "
                         f"{c['tn']} | {c['fp']} | {c['fn']} | {c['tp']} |")
    parts += ["", "## CV leaderboard", "", "| feature | type | params | ROC AUC (mean ± std) | AP | fit s |",
              "|---|---|---|---|---|---|"]
    for r in report["cv_leaderboard"]:
        parts.append(f"| {r['feature']} | {r['type']} | {r['params']} | {_fmt(r['roc_auc_mean'])} ± "
                     f"{_fmt(r['roc_auc_std'])} | {_fmt(r['average_precision_mean'])} | {_fmt(r['fit_seconds'], 2)} |")
    parts += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(parts) + "\n"


def make_plots(report: dict[str, Any], test: pd.DataFrame, directory: Path) -> list[Path]:
    """PR and ROC curves and score histograms of the best probe and the guard, and test AUC by layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import PrecisionRecallDisplay, RocCurveDisplay

    if test["label"].nunique() < 2:
        log.warning("test split has one class only: no curves plotted")
        return []
    scorers = [report["best_probe"]] + ([GUARD] if GUARD in test else [])
    paths = []
    for name, display in (("pr_curve.png", PrecisionRecallDisplay), ("roc_curve.png", RocCurveDisplay)):
        fig, ax = plt.subplots(figsize=(6, 5))
        for scorer in scorers:
            display.from_predictions(test["label"], test[scorer], name=scorer, ax=ax)
        ax.set_title(name.removesuffix(".png").replace("_", " "))
        paths.append(_save(fig, directory / name))
    fig, ax = plt.subplots(figsize=(6, 4))
    by_pooling: dict[str, list[tuple[int, float]]] = {}
    for name, entry in report["probes"].items():
        by_pooling.setdefault(entry["id"]["pooling"], []).append((entry["id"]["layer"],
                                                                  entry["test"]["roc_auc"] or float("nan")))
    for pooling, points in sorted(by_pooling.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=pooling)
    if "guard" in report and report["guard"]["test"]["roc_auc"] is not None:
        ax.axhline(report["guard"]["test"]["roc_auc"], color="gray", linestyle="--", label="guard")
    ax.set_xlabel("layer"), ax.set_ylabel("test ROC AUC"), ax.legend(), ax.set_title("AUC by layer")
    paths.append(_save(fig, directory / "auc_by_layer.png"))
    fig, axes = plt.subplots(1, len(scorers), figsize=(5 * len(scorers), 4), squeeze=False)
    for ax, scorer in zip(axes[0], scorers):
        for label, color in ((False, "tab:blue"), (True, "tab:red")):
            ax.hist(test.loc[test["label"] == label, scorer], bins=30, alpha=0.6, color=color,
                    label="harmful" if label else "benign")
        ax.set_title(f"{scorer} scores"), ax.legend()
    paths.append(_save(fig, directory / "score_histograms.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rerender(stage: Location) -> str:
    """Re-render report.md and plots from a finished report directory; returns the comparison table."""
    report = stage.join("report.json").read_json()
    render(report, stage)
    return report["comparison_table"]
