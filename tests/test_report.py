"""The probes stage (Tune CV, refits, the Ray Train torch probe) and the report stage on gs:// (a real
fake-gcs-server), where the data is: each trial reads only its own column, the driver never holds a feature
matrix, and the merged scores.parquet lines up with the features row for row. One test, so the suite pays for
one Tune start and one Ray Train start."""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from guardray import probes
from guardray.probes.cv import run_probes
from guardray.probes.torch_probe import TORCH_PROBE_TYPE, train_dataset
from guardray.report import SCORES_DIR, run_report
from guardray.spec import validate_spec
from guardray.storage import Location, resolve
from tests.conftest import small_spec
from tests.synthetic import write_feature_parts

DIM = 4096  # wide, so one column (~27 MB in float32) dwarfs what Tune and Train allocate on the driver (~10 MB)


def _download(location: Location, target: Path) -> Path:
    target.mkdir(parents=True)
    for name in location.list():
        (target / name).write_bytes(location.join(name).read_bytes())
    return target


@pytest.mark.slow
def test_probes_and_report_stages_on_gcs_where_the_data_is(ray_local: None, gcs_bucket: str, tmp_path: Path) -> None:
    import ray.train.torch  # noqa: F401 - imported before tracing: module objects are not feature data
    import ray.tune  # noqa: F401
    from ray.data.dataset import MaterializedDataset

    columns = {"act_last_L2": (DIM, 3.0), "act_mean_L2": (DIM, 0.0)}
    data = write_feature_parts(tmp_path / "features", columns, rows=2200, parts=4, unlabelled_every=10)
    known = data["labelled"]  # rows without a label are neither trained on, scored nor counted
    train = known & (data["split"] == "train")
    features = resolve(f"{gcs_bucket}/features")
    for part in sorted((tmp_path / "features" / "parts").iterdir()):
        features.join("parts", part.name).write_bytes(part.read_bytes())
    spec = validate_spec(small_spec(f"{gcs_bucket}/out", probes={
        "grid": [{"type": "ridge", "params": {"alpha": [1.0, 10.0]}}], "cv": {"folds": 3}, "max_concurrent_trials": 2,
        "torch_probe": {"enabled": True, "workers": 2, "epochs": 3, "lr": 0.01, "batch_size": 128,
                        "cpus_per_worker": 0.5}},
        evaluate={"bootstrap": 50, "bootstrap_max_rows": 100}))
    probes_out, report_out = resolve(f"{gcs_bucket}/probes"), resolve(f"{gcs_bucket}/report")

    # the torch probe's rows come from a lazy parquet read, not from a table on the driver
    assert not isinstance(train_dataset(features, "act_last_L2", "harmful"), MaterializedDataset)
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        summary = run_probes(spec, {"features": features}, probes_out)
        driver_peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    column_bytes = int(train.sum()) * DIM * 4  # one column's float32 train matrix
    # numpy registers its buffers with tracemalloc: reading even one column on the driver would show here
    assert driver_peak < column_bytes / 2, (driver_peak, column_bytes)

    # Tune: each trial read only its own column (and the label and split it filters on); two trials at once
    with probes_out.join("cv_results.parquet").fs.open_input_file(probes_out.join("cv_results.parquet").path) as f:
        results = pq.read_table(f).to_pandas()
    assert sorted(results["feature"]) == ["act_last_L2", "act_last_L2", "act_mean_L2", "act_mean_L2"]
    for row in results.itertuples():
        assert row.columns_read.split(",") == [row.feature, "harmful", "split"], row
        assert row.train_rows == train.sum()
    assert results["pid"].nunique() == 2, "two trial actors at once on two CPUs"
    first, second = results.sort_values("trial_start").iloc[:2].itertuples()
    assert min(first.trial_end, second.trial_end) > max(first.trial_start, second.trial_start), "trials overlap"

    # refits: structured identities in the summary and in the artifacts written on gs://
    best = summary["best"]
    assert best["name"] == "act_last_L2-ridge" and best["id"]["feature"] == "act_last_L2"
    loaded = {}
    for probe in summary["probes"]:
        identity = probe["id"]
        assert (identity["layer"], identity["pooling"]) == (2, identity["feature"].split("_")[1])
        loaded[probe["name"]] = probes.load(_download(probes_out.join("artifacts", probe["name"]), tmp_path / probe["name"]))
        assert {k: loaded[probe["name"]].meta[k] for k in identity} == identity

    # the torch probe: 2 Ray Train workers; its standardisation is the whole train split's (all-reduced over both
    # shards: rank 0 alone would hold its half's), its loss falls, its checkpoints are kept on gs://
    torch_name = f"act_last_L2-{TORCH_PROBE_TYPE}"
    torch_probe = loaded[torch_name]
    whole = data["act_last_L2"][train].astype(np.float64)
    np.testing.assert_allclose(torch_probe.mean, whole.mean(axis=0), rtol=0, atol=1e-4)
    np.testing.assert_allclose(torch_probe.scale, whole.std(axis=0), rtol=0, atol=1e-4)
    history = torch_probe.meta["history"]
    assert [h["rows"] for h in history] == [int(train.sum())] * 3 and history[-1]["loss"] < history[0]["loss"]
    run_dir = probes_out.join("torch_train", "torch-probe-act_last_L2")
    files = run_dir.fs.get_file_info(pafs.FileSelector(run_dir.path, recursive=True))
    kept = {f.path.removeprefix(run_dir.path + "/").split("/")[0] for f in files if "/checkpoint_2" in f.path}
    assert len(kept) == 2, kept  # one checkpoint per epoch was reported; the newest two are kept

    probes_out.join("summary.json").write_json(summary)
    result = run_report(spec, {"features": features, "probes": probes_out}, report_out)
    assert result["best_probe"] == "act_last_L2-ridge"
    assert not report_out.join(SCORES_DIR).exists(), "per-scorer files are merged, then removed"
    with report_out.join("scores.parquet").fs.open_input_file(report_out.join("scores.parquet").path) as f:
        scores = pq.read_table(f).to_pandas()
    # row for row: the features' labelled ids in order, the guard column as extracted, each probe its artifact's
    assert scores["id"].tolist() == [f"r{i}" for i in np.flatnonzero(known)]
    np.testing.assert_allclose(scores["guard"], data["guard_score"][known], rtol=1e-6)
    np.testing.assert_array_equal(scores["label"], data["harmful"][known])
    for name, probe in loaded.items():
        np.testing.assert_allclose(scores[name], probe.score(data[probe.meta["feature"]][known]), rtol=1e-9)

    report = report_out.join("report.json").read_json()
    test = data["split"][known] == "test"
    entry = report["probes"][result["best_probe"]]
    assert entry["test"]["count"] == report["test_rows"] == int(test.sum())
    auc = roc_auc_score(data["harmful"][known][test], scores[result["best_probe"]][test])
    assert entry["test"]["roc_auc"] == pytest.approx(auc) and auc > 0.95
    assert report["probes"][torch_name]["test"]["roc_auc"] > 0.95
    assert entry["test"]["ci95"]["rows"] == 100  # the bootstrap ran on a capped, stratified sample
    assert f"| probe {torch_name} |" in report["comparison_table"]  # the Ray Train probe is in the headline table
    assert report["comparison"]["probe"] == result["best_probe"]
    assert report_out.join("report.md").exists() and report_out.join("roc_curve.png").exists()
