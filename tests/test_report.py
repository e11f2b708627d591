"""The probes stage (Tune CV, refits, the Ray Train torch probe) and the report stage on gs:// (a real
fake-gcs-server), where the data is: each trial reads only its own column, the driver never holds a feature
matrix, and the merged scores.parquet lines up with the features row for row. Three targets (a dataset label, a
feedback label derived from the response guard, a category label with nulls) in the same Tune run, a report
section per target and the mined prompts. One test, so the suite pays for one Tune start and one Ray Train start."""
from __future__ import annotations

import json
import sys
import tracemalloc
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from guardray import probes
from guardray.probes.cv import run_probes
from guardray.probes.torch_probe import TORCH_PROBE_TYPE, train_dataset
from guardray.report import run_report
from guardray.report.mining import MINED_FILE
from guardray.report.plots import SUMMARY_PLOT
from guardray.report.tasks import SCORES_DIR
from guardray.jobspec import validate_spec
from guardray.storage import Location, resolve
from tests.conftest import small_spec
from tests.synthetic import write_feature_parts

DIM = 4096  # wide, so one column (~27 MB in float32) dwarfs what Tune and Train allocate on the driver (~10 MB)


def _read(location: Location) -> pd.DataFrame:
    with location.fs.open_input_file(location.path) as f:
        return pq.read_table(f).to_pandas()


TARGETS = ["harmful", "response_unsafe", "cat_violence"]


