"""Metrics against sklearn and hand-checked arrays, including precision@r and one-class edge cases."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from sklearn import metrics

from guardray.evaluate import (at_threshold, best_accuracy_threshold, precision_at_recall, recall_at_fpr,
                               score_metrics, threshold_for_recall, threshold_sweep)
from guardray.spec import EvaluateSpec

Y = np.array([0, 0, 0, 0, 1, 1, 1, 1], dtype=bool)
S = np.array([-3.0, -1.0, 0.5, 2.0, -0.5, 1.0, 3.0, 4.0])


def test_precision_at_recall_hand_checked() -> None:
    # sorted by score: 4(+) 3(+) 2(-) 1(+) .5(-) -.5(+) -1(-) -3(-)
    assert precision_at_recall(Y, S, 0.5) == 1.0  # threshold 3: recall 2/4, precision 2/2
    assert precision_at_recall(Y, S, 0.75) == 0.75  # threshold 1: 3 tp, 1 fp
    assert precision_at_recall(Y, S, 1.0) == pytest.approx(4 / 6)  # threshold -0.5: 4 tp, 2 fp
    assert recall_at_fpr(Y, S, 0.0) == 0.5
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
