"""Probe registry, CV with Ray Tune, artifacts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from guardray import probes
from guardray.probes import artifact
from guardray.probes.cv import cross_validate, expand_grid, run_probes
from guardray.probes.registry import PROBE_TYPES, build_probe, probe_scores
from guardray.spec import ProbesSpec, validate_spec
from guardray.storage import resolve
from tests.conftest import small_spec
from tests.synthetic import write_feature_parts


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
    artifact.save(pipeline, {"type": name, "feature": "act_last_L1"}, tmp_path / name)
    loaded = probes.load(tmp_path / name)
    np.testing.assert_allclose(loaded.score(x), probe_scores(pipeline, x), rtol=1e-5, atol=1e-4)  # float64 vs sklearn float32
    assert (tmp_path / name / "probe.pkl").exists() != PROBE_TYPES[name].linear


def test_probes_stage_trials_read_only_their_own_column(ray_local: None, tmp_path: Path) -> None:
    """Each Tune trial reads its own column of the train split from the parquet; trials run concurrently; the
    refits write structured artifacts; the driver never holds a feature matrix."""
    import tracemalloc

    import ray.train.torch  # noqa: F401 - imported before tracing: module objects are not feature data
    import ray.tune  # noqa: F401

    dim = 4096  # wide, so one column (~37 MB) dwarfs what Tune itself allocates on the driver (~10 MB)
    columns = {"act_last_L1": (dim, 3.0), "act_mean_L1": (dim, 0.0)}
    data = write_feature_parts(tmp_path / "features", columns, rows=3000, parts=4)
    spec = validate_spec(small_spec(str(tmp_path / "out"), probes={
        "grid": [{"type": "ridge", "params": {"alpha": [1.0, 10.0]}}], "cv": {"folds": 3},
        "max_concurrent_trials": 2}))
    train = data["split"] == "train"
    column_bytes = int(train.sum()) * dim * 4  # one column's float32 train matrix
    out = resolve(str(tmp_path / "probes"))
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        summary = run_probes(spec, {"features": resolve(str(tmp_path / "features"))}, out)
        driver_peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    # numpy registers its buffers with tracemalloc: reading even one column on the driver would show here
    assert driver_peak < column_bytes / 2, (driver_peak, column_bytes)

    results = pd.read_parquet(tmp_path / "probes" / "cv_results.parquet")
    assert sorted(results["feature"]) == ["act_last_L1", "act_last_L1", "act_mean_L1", "act_mean_L1"]
    for row in results.itertuples():
        assert row.columns_read.split(",") == [row.feature, "harmful", "split"], row
        assert row.train_rows == train.sum()
    assert results["pid"].nunique() == 2, "two trial actors at once on two CPUs"
    first, second = results.sort_values("trial_start").iloc[:2].itertuples()
    assert min(first.trial_end, second.trial_end) > max(first.trial_start, second.trial_start), "trials overlap"

    assert summary["best"]["id"]["feature"] == "act_last_L1"
    for probe in summary["probes"]:
        identity = probe["id"]
        assert (identity["layer"], identity["type"]) == (1, "ridge")
        assert identity["pooling"] == identity["feature"].split("_")[1] and identity["params"]["alpha"] in (1.0, 10.0)
        loaded = probes.load(tmp_path / "probes" / "artifacts" / probe["name"])
        assert {k: loaded.meta[k] for k in identity} == identity
    best = probes.load(tmp_path / "probes" / "artifacts" / summary["best"]["name"])
    assert roc_auc_score(data["harmful"][~train], best.score(data["act_last_L1"][~train])) > 0.95
