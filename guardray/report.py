"""The report stage: score the held-out split with every refit probe and the guard, compare, render.

Writes `scores.parquet` (every score per row), `report.json` (all metrics), `report.md` and PNG plots.
`guardray report` re-renders the markdown and plots from `report.json` + `scores.parquet` without recomputing.
"""
from __future__ import annotations

import io
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from guardray.evaluate import (at_threshold, by_source, fpr_at_recall, score_metrics, threshold_for_recall,
                               threshold_sweep)
from guardray.features import labelled, matrix, read_features
from guardray.probes import artifact
from guardray.probes.torch_probe import TORCH_PROBE_TYPE
from guardray.spec import JobSpec
from guardray.storage import Location

log = logging.getLogger(__name__)
GUARD = "guard"


def run_report(spec: JobSpec, inputs: dict[str, Location], out: Location) -> dict[str, Any]:
    scores = score_rows(spec, inputs)
    out.join("scores.parquet").write_table(pa.Table.from_pandas(scores, preserve_index=False))
    cv = inputs["probes"].join("cv_results.csv").read_text()
    report = build_report(spec, scores, pd.read_csv(io.StringIO(cv)))
    out.join("report.json").write_json(report)
    render(report, scores, out)
    print(report["comparison_table"])
    return {"probes": len(report["probes"]), "test_rows": report["test_rows"], "best_probe": report["best_probe"]}


def score_rows(spec: JobSpec, inputs: dict[str, Location]) -> pd.DataFrame:
    """id, split, source, label, guard score and one score column per refit probe."""
    summary = inputs["probes"].join("summary.json").read_json()
    names = [p["name"] for p in summary["probes"]]
    features = sorted({p["feature"] for p in summary["probes"]})
    has_guard = spec.guard.enabled
    columns = ["id", "split", "source", spec.probes.target, *features] + (["guard_score"] if has_guard else [])
    table = labelled(read_features(inputs["features"], columns), spec.probes.target)
    frame = pd.DataFrame({"id": table.column("id").to_pylist(), "split": table.column("split").to_pylist(),
                          "source": table.column("source").to_pylist(),
                          "label": np.asarray(table.column(spec.probes.target).to_pylist(), dtype=bool)})
    if has_guard:
        frame[GUARD] = np.asarray(table.column("guard_score").to_pylist(), dtype=np.float64)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            probe = artifact.load(_download(inputs["probes"].join("artifacts", name), Path(tmp) / name))
            frame[name] = probe.score(matrix(table, probe.meta["feature"]))
    return frame


def _download(location: Location, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in location.list():
        (target / name).write_bytes(location.join(name).read_bytes())
    return target


def build_report(spec: JobSpec, scores: pd.DataFrame, cv: pd.DataFrame) -> dict[str, Any]:
    ev = spec.evaluate
    test, train = scores[scores["split"] == "test"], scores[scores["split"] == "train"]
    probe_names = [c for c in scores.columns if c.startswith("act_")]
    selection = f"{spec.probes.cv.metric}_mean"
    ranked = cv.sort_values(selection, ascending=False)
    best_probe = f"{ranked.iloc[0]['feature']}-{ranked.iloc[0]['type']}"
    thresholds = {**{n: ev.probe_threshold for n in probe_names}, GUARD: ev.guard_threshold}
    scored = probe_names + ([GUARD] if GUARD in scores else [])
    report: dict[str, Any] = {
        "job": spec.name, "target": spec.probes.target, "best_probe": best_probe, "test_rows": len(test),
        "probes": {}, "cv_leaderboard": ranked.head(15).to_dict(orient="records"),
        "cv_best_by_feature": ranked.groupby("feature", sort=False).head(1).set_index("feature")[selection].to_dict(),
    }
    for name in scored:
        entry = {
            "test": score_metrics(test["label"], test[name], thresholds[name], ev, name=f"{name} test"),
            "train": score_metrics(train["label"], train[name], thresholds[name], ev.model_copy(update={"bootstrap": 0}),
                                   name=f"{name} train"),
            "by_source": by_source(test["label"], test[name], test["source"], thresholds[name], ev),
            "sweep": threshold_sweep(test["label"], test[name], ev.sweep),
        }
        if name == GUARD:
            report["guard"] = entry
        else:
            report["probes"][name] = entry
    if GUARD in scores:
        report["comparison"] = compare(test, best_probe, ev.probe_threshold, ev.guard_threshold)
    report["comparison_table"] = comparison_markdown(report)
    return report


def compare(test: pd.DataFrame, probe: str, probe_threshold: float, guard_threshold: float) -> dict[str, Any]:
    """Probe vs guard at default thresholds and with the guard matched to the probe's recall."""
    y = test["label"].to_numpy()
    probe_at = at_threshold(y, test[probe].to_numpy(), probe_threshold)
    matched = threshold_for_recall(y, test[GUARD].to_numpy(), probe_at["recall"])
    probe_fpr = fpr_at_recall(y, test[probe].to_numpy(), 0.99)
    guard_fpr = fpr_at_recall(y, test[GUARD].to_numpy(), 0.99)
    return {
        "probe": probe,
        "matched_guard_threshold": matched,
        "guard_at_matched": at_threshold(y, test[GUARD].to_numpy(), matched) if matched is not None else None,
        "fpr_at_99_recall": {"probe": probe_fpr, "guard": guard_fpr,
                             "guard_over_probe": (guard_fpr / probe_fpr) if probe_fpr else None},
    }


def _fmt(value: Any, digits: int = 3) -> str:
    return "–" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def comparison_markdown(report: dict[str, Any]) -> str:
    """The headline table: best probe (and the torch probe, when trained) vs guard on the test split."""
    rows = [("probe " + report["best_probe"], report["probes"][report["best_probe"]]["test"])]
    rows += [("probe " + name, entry["test"]) for name, entry in report["probes"].items()
             if name.endswith(TORCH_PROBE_TYPE)]
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


def render(report: dict[str, Any], scores: pd.DataFrame, out: Location) -> None:
    """report.md and the PNG plots, from the report dict and the per-row scores."""
    with tempfile.TemporaryDirectory() as tmp:
        plots = make_plots(report, scores, Path(tmp))
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
        feature, kind = name.rsplit("-", 1)
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


def make_plots(report: dict[str, Any], scores: pd.DataFrame, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import PrecisionRecallDisplay, RocCurveDisplay

    test = scores[scores["split"] == "test"]
    if test["label"].nunique() < 2:
        log.warning("test split has one class only: no curves plotted")
        return []
    scorers = [report["best_probe"]] + ([GUARD] if GUARD in scores else [])
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
        pooling, layer = name.rsplit("-", 1)[0].removeprefix("act_").rsplit("_L", 1)
        by_pooling.setdefault(pooling, []).append((int(layer), entry["test"]["roc_auc"] or float("nan")))
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
    scores = stage.join("scores.parquet").read_table().to_pandas()
    render(report, scores, stage)
    return report["comparison_table"]
