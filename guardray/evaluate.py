"""Metrics of a continuous score against binary labels, built on sklearn.metrics.

`precision@r` is the highest precision over thresholds whose recall is at least r; `recall@fpr` the highest
recall over thresholds whose false-positive rate is at most f. With one class only the ranking metrics are
undefined: they come back as None with a warning instead of an exception.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Sequence

import numpy as np
from sklearn import metrics

from guardray.spec import EvaluateSpec

log = logging.getLogger(__name__)


def precision_at_recall(y: np.ndarray, scores: np.ndarray, recall: float) -> float | None:
    if not _two_classes(y):
        return None
    precision, rec, _ = metrics.precision_recall_curve(y, scores)
    ok = rec >= recall
    return float(precision[ok].max()) if ok.any() else None


def recall_at_fpr(y: np.ndarray, scores: np.ndarray, fpr: float) -> float | None:
    if not _two_classes(y):
        return None
    fprs, tprs, _ = metrics.roc_curve(y, scores)
    ok = fprs <= fpr
    return float(tprs[ok].max()) if ok.any() else 0.0


def fpr_at_recall(y: np.ndarray, scores: np.ndarray, recall: float) -> float | None:
    """The lowest false-positive rate among thresholds that reach the recall."""
    if not _two_classes(y):
        return None
    fprs, tprs, _ = metrics.roc_curve(y, scores)
    return float(fprs[tprs >= recall].min())


def threshold_for_recall(y: np.ndarray, scores: np.ndarray, recall: float) -> float | None:
    """The highest threshold whose recall is at least `recall` (used to match the guard to the probe)."""
    if not _two_classes(y):
        return None
    _, tprs, thresholds = metrics.roc_curve(y, scores, drop_intermediate=False)
    ok = tprs >= recall
    return float(thresholds[ok].max()) if ok.any() else None


def best_accuracy_threshold(y: np.ndarray, scores: np.ndarray) -> tuple[float | None, float | None]:
    if not _two_classes(y):
        return None, None
    fprs, tprs, thresholds = metrics.roc_curve(y, scores, drop_intermediate=False)
    positives, negatives = y.sum(), len(y) - y.sum()
    accuracy = (tprs * positives + (1 - fprs) * negatives) / len(y)
    best = int(np.argmax(accuracy))
    return float(thresholds[best]), float(accuracy[best])


def at_threshold(y: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    predicted = scores >= threshold
    tn, fp, fn, tp = metrics.confusion_matrix(y, predicted, labels=[False, True]).ravel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-division cases come back as 0.0
        return {
            "threshold": float(threshold),
            "accuracy": float(metrics.accuracy_score(y, predicted)),
            "precision": float(metrics.precision_score(y, predicted, zero_division=0)),
            "recall": float(metrics.recall_score(y, predicted, zero_division=0)),
            "f1": float(metrics.f1_score(y, predicted, zero_division=0)),
            "fpr": float(fp / (fp + tn)) if fp + tn else 0.0,
            "confusion": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
        }


def score_metrics(y: Sequence[bool], scores: Sequence[float], threshold: float, spec: EvaluateSpec,
                  name: str = "", warn_one_class: bool = True) -> dict[str, Any]:
    """Everything the report shows for one score on one split."""
    y = np.asarray(y, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    two = _two_classes(y)
    if not two and warn_one_class:
        log.warning("%s: only one class among %d rows; ranking metrics are undefined", name or "scores", len(y))
    best_threshold, best_accuracy = best_accuracy_threshold(y, scores)
    result: dict[str, Any] = {
        "count": int(len(y)),
        "n_true": int(y.sum()),
        "n_false": int((~y).sum()),
        "avg_score": float(scores.mean()) if len(scores) else None,
        "roc_auc": float(metrics.roc_auc_score(y, scores)) if two else None,
        "average_precision": float(metrics.average_precision_score(y, scores)) if two else None,
        **at_threshold(y, scores, threshold),
        "precision_at_recall": {str(r): precision_at_recall(y, scores, r) for r in spec.recalls},
        "recall_at_fpr": {str(f): recall_at_fpr(y, scores, f) for f in spec.fprs},
        "fpr_at_recall_0.99": fpr_at_recall(y, scores, 0.99),
        "best_threshold": best_threshold,
        "best_accuracy": best_accuracy,
    }
    if spec.bootstrap and two:
        result["ci95"] = bootstrap_ci(y, scores, spec.bootstrap, spec.seed)
    return result


def bootstrap_ci(y: np.ndarray, scores: np.ndarray, resamples: int, seed: int) -> dict[str, list[float] | None]:
    """Percentile 95% intervals of ROC AUC and precision@0.99 over seeded bootstrap resamples."""
    rng = np.random.default_rng(seed)
    aucs, precisions = [], []
    for _ in range(resamples):
        pick = rng.integers(0, len(y), len(y))
        if not _two_classes(y[pick]):
            continue
        aucs.append(metrics.roc_auc_score(y[pick], scores[pick]))
        precisions.append(precision_at_recall(y[pick], scores[pick], 0.99))
    interval = lambda v: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else None  # noqa: E731
    return {"roc_auc": interval(aucs), "precision@0.99": interval([p for p in precisions if p is not None])}


def threshold_sweep(y: Sequence[bool], scores: Sequence[float], thresholds: Sequence[float]) -> list[dict[str, Any]]:
    y, scores = np.asarray(y, dtype=bool), np.asarray(scores, dtype=np.float64)
    return [at_threshold(y, scores, t) for t in thresholds]


def by_source(y: Sequence[bool], scores: Sequence[float], sources: Sequence[str], threshold: float,
              spec: EvaluateSpec) -> dict[str, dict[str, Any]]:
    y, scores, sources = np.asarray(y, dtype=bool), np.asarray(scores), np.asarray(sources)
    quiet = spec.model_copy(update={"bootstrap": 0})
    out = {}
    for source in sorted(set(sources)):
        mask = sources == source
        # a corpus is often all harmful or all benign by construction: no warning per source
        out[source] = score_metrics(y[mask], scores[mask], threshold, quiet, name=source, warn_one_class=False)
    return out


def _two_classes(y: np.ndarray) -> bool:
    return len(np.unique(y)) == 2

