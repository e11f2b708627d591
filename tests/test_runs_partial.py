"""Runs that a partial rerun or a damaged file used to break (issue 22): latest.json merges, report and serving
find the newest finished stage, a failed stage's leftovers, a truncated features part, private activations.

One real job (a tiny random Llama, 32 prompts, one layer, one probe, no plots) runs through its report once per
module; each test works on its own copy of that output, so none sees another's changes.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest

from guardray import cli
from guardray.cache import MARKER
from guardray.errors import InputError
from guardray.runner import plan, run_job
from guardray.jobspec import validate_spec
from guardray.storage import resolve
from tests.conftest import small_spec, write_spec
from tests.models import build_tiny


def _spec_dict(output: Path, model: str, **changes: Any) -> dict[str, Any]:
    spec = small_spec(
        str(output),
        dataset={"sources": [{"type": "advbench", "limit": 16}, {"type": "sharegpt", "limit": 16}]},
        model={"id": model, "max_length": 64},
        extract={"layers": [1], "poolings": ["last"], "actors": 1, "rows_per_shard": 16},
        guard={"enabled": False},
        probes={"grid": [{"type": "logistic_regression", "params": {"C": 0.1}}], "cv": {"folds": 2}},
        evaluate={"plots": False, "bootstrap": 0},
    )
    for section, fields in changes.items():
        spec[section] = {**spec[section], **fields}
    return spec


@pytest.fixture(scope="module")
def finished(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A finished job output (all four stages) under the default umask 022, and how to copy it."""
    model = build_tiny(tmp_path_factory.mktemp("model") / "llama")
    out = tmp_path_factory.mktemp("finished") / "out"
    old_umask = os.umask(0o022)
    try:
        results = run_job(validate_spec(_spec_dict(out, model)))
    finally:
        os.umask(old_umask)
    assert all(r["status"] == "ran" for r in results.values())
    return {"out": out, "model": model, "dirs": {name: Path(r["dir"]) for name, r in results.items()}}


def _copy(finished: dict[str, Any], tmp_path: Path) -> Path:
    """This test's own copy of the finished output (latest.json still names the original's directories,
    which is what a moved or copied output looks like)."""
    copy = tmp_path / "out"
    shutil.copytree(finished["out"], copy)
    return copy


def _latest(out: Path) -> dict[str, str]:
    return json.loads((out / "latest.json").read_text())["stages"]


def _status(spec: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """`guardray status` as a user runs it (in this process: Ray is up already)."""
    capsys.readouterr()
    assert cli.main(["status", str(write_spec(tmp_path / "status.yaml", spec))]) == 0
    return capsys.readouterr().out.splitlines()


def _finished_stage(out: Path, kind: str) -> Path | None:
    """What report and serving use to find a job output's stage (`runner.latest_stage`)."""
    from guardray.cache import latest_stage  # new with issue 22

    found = latest_stage(resolve(str(out)), kind)
    return None if found is None else Path(found.path)


def test_activations_and_prompts_are_not_group_or_world_readable(finished: dict[str, Any]) -> None:
    dirs = finished["dirs"]
    parts = sorted((dirs["features"] / "parts").glob("*.parquet"))
    private = [dirs["dataset"] / "dataset.parquet", *parts, dirs["features"] / "errors.parquet",
               dirs["report"] / "scores.parquet", finished["out"] / "latest.json",
               *(dirs["probes"] / "artifacts").rglob("probe.*")]
    assert len(parts) == 2
    modes = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in private}
    assert modes == {str(p): "0o600" for p in private}
    for directory in [finished["out"], *dirs.values(), dirs["features"] / "parts"]:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory


def test_a_dataset_only_rerun_merges_latest_and_report_still_renders(
        finished: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy(finished, tmp_path)
    before = _latest(out)
    spec = validate_spec(_spec_dict(out, finished["model"], dataset={"subsample": {"every": 2}}))
    result = run_job(spec, ["dataset"])["dataset"]  # a new dataset directory; nothing else runs
    after = _latest(out)
    assert list(after) == ["dataset", "features", "probes", "report"]
    assert after["dataset"] == result["dir"] != before["dataset"]
    kept = ("features", "probes", "report")
    assert {k: after[k] for k in kept} == {k: before[k] for k in kept}
    assert cli.main(["report", str(out)]) == 0
    assert f"re-rendered {out}/{finished['dirs']['report'].name}/report.md" in capsys.readouterr().out


def test_a_failed_run_keeps_latest_and_its_leftover_is_never_taken_for_a_result(
        finished: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy(finished, tmp_path)
    before = _latest(out)
    bad_dict = _spec_dict(out, finished["model"], probes={"features": ["act_last_L2"]})
    bad = validate_spec(bad_dict)
    with pytest.raises(InputError, match="probes.features: act_last_L2 not extracted"):
        run_job(bad)
    after = _latest(out)  # the stages it reused are recorded (as this output's), nothing is dropped
    assert {k: Path(v).name for k, v in after.items()} == {k: Path(v).name for k, v in before.items()}
    assert (after["probes"], after["report"]) == (before["probes"], before["report"])
    leftover = plan(bad)["probes"].location
    assert sorted(os.listdir(leftover.path)) == ["spec.json"]
    assert _status(bad_dict, tmp_path, capsys)[2] == \
        f"{'probes':10} incomplete (no {MARKER}; holds only spec.json) {leftover.uri}"
    # the newer directory holds no marker: serving and reports still find the finished one
    (out / "latest.json").unlink()
    assert _finished_stage(out, "probes") == out / finished["dirs"]["probes"].name


def test_a_stage_folder_with_only_spec_json_is_rerun_not_reused(
        finished: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy(finished, tmp_path)
    spec_dict = _spec_dict(out, finished["model"])
    spec = validate_spec(spec_dict)
    probes = out / finished["dirs"]["probes"].name
    for entry in probes.iterdir():  # what a run that failed at once leaves
        if entry.name != "spec.json":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    assert f"incomplete (no {MARKER}; holds only spec.json)" in _status(spec_dict, tmp_path, capsys)[2]
    assert _finished_stage(out, "probes") is None  # named by latest.json, but not finished
    results = run_job(spec)
    assert [r["status"] for r in results.values()] == ["cached", "cached", "ran", "cached"]
    assert (probes / MARKER).exists() and (probes / "artifacts").is_dir()


def test_report_finds_the_newest_finished_report_without_latest_json(
        finished: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy(finished, tmp_path)
    newer = run_job(validate_spec(_spec_dict(out, finished["model"], evaluate={"probe_threshold": 0.5})),
                    ["report"])["report"]
    assert newer["status"] == "ran"
    (out / "latest.json").unlink()
    fake = out / "report-0123456789ab"  # a failed run's leftover, newest of all: not a result
    fake.mkdir()
    (fake / "spec.json").write_text("{}")
    assert _finished_stage(out, "report") == Path(newer["dir"])
    assert cli.main(["report", str(out)]) == 0
    assert f"re-rendered {newer['dir']}/report.md" in capsys.readouterr().out


def test_a_truncated_part_names_the_file_and_how_to_redo_it(
        finished: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy(finished, tmp_path)
    part = sorted((out / finished["dirs"]["features"].name / "parts").glob("*.parquet"))[-1]
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    spec = write_spec(tmp_path / "job.yaml", _spec_dict(out, finished["model"]))
    capsys.readouterr()
    assert cli.main(["run", str(spec), "--stages", "probes", "--force", "probes"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert errors[0].startswith(f"error: features part {part} is unreadable (")
    assert errors[0].endswith("the features stage must be redone: guardray run SPEC --force features")
