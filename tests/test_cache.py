"""The stage cache: skip, force, redo an incomplete directory, and keys that ignore unrelated fields."""
from __future__ import annotations

from pathlib import Path

from guardray.cache import MARKER
from guardray.runner import plan, run_job, stage_states
from guardray.jobspec import validate_spec
from guardray.storage import resolve
from tests.conftest import small_spec


def test_rerun_skips_and_force_recomputes(tmp_path: Path) -> None:
    spec = validate_spec(small_spec(str(tmp_path)))
    first = run_job(spec, ["dataset"])["dataset"]
    marker = Path(first["dir"]) / MARKER
    stamp = marker.stat().st_mtime_ns
    assert run_job(spec, ["dataset"])["dataset"]["status"] == "cached"
    assert marker.stat().st_mtime_ns == stamp
    assert run_job(spec, ["dataset"], force=("dataset",))["dataset"]["status"] == "ran"
    assert marker.stat().st_mtime_ns > stamp


def test_incomplete_directory_is_redone(tmp_path: Path) -> None:
    spec = validate_spec(small_spec(str(tmp_path)))
    stage_dir = plan(spec)["dataset"]
    stage_dir.location.join("dataset.parquet").write_text("half-written garbage")
    assert stage_states(spec)[0][1] == "incomplete"
    result = run_job(spec, ["dataset"])["dataset"]
    assert result["status"] == "ran"
    assert resolve(result["dir"]).join("dataset.parquet").read_table().num_rows == result["rows"]
    assert stage_states(spec)[0][1] == "done"


def test_unrelated_fields_keep_the_dataset_cache(tmp_path: Path) -> None:
    base = validate_spec(small_spec(str(tmp_path)))
    probes_changed = validate_spec(small_spec(str(tmp_path), probes={"cv": {"folds": 3}}, model={"max_length": 64}))
    data_changed = validate_spec(small_spec(str(tmp_path), dataset={**small_spec("x")["dataset"], "split": {"seed": 9}}))
    assert plan(base)["dataset"].location == plan(probes_changed)["dataset"].location
    assert plan(base)["dataset"].location != plan(data_changed)["dataset"].location
    # a dataset change flows downstream through the input hashes
    assert plan(base)["dataset"].name != plan(data_changed)["dataset"].name
    spec_json = plan(base)["dataset"]
    run_job(base, ["dataset"])
    assert spec_json.location.join("spec.json").read_json()["spec"] == base.dataset.cache_payload()
