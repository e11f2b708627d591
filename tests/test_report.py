"""The probes and report stages on gs:// (a real fake-gcs-server): workers read their columns from GCS, write
artifacts and per-scorer scores there, and the merged scores.parquet lines up with the features row by row."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score

from guardray import probes
from guardray.probes.cv import run_probes
from guardray.report import SCORES_DIR, run_report
from guardray.spec import validate_spec
from guardray.storage import resolve
from tests.conftest import small_spec
from tests.synthetic import write_feature_parts


def test_probes_and_report_stages_on_gcs(ray_local: None, gcs_bucket: str, tmp_path: Path) -> None:
    columns = {"act_last_L2": (48, 1.5), "act_mean_L2": (32, 0.0)}
    data = write_feature_parts(tmp_path / "features", columns, rows=900, parts=3, unlabelled_every=10)
    known = data["labelled"]  # rows without a label are neither scored nor counted
    features = resolve(f"{gcs_bucket}/features")
    for part in sorted((tmp_path / "features" / "parts").iterdir()):
        features.join("parts", part.name).write_bytes(part.read_bytes())
    spec = validate_spec(small_spec(f"{gcs_bucket}/out", probes={
        "grid": [{"type": "logistic_regression", "params": {"C": 0.1}}], "cv": {"folds": 3}},
        evaluate={"bootstrap": 50, "bootstrap_max_rows": 100}))
    probes_out, report_out = resolve(f"{gcs_bucket}/probes"), resolve(f"{gcs_bucket}/report")
    summary = run_probes(spec, {"features": features}, probes_out)
    probes_out.join("summary.json").write_json(summary)
    result = run_report(spec, {"features": features, "probes": probes_out}, report_out)

    assert result["best_probe"] == "act_last_L2-logistic_regression"
    assert not report_out.join(SCORES_DIR).exists(), "per-scorer files are merged, then removed"
    with report_out.join("scores.parquet").fs.open_input_file(report_out.join("scores.parquet").path) as f:
        scores = pq.read_table(f).to_pandas()
    # row for row: the features' ids in order, the guard column as extracted, each probe as its artifact scores
    assert scores["id"].tolist() == [f"r{i}" for i in np.flatnonzero(known)]
    np.testing.assert_allclose(scores["guard"], data["guard_score"][known], rtol=1e-6)
    np.testing.assert_array_equal(scores["label"], data["harmful"][known])
    local = tmp_path / "artifact"
    local.mkdir()
    for name in ("probe.json", "probe.safetensors"):
        (local / name).write_bytes(probes_out.join("artifacts", result["best_probe"], name).read_bytes())
    expected = probes.load(local).score(data["act_last_L2"][known])
    np.testing.assert_allclose(scores[result["best_probe"]], expected, rtol=1e-9)

    report = report_out.join("report.json").read_json()
    test = data["split"][known] == "test"
    entry = report["probes"][result["best_probe"]]
    assert entry["test"]["count"] == report["test_rows"] == int(test.sum())
    auc = roc_auc_score(data["harmful"][known][test], scores[result["best_probe"]][test])
    assert entry["test"]["roc_auc"] == pytest.approx(auc) and auc > 0.9
    assert entry["test"]["ci95"]["rows"] == 100  # the bootstrap ran on a capped, stratified sample
    assert entry["id"]["layer"] == 2 and entry["id"]["pooling"] == "last"
    assert report["comparison"]["probe"] == result["best_probe"]
    assert report_out.join("report.md").exists() and report_out.join("roc_curve.png").exists()
