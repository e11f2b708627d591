"""The report's PNG plots (matplotlib, Agg): per target the PR and ROC curves and score histograms of the best
probe and the guard and the test AUC by layer; for the report, the test AUC by target. Files go to a local
directory; `stage.render` copies them to the report's location (local or gs://)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from guardray.report.sections import Section, auc_and_ci

log = logging.getLogger(__name__)
SUMMARY_PLOT = "auc_by_target.png"


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (workers have no display), imported only when plotting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def make_plots(section: Section, test: pd.DataFrame, directory: Path) -> list[Path]:
    """PR and ROC curves and score histograms of the best probe and the guard, and test AUC by layer."""
    plt = _pyplot()
    from sklearn.metrics import PrecisionRecallDisplay, RocCurveDisplay

    if test["label"].nunique() < 2:
        log.warning("%s: test split has one class only: no curves plotted", section.target)
        return []
    directory.mkdir(parents=True, exist_ok=True)
    guard = section.guard_scorer
    scorers = [section.best_probe] + ([guard] if guard else [])
    paths = []
    for name, display in (("pr_curve.png", PrecisionRecallDisplay), ("roc_curve.png", RocCurveDisplay)):
        fig, ax = plt.subplots(figsize=(6, 5))
        for scorer in scorers:
            display.from_predictions(test["label"], test[scorer], name=scorer, ax=ax)
        ax.set_title(f"{section.target}: {name.removesuffix('.png').replace('_', ' ')}")
        paths.append(_save(fig, directory / name))
    paths.append(_auc_by_layer(plt, section, directory / "auc_by_layer.png"))
    fig, axes = plt.subplots(1, len(scorers), figsize=(5 * len(scorers), 4), squeeze=False)
    for ax, scorer in zip(axes[0], scorers):
        for label, color in ((False, "tab:blue"), (True, "tab:red")):
            ax.hist(test.loc[test["label"] == label, scorer], bins=30, alpha=0.6, color=color,
                    label=section.target if label else f"not {section.target}")
        ax.set_title(f"{scorer} scores"), ax.legend()
    paths.append(_save(fig, directory / "score_histograms.png"))
    if any("skipped" not in f for f in (section.left_out or {}).values()):
        paths.append(_left_out(plt, section, directory / "leave_one_source_out.png"))
    return paths


def _left_out(plt: Any, section: Section, path: Path) -> Path:
    """Per left-out source, what crosses the 1% FPR point: the probe that trained on it, the probe that never
    saw it and the guard; detection rates of harmful sources above, false-positive rates of benign ones below."""
    graded = {s: f for s, f in section.left_out.items() if "skipped" not in f}
    labels = {"probe": "probe (trained on it)", "left_out_probe": "probe (never saw it)", "guard": "guard"}
    scorers = [k for k in labels if any(k in f for f in graded.values())]
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 1.2 * len(graded) + 3), 6), squeeze=False)
    for ax, kind in zip(axes[:, 0], ("detection", "fpr")):
        names = [s for s, f in graded.items() if f"{kind}_at_1pct_fpr" in f[scorers[0]]]
        if not names:
            ax.text(0.5, 0.5, f"no left-out source has {'harmful' if kind == 'detection' else 'benign'} test rows",
                    ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        x = np.arange(len(names))
        width = 0.8 / len(scorers)
        for i, scorer in enumerate(scorers):
            values = [(graded[s][scorer].get(f"{kind}_at_1pct_fpr") or {}).get("rate") for s in names]
            ax.bar(x + (i - (len(scorers) - 1) / 2) * width, [np.nan if v is None else v for v in values],
                   width=width, label=labels[scorer])
        ax.set_xticks(x, names, rotation=20), ax.set_ylim(0, 1.05)
        ax.set_ylabel("detection rate" if kind == "detection" else "false-positive rate"), ax.legend(fontsize=8)
    axes[0, 0].set_title(f"{section.target}: leave one source out (1% FPR point)")
    return _save(fig, path)


def _auc_by_layer(plt: Any, section: Section, path: Path) -> Path:
    """Test ROC AUC of every probe by layer, a line per pooling, the guard's as a dashed line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    by_pooling: dict[str, list[tuple[int, float]]] = {}
    for entry in section.probes.values():
        auc, _ = auc_and_ci(entry)
        by_pooling.setdefault(entry["id"]["pooling"], []).append((entry["id"]["layer"], auc or float("nan")))
    for pooling, points in sorted(by_pooling.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=pooling)
    guard_auc, _ = auc_and_ci(section.guard)
    if guard_auc is not None:
        ax.axhline(guard_auc, color="gray", linestyle="--", label=section.guard_scorer)
    ax.set_xlabel("layer"), ax.set_ylabel("test ROC AUC"), ax.legend(), ax.set_title(f"{section.target}: AUC by layer")
    return _save(fig, path)


def summary_plot(sections: list[Section], path: Path) -> Path:
    """Test ROC AUC by target, best probe vs matching guard, with bootstrap 95% CIs as error bars."""
    plt = _pyplot()
    names = [s.target for s in sections]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names) + 2), 4))
    x = np.arange(len(names))
    for offset, (label, pick) in zip((-0.2, 0.2), (("probe", lambda s: s.best), ("guard", lambda s: s.guard))):
        values, low, high = [], [], []
        for s in sections:
            auc, ci = auc_and_ci(pick(s))
            values.append(np.nan if auc is None else auc)
            low.append(0.0 if not ci or auc is None else max(0.0, auc - ci[0]))
            high.append(0.0 if not ci or auc is None else max(0.0, ci[1] - auc))
        ax.bar(x + offset, values, width=0.4, yerr=[low, high], capsize=3, label=label)
    ax.set_xticks(x, names, rotation=20), ax.set_ylim(0, 1.05), ax.set_ylabel("test ROC AUC")
    ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
    ax.legend(), ax.set_title("ROC AUC by target (95% CI)")
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
