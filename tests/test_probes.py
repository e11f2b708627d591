"""Probe registry, CV with Ray Tune, artifacts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from guardray import probes
from guardray.probes import artifact
from guardray.probes.cv import cross_validate, expand_grid
from guardray.probes.registry import PROBE_TYPES, build_probe, probe_scores
from guardray.jobspec import ProbesSpec
from guardray.storage import resolve


def _data(n: int = 240, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.5
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x[:, 0] += 2.0 * y
    return x, y


def test_grid_expands_lists() -> None:
    spec = ProbesSpec.model_validate({"grid": [{"type": "logistic_regression", "params": {"C": [0.1, 1], "max_iter": 100}},
                                               {"type": "naive_bayes"}]})
    configs = expand_grid(spec, ["act_last_L1", "act_mean_L1"])
    assert len(configs) == 2 * 2 + 2
    assert {c["params"].get("C") for c in configs} == {0.1, 1, None}


def test_cv_is_reproducible_with_a_seed() -> None:
    x, y = _data()
    config = {"type": "logistic_regression", "preprocessing": "standardize", "params": {"C": 0.1}}
    a = cross_validate(config, x, y, 5, seed=1, max_fpr=0.05)
    b = cross_validate(config, x, y, 5, seed=1, max_fpr=0.05)
    c = cross_validate(config, x, y, 5, seed=2, max_fpr=0.05)
    assert {k: v for k, v in a.items() if k != "fit_seconds"} == {k: v for k, v in b.items() if k != "fit_seconds"}
    assert a["roc_auc_mean"] != c["roc_auc_mean"]
    assert a["roc_auc_mean"] > 0.8


@pytest.mark.parametrize("name", sorted(PROBE_TYPES))
def test_every_probe_type_scores_and_round_trips(name: str, tmp_path: Path) -> None:
    x, y = _data()
    pipeline = build_probe(name, "standardize" if name != "ridge" else "normalize", {}).fit(x, y)
    artifact.save(pipeline, resolve(str(tmp_path / name)), {"type": name, "feature": "act_last_L1"})
    loaded = probes.load(resolve(str(tmp_path / name)), allow_pickle=True)  # the non-linear types are pickled: opt in
    np.testing.assert_allclose(loaded.score(x), probe_scores(pipeline, x), rtol=1e-5, atol=1e-4)  # float64 vs sklearn float32
    assert (tmp_path / name / "probe.pkl").exists() != PROBE_TYPES[name].linear
