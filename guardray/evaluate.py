"""Metrics of a continuous score against binary labels, equal to sklearn.metrics but built for millions of rows.

`precision@r` is the highest precision over thresholds whose recall is at least r; `recall@fpr` the highest
recall over thresholds whose false-positive rate is at most f. With one class only the ranking metrics are
undefined: they come back as None with a warning instead of an exception.

The ranking metrics of one score come from one sort (`Curve`, the counts sklearn's `roc_curve` and
`precision_recall_curve` are made of) instead of one sklearn call, hence one sort, per recall and FPR level.
The bootstrap does not call sklearn per resample: scores are mapped once to tie groups and each resample is a
`np.bincount` of its rows' (group, label) keys, from which ROC AUC and precision@r follow by cumulative sums
(`resample_metrics`). Above `max_rows` test rows it runs on a seeded label-stratified sample of that many rows.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import numpy as np
import pandas as pd
from sklearn import metrics

from guardray.jobspec import EvaluateSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Curve:
    """Cumulative counts at each distinct score, highest first: what sklearn's ROC and PR curves are made of.

    Built with one stable sort, the way `sklearn.metrics.confusion_matrix_at_thresholds` builds them, so the
    curves (and every metric read off them) are bitwise equal to sklearn's.
    """

    thresholds: np.ndarray  # distinct scores, descending
    tps: np.ndarray  # float64: positives scoring >= each threshold
    fps: np.ndarray  # float64: negatives scoring >= each threshold

    @classmethod
    def of(cls, y: np.ndarray, scores: np.ndarray) -> Curve:
        if not np.isfinite(scores).all():
            raise ValueError("Input contains NaN or infinity.")  # as sklearn's assert_all_finite
        order = np.argsort(scores, kind="stable")[::-1]
        ranked = scores[order]
        ends = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
        tps = np.cumsum(y[order], dtype=np.float64)[ends]
        return cls(ranked[ends], tps, 1 + ends.astype(np.float64) - tps)

    # --- ROC: tpr/fpr with the (0, 0) point and an infinite threshold in front, as sklearn.metrics.roc_curve
    @cached_property
    def roc_full(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fpr, tpr, thresholds) of `roc_curve(..., drop_intermediate=False)`."""
        return self._roc(slice(None))

    @cached_property
    def roc(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fpr, tpr, thresholds) of `roc_curve(...)`, which drops points collinear with their neighbours."""
        keep = slice(None)
        if len(self.fps) > 2:
            keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(self.fps, 2), np.diff(self.tps, 2)), True])
        return self._roc(keep)

    def _roc(self, keep: slice | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tps, fps = np.r_[0.0, self.tps[keep]], np.r_[0.0, self.fps[keep]]
        return fps / fps[-1], tps / tps[-1], np.r_[np.inf, self.thresholds[keep]]

    # --- precision/recall in threshold-descending order (sklearn returns them reversed, with (1, 0) appended)
    @cached_property
    def precision(self) -> np.ndarray:
        return self.tps / (self.tps + self.fps)  # every threshold has at least one row: no 0/0

    @cached_property
    def recall(self) -> np.ndarray:
        return self.tps / self.tps[-1]

    @cached_property
    def _best_precision_from(self) -> np.ndarray:
        """Highest precision at this threshold or any lower one (recall only grows as the threshold drops)."""
        return np.maximum.accumulate(self.precision[::-1])[::-1]

    def roc_auc(self) -> float:
        fpr, tpr, _ = self.roc
        return metrics.auc(fpr, tpr)  # what roc_auc_score computes

    def average_precision(self) -> float:
        precision, recall = np.r_[self.precision[::-1], 1.0], np.r_[self.recall[::-1], 0.0]
        return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))  # as average_precision_score

    def precision_at_recall(self, recall: float) -> float | None:
        if recall <= 0:
            return 1.0  # the (recall 0, precision 1) end point of sklearn's curve
        first = int(np.searchsorted(self.recall, recall, side="left"))
        return float(self._best_precision_from[first]) if first < len(self.recall) else None

    # The two below read the full curve: sklearn's drop_intermediate removes collinear points, which are real
    # thresholds, and one of them can fit an FPR budget (or reach a recall) that its kept neighbours do not.
    def recall_at_fpr(self, fpr: float) -> float:
        fprs, tprs, _ = self.roc_full
        last = int(np.searchsorted(fprs, fpr, side="right")) - 1  # tpr grows with fpr: the last is the highest
        return float(tprs[last]) if last >= 0 else 0.0

    def fpr_at_recall(self, recall: float) -> float | None:
        fprs, tprs, _ = self.roc_full
        first = int(np.searchsorted(tprs, recall, side="left"))  # fpr grows with tpr: the first is the lowest
        return float(fprs[first]) if first < len(tprs) else None  # None: recall > 1

    def threshold_for_recall(self, recall: float) -> float | None:
        _, tprs, thresholds = self.roc_full
        first = int(np.searchsorted(tprs, recall, side="left"))
        return float(thresholds[first]) if first < len(tprs) else None

    def best_accuracy_threshold(self, y: np.ndarray) -> tuple[float, float]:
        fprs, tprs, thresholds = self.roc_full
        positives, negatives = y.sum(), len(y) - y.sum()
        accuracy = (tprs * positives + (1 - fprs) * negatives) / len(y)
        best = int(np.argmax(accuracy))
        return float(thresholds[best]), float(accuracy[best])


def precision_at_recall(y: np.ndarray, scores: np.ndarray, recall: float) -> float | None:
    y, scores = _arrays(y, scores)
    return Curve.of(y, scores).precision_at_recall(recall) if _two_classes(y) else None


def recall_at_fpr(y: np.ndarray, scores: np.ndarray, fpr: float) -> float | None:
    y, scores = _arrays(y, scores)
    return Curve.of(y, scores).recall_at_fpr(fpr) if _two_classes(y) else None


def fpr_at_recall(y: np.ndarray, scores: np.ndarray, recall: float) -> float | None:
    """The lowest false-positive rate among thresholds that reach the recall."""
    y, scores = _arrays(y, scores)
    return Curve.of(y, scores).fpr_at_recall(recall) if _two_classes(y) else None


def threshold_for_recall(y: np.ndarray, scores: np.ndarray, recall: float) -> float | None:
    """The highest threshold whose recall is at least `recall` (used to match the guard to the probe)."""
    y, scores = _arrays(y, scores)
    return Curve.of(y, scores).threshold_for_recall(recall) if _two_classes(y) else None


def best_accuracy_threshold(y: np.ndarray, scores: np.ndarray) -> tuple[float | None, float | None]:
    y, scores = _arrays(y, scores)
    return Curve.of(y, scores).best_accuracy_threshold(y) if _two_classes(y) else (None, None)


def at_threshold(y: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    y, scores = _arrays(y, scores)
    return threshold_sweep(y, scores, [threshold])[0]


def threshold_sweep(y: Sequence[bool], scores: Sequence[float], thresholds: Sequence[float]) -> list[dict[str, Any]]:
    """`at_threshold` at each threshold: counts by comparison, the values sklearn's scores give (0.0 on 0/0)."""
    y, scores = _arrays(y, scores)
    if not len(y):
        raise ValueError("Found empty input array: at least 1 sample is required.")  # as sklearn's confusion_matrix
    positive, negative = scores[y], scores[~y]
    rows = []
    for threshold in thresholds:
        tp, fp = int(np.count_nonzero(positive >= threshold)), int(np.count_nonzero(negative >= threshold))
        fn, tn = len(positive) - tp, len(negative) - fp
        rows.append({
            "threshold": float(threshold),
            "accuracy": (tp + tn) / len(y),
            "precision": tp / (tp + fp) if tp + fp else 0.0,
            "recall": tp / (tp + fn) if tp + fn else 0.0,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
            "fpr": fp / (fp + tn) if fp + tn else 0.0,
            "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        })
    return rows


def score_metrics(y: Sequence[bool], scores: Sequence[float], threshold: float, spec: EvaluateSpec,
                  name: str = "", warn_one_class: bool = True) -> dict[str, Any]:
    """Everything the report shows for one score on one split: one sort for all the ranking metrics."""
    y, scores = _arrays(y, scores)
    two = _two_classes(y)
    if not two and warn_one_class:
        log.warning("%s: only one class among %d rows; ranking metrics are undefined", name or "scores", len(y))
    curve = Curve.of(y, scores) if two else None
    best_threshold, best_accuracy = curve.best_accuracy_threshold(y) if curve else (None, None)
    result: dict[str, Any] = {
        "count": int(len(y)),
        "n_true": int(y.sum()),
        "n_false": int((~y).sum()),
        "avg_score": float(scores.mean()) if len(scores) else None,
        "roc_auc": curve.roc_auc() if curve else None,
        "average_precision": curve.average_precision() if curve else None,
        **at_threshold(y, scores, threshold),
        "precision_at_recall": {str(r): curve.precision_at_recall(r) if curve else None for r in spec.recalls},
        "recall_at_fpr": {str(f): curve.recall_at_fpr(f) if curve else None for f in spec.fprs},
        "fpr_at_recall_0.99": curve.fpr_at_recall(0.99) if curve else None,
        "best_threshold": best_threshold,
        "best_accuracy": best_accuracy,
    }
    if spec.bootstrap and two:
        result["ci95"] = bootstrap_ci(y, scores, spec.bootstrap, spec.seed, spec.bootstrap_max_rows)
    return result


# ------------------------------------------------------------------------------------------- bootstrap
@dataclass(frozen=True)
class TieGroups:
    """Rows as keys `group + groups * label`, groups numbering the distinct scores in ascending order.

    A resample's metrics depend only on how many positives and negatives it draws from each group, which one
    `np.bincount` of the drawn keys gives (negatives in the first half, positives in the second): no sort per
    resample, and ties count as sklearn counts them.
    """

    keys: np.ndarray
    groups: int

    @classmethod
    def of(cls, y: np.ndarray, scores: np.ndarray) -> TieGroups:
        distinct, group = np.unique(scores, return_inverse=True)
        dtype = np.int32 if 2 * len(distinct) < 2**31 else np.int64
        return cls(group.astype(dtype).ravel() + len(distinct) * y.astype(dtype), len(distinct))


def resample_metrics(tie: TieGroups, idx: np.ndarray, recall: float = 0.99) -> tuple[float, float | None] | None:
    """(ROC AUC, precision@`recall`) of the resample of rows `idx`; None if it lacks a class.

    Equal to sklearn's `roc_auc_score` on `y[idx], scores[idx]` to rounding (the exact rational AUC here, a
    trapezoid sum there) and to `precision_at_recall` bitwise (the same float divisions).
    """
    counts = np.bincount(tie.keys[idx], minlength=2 * tie.groups)
    negative, positive = counts[: tie.groups], counts[tie.groups :]
    n_neg, n_pos = int(negative.sum()), int(positive.sum())
    if not n_neg or not n_pos:
        return None
    # AUC = P(score+ > score-) + P(tie) / 2: each positive wins over the negatives of lower groups, half its own
    neg_below = np.cumsum(negative) - negative
    auc = int(np.dot(positive, 2 * neg_below + negative)) / (2 * n_pos * n_neg)
    if recall <= 0:
        return auc, 1.0  # the (recall 0, precision 1) end point of sklearn's curve
    # Threshold at group g: tp = positives in groups >= g. Recall >= r only for the lowest groups: keep those
    # (one row of slack for rounding), then the exact float test on them.
    pos_below = np.cumsum(positive) - positive
    end = int(np.searchsorted(pos_below, int((1 - recall) * n_pos) + 1, side="right"))  # int key: no float copy
    tp, fp = n_pos - pos_below[:end], n_neg - neg_below[:end]
    reached = tp / n_pos >= recall  # sklearn's recall
    if not reached.any():
        return auc, None  # recall > 1
    return auc, float(np.max(tp[reached] / (tp[reached] + fp[reached])))


def stratified_sample(y: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of `rows` rows drawn without replacement, keeping the class ratio (at least one of each)."""
    positive, negative = np.flatnonzero(y), np.flatnonzero(~y)
    take_pos = int(np.clip(round(rows * len(positive) / len(y)), 1, rows - 1))
    take_pos = min(take_pos, len(positive))
    take_neg = min(rows - take_pos, len(negative))
    return np.sort(np.r_[rng.choice(positive, take_pos, replace=False), rng.choice(negative, take_neg, replace=False)])


def bootstrap_ci(y: np.ndarray, scores: np.ndarray, resamples: int, seed: int,
                 max_rows: int | None = None) -> dict[str, Any]:
    """Percentile 95% intervals of ROC AUC and precision@0.99 over seeded bootstrap resamples.

    Above `max_rows` rows the resamples come from a label-stratified sample of `max_rows` rows: the intervals are
    then those of a set that size, wider than the full set's (conservative). `rows` says how many rows were used,
    `resamples` how many resamples had both classes (the others are skipped).
    """
    y, scores = _arrays(y, scores)
    rng = np.random.default_rng(seed)
    if max_rows is not None and len(y) > max_rows:
        keep = stratified_sample(y, max_rows, rng)
        y, scores = y[keep], scores[keep]
    tie, m = TieGroups.of(y, scores), len(y)
    drawn = [resample_metrics(tie, rng.integers(0, m, m, dtype=np.int32 if m < 2**31 else np.int64), 0.99)
             for _ in range(resamples)]
    aucs = [d[0] for d in drawn if d is not None]
    precisions = [d[1] for d in drawn if d is not None and d[1] is not None]
    interval = lambda v: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else None  # noqa: E731
    return {"roc_auc": interval(aucs), "precision@0.99": interval(precisions), "rows": int(m),
            "resamples": len(aucs)}


# ------------------------------------------------------------------------------------------- by source
def by_source(y: Sequence[bool], scores: Sequence[float], sources: Sequence[str], threshold: float,
              spec: EvaluateSpec) -> dict[str, dict[str, Any]]:
    """`score_metrics` per source, without bootstrap, sources in sorted order.

    Rows are grouped by hashing the names once (pandas.factorize; np.unique sorts 2.5M strings, ~30x slower) and
    one sort of the codes, not by one string comparison over all rows per source.
    """
    y, scores = _arrays(y, scores)
    codes, names = pd.factorize(np.asarray(sources, dtype=object), use_na_sentinel=False)
    rank = np.empty(len(names), dtype=np.intp)
    rank[np.argsort(names, kind="stable")] = np.arange(len(names))
    codes = rank[codes]  # codes in sorted-name order
    order = np.argsort(codes, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(codes, minlength=len(names)))]
    quiet = spec.model_copy(update={"bootstrap": 0})
    out = {}
    for i, source in enumerate(sorted(names.tolist())):
        rows = order[bounds[i] : bounds[i + 1]]
        # a corpus is often all harmful or all benign by construction: no warning per source
        out[source] = score_metrics(y[rows], scores[rows], threshold, quiet, name=source, warn_one_class=False)
    return out


#: Where prompt-length buckets end: the quartiles, and the 95th percentile for a long tail.
LENGTH_QUANTILES = (0.25, 0.5, 0.75, 0.95)


def length_buckets(n_tokens: np.ndarray) -> np.ndarray:
    """Each row's prompt-length bucket (tokens after the chat template), as a name that sorts in length order:
    "1: 12-41 tokens", ... The edges are the quantiles of these rows' lengths (the data's own), so a probe
    that learned length instead of intent shows a bucket where it fails."""
    n_tokens = np.asarray(n_tokens, np.int64)
    if not len(n_tokens):
        return np.array([], dtype=object)
    edges = np.unique(np.quantile(n_tokens, LENGTH_QUANTILES, method="higher").astype(np.int64))
    index = np.searchsorted(edges, n_tokens, side="left")  # bucket i holds (edges[i-1], edges[i]]
    lows = np.r_[n_tokens.min(), edges + 1]
    highs = np.r_[edges, n_tokens.max()]
    names = np.array([f"{i + 1}: {lows[i]}-{highs[i]} tokens" for i in range(len(edges) + 1)], dtype=object)
    return names[index]


def _arrays(y: Sequence[bool], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(y, dtype=bool), np.asarray(scores, dtype=np.float64)


def _two_classes(y: np.ndarray) -> bool:
    return bool(y.any()) and not bool(y.all())
