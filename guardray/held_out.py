"""Figures on held-out sources (a source's `split: test`): what a probe or guard does on a distribution it never
trained on, at the operating points a deployment would fix on the traffic it knows.

The thresholds come from the in-distribution test rows (every test row not of a held-out source): the one at
1% false-positive rate and the one at 99% recall, the rules the report's other tables use. On each held-out
source the report then gives the share of its rows that cross them: the detection rate of its positives (a
harmful source) and the false-positive rate of its negatives (a benign one), each with a percentile bootstrap
95% interval; its ROC AUC when it has both classes; and the ROC AUC of its positives against the
in-distribution test negatives (named as such: it says whether the held-out harmful rows rank above ordinary
traffic, not whether the source itself separates). Pure numpy and sklearn.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from guardray.evaluate import Curve

#: Operating point name → how it is fixed on the in-distribution test rows.
FPR_AT, RECALL_AT = 0.01, 0.99
OPERATING_POINTS = ("at_1pct_fpr", "at_99pct_recall")


def operating_points(y: np.ndarray, scores: np.ndarray) -> dict[str, float | None]:
    """The lowest threshold whose false-positive rate is at most 1%, and the highest whose recall is at least
    99%, on (y, scores); None without both classes. A row is flagged when its score is >= the threshold."""
    y, scores = np.asarray(y, bool), np.asarray(scores, np.float64)
    if y.all() or not y.any():
        return dict.fromkeys(OPERATING_POINTS)
    curve = Curve.of(y, scores)
    fprs, tprs = curve.fps / curve.fps[-1], curve.tps / curve.tps[-1]
    within = np.flatnonzero(fprs <= FPR_AT)
    at_fpr = float(curve.thresholds[within[-1]]) if len(within) else float("inf")
    reached = np.flatnonzero(tprs >= RECALL_AT)
    return {"at_1pct_fpr": at_fpr, "at_99pct_recall": float(curve.thresholds[reached[0]])}


def rate(flags: np.ndarray, resamples: int, seed: int) -> dict[str, Any]:
    """The share of True in `flags`, with a percentile bootstrap 95% interval (None below two rows)."""
    flags = np.asarray(flags, bool)
    if not len(flags):
        return {"rate": None, "rows": 0, "ci95": None}
    ci = None
    if resamples and len(flags) > 1:
        rng = np.random.default_rng(seed)
        means = np.array([flags[rng.integers(0, len(flags), len(flags))].mean() for _ in range(resamples)])
        ci = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    return {"rate": float(flags.mean()), "rows": int(len(flags)), "ci95": ci}


def source_figures(points: dict[str, float | None], y: np.ndarray, scores: np.ndarray, y_in: np.ndarray,
                   scores_in: np.ndarray, resamples: int, seed: int) -> dict[str, Any]:
    """One held-out source's figures at the in-distribution `points` (see the module docstring)."""
    y, scores = np.asarray(y, bool), np.asarray(scores, np.float64)
    figures: dict[str, Any] = {"rows": int(len(y)), "positives": int(y.sum()), "thresholds": points}
    for name, threshold in points.items():
        if threshold is None:
            continue
        if y.any():
            figures[f"detection_{name}"] = rate(scores[y] >= threshold, resamples, seed)
        if not y.all():
            figures[f"fpr_{name}"] = rate(scores[~y] >= threshold, resamples, seed)
    figures["roc_auc"] = float(roc_auc_score(y, scores)) if y.any() and not y.all() else None
    negatives_in = ~np.asarray(y_in, bool)
    figures["roc_auc_vs_in_distribution_negatives"] = (
        float(roc_auc_score(np.r_[np.ones(int(y.sum()), bool), np.zeros(int(negatives_in.sum()), bool)],
                            np.r_[scores[y], np.asarray(scores_in, np.float64)[negatives_in]]))
        if y.any() and negatives_in.any() else None)
    return figures


def held_out_figures(y: np.ndarray, scores: np.ndarray, sources: np.ndarray, held_out: list[str],
                     resamples: int, seed: int) -> dict[str, Any]:
    """{"in_distribution": rows and thresholds, "sources": {held-out source: figures}} of one scorer's test rows."""
    y, scores, sources = np.asarray(y, bool), np.asarray(scores, np.float64), np.asarray(sources, object)
    inside = ~np.isin(sources, held_out)
    points = operating_points(y[inside], scores[inside])
    return {"in_distribution": {"rows": int(inside.sum()), "positives": int(y[inside].sum()), "thresholds": points},
            "sources": {s: source_figures(points, y[sources == s], scores[sources == s], y[inside], scores[inside],
                                          resamples, seed) for s in held_out if (sources == s).any()}}


def figures_fixed_on(fixed_on: np.ndarray, on: np.ndarray, y: np.ndarray, scores: np.ndarray, resamples: int,
                     seed: int) -> dict[str, Any]:
    """`source_figures` of the rows `on`, at the operating points fixed on the rows `fixed_on` (boolean masks
    over the same rows): the same rules as the held-out table, for a leave-one-source-out comparison, where
    each probe's thresholds come from the rows it may know."""
    y, scores = np.asarray(y, bool), np.asarray(scores, np.float64)
    points = operating_points(y[fixed_on], scores[fixed_on])
    return source_figures(points, y[on], scores[on], y[fixed_on], scores[fixed_on], resamples, seed)
