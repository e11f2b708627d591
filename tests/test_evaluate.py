"""Metrics against sklearn and hand-checked arrays, including precision@r and one-class edge cases; the vectorised
bootstrap and the one-sort score_metrics against the sklearn calls they replace (issue 11)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from sklearn import metrics

from guardray.evaluate import (TieGroups, at_threshold, best_accuracy_threshold, bootstrap_ci, by_source,
                               fpr_at_recall, precision_at_recall, recall_at_fpr, resample_metrics, score_metrics,
                               stratified_sample, threshold_for_recall, threshold_sweep)
from guardray.jobspec import EvaluateSpec

Y = np.array([0, 0, 0, 0, 1, 1, 1, 1], dtype=bool)
S = np.array([-3.0, -1.0, 0.5, 2.0, -0.5, 1.0, 3.0, 4.0])


def test_precision_at_recall_hand_checked() -> None:
    # sorted by score: 4(+) 3(+) 2(-) 1(+) .5(-) -.5(+) -1(-) -3(-)
    assert precision_at_recall(Y, S, 0.5) == 1.0  # threshold 3: recall 2/4, precision 2/2
    assert precision_at_recall(Y, S, 0.75) == 0.75  # threshold 1: 3 tp, 1 fp
    assert precision_at_recall(Y, S, 1.0) == pytest.approx(4 / 6)  # threshold -0.5: 4 tp, 2 fp
    assert recall_at_fpr(Y, S, 0.0) == 0.5
    # collinear ROC points are real thresholds: sklearn's default curve drops them, the metrics must not
    tied_y, tied_s = np.array([1, 0, 1, 0, 1, 0, 0, 0, 0, 0]), np.array([3, 3, 2, 2, 1, 1, 0, 0, 0, 0])
    assert recall_at_fpr(tied_y, tied_s, 0.3) == pytest.approx(2 / 3)
    assert fpr_at_recall(tied_y, tied_s, 0.6) == pytest.approx(2 / 7)
    assert recall_at_fpr(Y, S, 0.25) == 0.75
    assert threshold_for_recall(Y, S, 0.75) == 1.0
    assert best_accuracy_threshold(Y, S) == (3.0, 0.75)  # ties with 1.0; the strictest threshold wins


def test_threshold_metrics_equal_sklearn() -> None:
    m = at_threshold(Y, S, 0.0)
    predicted = S >= 0
    assert m["accuracy"] == metrics.accuracy_score(Y, predicted)
    assert m["precision"] == metrics.precision_score(Y, predicted)
    assert m["recall"] == metrics.recall_score(Y, predicted)
    assert m["f1"] == metrics.f1_score(Y, predicted)
    assert m["confusion"] == {"tn": 2, "fp": 2, "fn": 1, "tp": 3}


def test_score_metrics_and_bootstrap_are_seeded() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.4
    s = y * 1.5 + rng.normal(size=300)
    spec = EvaluateSpec(bootstrap=100, seed=3)
    a, b = score_metrics(y, s, 0.0, spec), score_metrics(y, s, 0.0, spec)
    assert a["roc_auc"] == metrics.roc_auc_score(y, s)
    assert a["average_precision"] == metrics.average_precision_score(y, s)
    assert a["ci95"] == b["ci95"]
    low, high = a["ci95"]["roc_auc"]
    assert low < a["roc_auc"] < high
    assert set(a["precision_at_recall"]) == {str(r) for r in spec.recalls}


def test_one_class_warns_instead_of_crashing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        m = score_metrics(np.ones(5, dtype=bool), np.arange(5.0) - 1, 0.0, EvaluateSpec(bootstrap=10))
    assert m["roc_auc"] is None and m["precision_at_recall"]["0.99"] is None and "ci95" not in m
    assert m["recall"] == 0.8
    assert "only one class" in caplog.text


def test_sweep() -> None:
    rows = threshold_sweep(Y, S, [-10, 0, 10])
    assert [r["recall"] for r in rows] == [1.0, 0.75, 0.0]
    assert rows[0]["confusion"] == {"tn": 0, "fp": 4, "fn": 0, "tp": 4}


# ----------------------------------------------------------------------------- vectorised vs sklearn
def _sk_precision_at_recall(y: np.ndarray, s: np.ndarray, recall: float) -> float | None:
    precision, rec, _ = metrics.precision_recall_curve(y, s)
    return float(precision[rec >= recall].max()) if (rec >= recall).any() else None


def _reference_score_metrics(y: np.ndarray, s: np.ndarray, threshold: float, spec: EvaluateSpec) -> dict:
    """What score_metrics computed before issue 11: one sklearn call (one sort) per metric and level."""
    fprs, tprs, _ = metrics.roc_curve(y, s)
    full_fprs, full_tprs, full_thresholds = metrics.roc_curve(y, s, drop_intermediate=False)
    accuracy = (full_tprs * y.sum() + (1 - full_fprs) * (len(y) - y.sum())) / len(y)
    best = int(np.argmax(accuracy))
    predicted = s >= threshold
    tn, fp, fn, tp = metrics.confusion_matrix(y, predicted, labels=[False, True]).ravel()
    return {
        "count": len(y), "n_true": int(y.sum()), "n_false": int((~y).sum()), "avg_score": float(s.mean()),
        "roc_auc": float(metrics.roc_auc_score(y, s)),
        "average_precision": float(metrics.average_precision_score(y, s)),
        "threshold": float(threshold),
        "accuracy": float(metrics.accuracy_score(y, predicted)),
        "precision": float(metrics.precision_score(y, predicted, zero_division=0)),
        "recall": float(metrics.recall_score(y, predicted, zero_division=0)),
        "f1": float(metrics.f1_score(y, predicted, zero_division=0)),
        "fpr": float(fp / (fp + tn)) if fp + tn else 0.0,
        "confusion": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
        "precision_at_recall": {str(r): _sk_precision_at_recall(y, s, r) for r in spec.recalls},
        "recall_at_fpr": {str(f): float(full_tprs[full_fprs <= f].max()) for f in spec.fprs},
        "fpr_at_recall_0.99": float(full_fprs[full_tprs >= 0.99].min()),
        "best_threshold": float(full_thresholds[best]), "best_accuracy": float(accuracy[best]),
    }


def _data(n: int, positives: float, seed: int, decimals: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Planted signal; `decimals` rounds the scores into heavy ties."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < positives
    s = y * 1.5 + rng.normal(size=n)
    return y, (np.round(s, decimals) if decimals is not None else s)


@pytest.mark.parametrize("positives", [0.05, 0.5])
@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_score_metrics_equal_the_sklearn_per_metric_values(positives: float, decimals: int | None) -> None:
    y, s = _data(5000, positives, seed=7, decimals=decimals)
    spec = EvaluateSpec(bootstrap=0, recalls=(0.0, 0.1, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0),
                        fprs=(0.0, 0.001, 0.01, 0.05, 0.5))
    for threshold in (-1.0, 0.0, 0.75, 100.0):
        assert score_metrics(y, s, threshold, spec) == _reference_score_metrics(y, s, threshold, spec)  # bitwise


@pytest.mark.parametrize("decimals", [None, 1])
def test_standalone_ranking_metrics_equal_sklearn(decimals: int | None) -> None:
    y, s = _data(2000, 0.3, seed=11, decimals=decimals)
    fprs, tprs, thresholds = metrics.roc_curve(y, s, drop_intermediate=False)
    for recall in (0.0, 0.33, 0.5, 0.9, 0.99, 1.0):
        assert threshold_for_recall(y, s, recall) == float(thresholds[tprs >= recall].max())
        assert precision_at_recall(y, s, recall) == _sk_precision_at_recall(y, s, recall)
    reference = _reference_score_metrics(y, s, 0.0, EvaluateSpec())
    assert best_accuracy_threshold(y, s) == (reference["best_threshold"], reference["best_accuracy"])
    assert fpr_at_recall(y, s, 0.99) == reference["fpr_at_recall_0.99"]
    assert recall_at_fpr(y, s, 0.01) == reference["recall_at_fpr"]["0.01"]
    assert precision_at_recall(y, s, 1.01) is None and recall_at_fpr(y, s, -1.0) == 0.0


def test_sweep_equals_sklearn_at_every_threshold() -> None:
    y, s = _data(3000, 0.2, seed=5, decimals=1)
    thresholds = [-np.inf, -10, -0.5, 0.0, 0.5, 1.3, 2.0, 10, np.inf]
    for row, t in zip(threshold_sweep(y, s, thresholds), thresholds):
        reference = _reference_score_metrics(y, s, t, EvaluateSpec())
        assert row == {k: reference[k] for k in row}  # bitwise
        plain = [v for k, v in row.items() if k != "confusion"] + list(row["confusion"].values())
        assert all(type(v) in (float, int) for v in plain)  # JSON-serialisable, as sklearn's values were cast


def test_nan_scores_are_rejected_as_sklearn_does() -> None:
    with pytest.raises(ValueError):
        score_metrics(Y, np.where(S > 3, np.nan, S), 0.0, EvaluateSpec(bootstrap=0))


@pytest.mark.parametrize("positives", [0.03, 0.5])
@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_resample_metrics_equal_sklearn_on_the_resample(positives: float, decimals: int | None) -> None:
    y, s = _data(1000, positives, seed=3, decimals=decimals)
    tie = TieGroups.of(y, s)
    rng = np.random.default_rng(0)
    for _ in range(10):
        idx = rng.integers(0, len(y), len(y))
        auc = metrics.roc_auc_score(y[idx], s[idx])
        precisions, recalls, _ = metrics.precision_recall_curve(y[idx], s[idx])
        for recall in (0.5, 0.9, 0.99, 1.0):
            got = resample_metrics(tie, idx, recall)
            assert got[0] == pytest.approx(auc, rel=1e-12, abs=1e-14)
            assert got[1] == precisions[recalls >= recall].max()  # bitwise: the same float divisions


def test_resample_metrics_at_the_recall_boundary_and_with_one_class() -> None:
    # 100 positives: recall 0.99 is reached exactly with 99 of them, where float rounding matters
    y = np.r_[np.ones(100, dtype=bool), np.zeros(400, dtype=bool)]
    s = np.r_[np.linspace(0, 3, 100), np.linspace(-2, 1, 400)]
    tie, everything = TieGroups.of(y, s), np.arange(500)
    assert resample_metrics(tie, everything, 0.99)[1] == _sk_precision_at_recall(y, s, 0.99)
    assert resample_metrics(tie, everything, 0.99)[0] == pytest.approx(metrics.roc_auc_score(y, s), rel=1e-12)
    assert resample_metrics(tie, np.full(500, 3)) is None  # one positive drawn 500 times


def _sklearn_bootstrap(y: np.ndarray, s: np.ndarray, resamples: int, seed: int) -> dict:
    """The pre-issue-11 loop (sklearn per resample) on the same index draws as bootstrap_ci without a cap."""
    rng = np.random.default_rng(seed)
    aucs, precisions = [], []
    for _ in range(resamples):
        idx = rng.integers(0, len(y), len(y), dtype=np.int32)
        if y[idx].all() or not y[idx].any():
            continue
        aucs.append(metrics.roc_auc_score(y[idx], s[idx]))
        precisions.append(_sk_precision_at_recall(y[idx], s[idx], 0.99))
    return {"roc_auc": [np.percentile(aucs, 2.5), np.percentile(aucs, 97.5)],
            "precision@0.99": [np.percentile(precisions, 2.5), np.percentile(precisions, 97.5)],
            "resamples": len(aucs)}


@pytest.mark.parametrize("n, positives", [(400, 0.4), (60, 0.03)])  # the second skips one-class resamples
def test_bootstrap_equals_the_sklearn_loop(n: int, positives: float) -> None:
    y, s = _data(n, positives, seed=2, decimals=1)
    y[0] = True  # at least one positive
    ci, expected = bootstrap_ci(y, s, 100, seed=4), _sklearn_bootstrap(y, s, 100, seed=4)
    assert ci["rows"] == n and ci["resamples"] == expected["resamples"]
    if n == 60:
        assert ci["resamples"] < 100
    assert ci["roc_auc"] == pytest.approx(expected["roc_auc"], rel=1e-12)
    assert ci["precision@0.99"] == pytest.approx(expected["precision@0.99"], rel=1e-12)


def test_stratified_sample_keeps_the_class_ratio() -> None:
    y = np.zeros(20_000, dtype=bool)
    y[np.random.default_rng(0).choice(20_000, 1400, replace=False)] = True  # 7%
    keep = stratified_sample(y, 1000, np.random.default_rng(1))
    assert len(keep) == len(np.unique(keep)) == 1000 and (np.diff(keep) > 0).all()
    assert y[keep].sum() == 70
    rare = np.zeros(20_000, dtype=bool)
    rare[123] = True
    keep = stratified_sample(rare, 1000, np.random.default_rng(1))
    assert rare[keep].sum() == 1 and len(keep) == 1000  # one positive kept, not rounded away


def test_capped_bootstrap_reports_rows_and_is_seeded_and_conservative() -> None:
    y, s = _data(20_000, 0.1, seed=9)
    full = bootstrap_ci(y, s, 200, seed=1)
    capped = bootstrap_ci(y, s, 200, seed=1, max_rows=2000)
    assert full["rows"] == 20_000 and capped["rows"] == 2000 and capped["resamples"] == 200
    assert capped == bootstrap_ci(y, s, 200, seed=1, max_rows=2000)
    assert capped != bootstrap_ci(y, s, 200, seed=2, max_rows=2000)
    width = lambda ci: ci["roc_auc"][1] - ci["roc_auc"][0]  # noqa: E731
    assert width(capped) > 2 * width(full)  # ~sqrt(10) wider: a tenth of the rows
    auc = metrics.roc_auc_score(y, s)
    assert capped["roc_auc"][0] < auc < capped["roc_auc"][1]
    # score_metrics takes the cap from the spec
    spec = EvaluateSpec(bootstrap=50, bootstrap_max_rows=1000, seed=3)
    assert score_metrics(y, s, 0.0, spec)["ci95"] == bootstrap_ci(y, s, 50, seed=3, max_rows=1000)


def test_by_source_equals_score_metrics_per_source() -> None:
    y, s = _data(3000, 0.3, seed=8, decimals=1)
    sources = np.random.default_rng(8).choice(["b", "a", "c", "harmful-only"], 3000)
    y[sources == "harmful-only"] = True
    spec = EvaluateSpec(bootstrap=100)
    out = by_source(y, s, list(sources), 0.0, spec)
    assert list(out) == ["a", "b", "c", "harmful-only"]
    quiet = EvaluateSpec(bootstrap=0)
    for name, got in out.items():
        mask = sources == name
        assert got == score_metrics(y[mask], s[mask], 0.0, quiet) and "ci95" not in got
    assert out["harmful-only"]["roc_auc"] is None