@pytest.mark.slow
def test_probes_and_report_stages_on_gcs_where_the_data_is(ray_local: None, gcs_bucket: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.train.torch  # noqa: F401 - imported before tracing: module objects are not feature data
    import ray.tune  # noqa: F401
    from ray.data.dataset import MaterializedDataset

    columns = {("last", 2): (DIM, 3.0), ("mean", 2): (DIM, 0.0)}
    rows = 2200
    data = write_feature_parts(tmp_path / "features", columns, rows=rows, parts=4, unlabelled_every=10, feedback=True)
    unsafe = np.where(data["judged"], data["guard_response_score"] > 0, None)  # feedback threshold 0
    known = {"harmful": data["labelled"], "response_unsafe": data["judged"], "cat_violence": data["cat_known"]}
    train = {t: k & (data["split"] == "train") for t, k in known.items()}
    features = resolve(f"{gcs_bucket}/features")
    for part in sorted((tmp_path / "features" / "parts").iterdir()):
        features.join("parts", part.name).write_bytes(part.read_bytes())
    spec = validate_spec(small_spec(f"{gcs_bucket}/out", generate={"enabled": True}, probes={
        "targets": TARGETS, "grid": [{"type": "ridge", "params": {"alpha": [1.0, 10.0]}}], "cv": {"folds": 3},
        "max_concurrent_trials": 2,
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
    column_bytes = int(train["harmful"].sum()) * DIM * 4  # one column's float32 train matrix
    # numpy registers its buffers with tracemalloc: reading even one column on the driver would show here
    assert driver_peak < column_bytes / 2, (driver_peak, column_bytes)

    # Tune: each trial read only its own column and its own target's label (for response_unsafe, the response
    # guard's score it is derived from) and the split it filters on; two trials at once; all targets in one run
    results = _read(probes_out.join("cv_results.parquet"))
    label_columns = {"harmful": "harmful", "response_unsafe": "guard_response_score", "cat_violence": "cat_violence"}
    for target in TARGETS:
        of_target = results[results["target"] == target]
        assert sorted(of_target["feature"]) == ["act_last_L2", "act_last_L2", "act_mean_L2", "act_mean_L2"]
        for row in of_target.itertuples():
            assert row.columns_read.split(",") == [row.feature, label_columns[target], "split"], row
            assert row.train_rows == train[target].sum()
    assert results["pid"].nunique() == 2, "two trial actors at once on two CPUs"
    first, second = results.sort_values("trial_start").iloc[:2].itertuples()
    assert min(first.trial_end, second.trial_end) > max(first.trial_start, second.trial_start), "trials overlap"

    # refits: structured identities (with the target) in the summary and in the artifacts written on gs://
    best = summary["best"]
    assert best["name"] == "harmful/act_last_L2-ridge" and best["id"]["feature"] == "act_last_L2"
    assert {t: p["name"] for t, p in summary["best_by_target"].items()} == {
        t: f"{t}/act_last_L2-ridge" for t in TARGETS}
    for target, probe in summary["best_by_target"].items():  # each target picks its own best alpha
        of_column = results[(results["target"] == target) & (results["feature"] == "act_last_L2")]
        assert probe["id"]["params"] == json.loads(of_column.loc[of_column["roc_auc_mean"].idxmax(), "params"])
    loaded = {}
    for probe in summary["probes"]:
        identity = probe["id"]
        assert (identity["layer"], identity["pooling"]) == (2, identity["feature"].split("_")[1])
        assert probe["name"].startswith(identity["target"] + "/")
        loaded[probe["name"]] = probes.load(probes_out.join("artifacts", probe["name"]))  # read on gs://
        assert {k: loaded[probe["name"]].meta[k] for k in identity} == identity
    assert loaded["response_unsafe/act_last_L2-ridge"].meta["feedback"]["response_threshold"] == 0.0
    assert len(loaded) == 2 * 3 + 1  # two features x three targets, and the torch probe of the first target

    # the torch probe: 2 Ray Train workers; its standardisation is the whole train split's (all-reduced over both
    # shards: rank 0 alone would hold its half's), its loss falls, its checkpoints are kept on gs://
    torch_name = f"harmful/act_last_L2-{TORCH_PROBE_TYPE}"
    torch_probe = loaded[torch_name]
    whole = data["act_last_L2"][train["harmful"]].astype(np.float64)
    np.testing.assert_allclose(torch_probe.mean, whole.mean(axis=0), rtol=0, atol=1e-4)
    np.testing.assert_allclose(torch_probe.scale, whole.std(axis=0), rtol=0, atol=1e-4)
    history = torch_probe.meta["history"]
    assert [h["rows"] for h in history] == [int(train["harmful"].sum())] * 3 and history[-1]["loss"] < history[0]["loss"]
    run_dir = probes_out.join("torch_train", "torch-probe-act_last_L2")
    files = run_dir.fs.get_file_info(pafs.FileSelector(run_dir.path, recursive=True))
    kept = {f.path.removeprefix(run_dir.path + "/").split("/")[0] for f in files if "/checkpoint_2" in f.path}
    assert len(kept) == 2, kept  # one checkpoint per epoch was reported; the newest two are kept

    # the responses stage: the dataset's columns and the response, in another row order than the features
    responses = resolve(f"{gcs_bucket}/responses")
    order = np.random.default_rng(1).permutation(rows)
    responses.join("dataset.parquet").write_table(pa.table({
        "id": [f"r{i}" for i in order], "prompt": [f"prompt {i}" for i in order],
        "response": [f"response {i}" for i in order], "split": data["split"][order]}))
    # the category mapping belongs to the dataset side; the report reads it on the driver
    monkeypatch.setitem(sys.modules, "guardray.datasets.categories",
                        types.SimpleNamespace(CATEGORY_CODES={"cat_violence": "S1"}))
    probes_out.join("summary.json").write_json(summary)
    result = run_report(spec, {"features": features, "probes": probes_out, "responses": responses}, report_out)
    assert result["best_probe"] == "harmful/act_last_L2-ridge" and result["targets"] == TARGETS
    assert not report_out.join(SCORES_DIR).exists(), "per-scorer files are merged, then removed"
    scores = _read(report_out.join("scores.parquet"))
    # one row per features row, in order; a nullable label column per target; each probe its artifact's scores
    assert scores["id"].tolist() == [f"r{i}" for i in range(rows)]
    assert scores["harmful"].tolist() == np.where(data["labelled"], data["harmful"], None).tolist()
    assert scores["response_unsafe"].tolist() == unsafe.tolist()
    assert scores["cat_violence"].tolist() == np.where(data["cat_known"], data["cat_violence"], None).tolist()
    np.testing.assert_allclose(scores["guard_score"], data["guard_score"], rtol=1e-6)
    for name, probe in loaded.items():
        np.testing.assert_allclose(scores[name], probe.score(data[probe.meta["feature"]]), rtol=1e-9)

    # a section per target: the best probe against its matching guard score, on that target's known test rows
    report = report_out.join("report.json").read_json()
    guards = {"harmful": "guard_score", "response_unsafe": "guard_score", "cat_violence": "guard_cat_S1"}
    assert report["target_order"] == TARGETS and sorted(report["targets"]) == sorted(TARGETS)
    for target, section in report["targets"].items():
        assert section["guard_scorer"] == guards[target] and section["guard_note"] is None
        rows_of = (scores[target].notna() & (scores["split"] == "test")).to_numpy()
        y = scores.loc[rows_of, target].astype(bool)
        probe_auc = roc_auc_score(y, scores.loc[rows_of, section["best_probe"]])
        guard_auc = roc_auc_score(y, scores.loc[rows_of, section["guard_scorer"]])
        assert section["test_rows"] == rows_of.sum() == section["guard"]["test"]["count"]
        assert section["probes"][section["best_probe"]]["test"]["roc_auc"] == pytest.approx(probe_auc)
        assert section["guard"]["test"]["roc_auc"] == pytest.approx(guard_auc)
        assert probe_auc > 0.95 and section["comparison"]["guard"] == guards[target]
        assert report_out.join(target, "roc_curve.png").exists()
    assert report["targets"]["response_unsafe"]["guard"]["test"]["roc_auc"] < 0.65  # the input guard can't tell
    answer = report["targets"]["response_unsafe"]["answer"]
    assert "before any token is generated" in answer and "the input guard's score (`guard_score`)" in answer
    entry = report["probes"][result["best_probe"]]  # the first target's section, also at the top level
    assert entry["test"]["ci95"]["rows"] == 100  # the bootstrap ran on a capped, stratified sample
    assert report["probes"][torch_name]["test"]["roc_auc"] > 0.95
    assert f"| probe {torch_name} |" in report["comparison_table"]  # the Ray Train probe is in the headline table
    assert report["comparison"]["probe"] == result["best_probe"]
    markdown = report_out.join("report.md").read_text()
    assert all(f"## Target `{t}`" in markdown for t in TARGETS) and answer in markdown
    assert report_out.join(SUMMARY_PLOT).exists()

    # mined prompts: exactly the response_unsafe rows, with their text, guard scores and the probe's score
    mined = _read(report_out.join(MINED_FILE))
    flagged = np.flatnonzero(unsafe == True)  # noqa: E712 - None is neither
    assert mined["id"].tolist() == [f"r{i}" for i in flagged]
    assert mined["prompt"].tolist() == [f"prompt {i}" for i in flagged]
    assert mined["response"].tolist() == [f"response {i}" for i in flagged]
    np.testing.assert_array_equal(mined["slipped_through"], data["guard_score"][flagged].astype(np.float32) <= 0)
    np.testing.assert_allclose(mined["probe_score"], scores["response_unsafe/act_last_L2-ridge"].to_numpy()[flagged])
    assert report["mined_prompts"]["rows"] == len(flagged)
