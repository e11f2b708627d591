"""The CLI as users run it: exit codes and one-line errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import small_spec, write_spec


def guardray(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guardray", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_validate_ok_and_invalid(tmp_path: Path) -> None:
    good = write_spec(tmp_path / "good.yaml", small_spec(str(tmp_path / "out")))
    assert guardray("validate", str(good)).returncode == 0
    raw = small_spec("out")
    raw["extract"] = {"layres": [1]}
    raw["model"] = {"dtype": "int8"}
    # probe types and parameters are checked against the registry here, before any GPU stage runs
    raw["probes"] = {"grid": [{"type": "logisitc_regression"},
                              {"type": "logistic_regression", "params": {"C": [0.1, -1.0]}},
                              {"type": "linear_svc", "params": {"CC": 1}}]}
    bad = write_spec(tmp_path / "bad.yaml", raw)
    result = guardray("validate", str(bad))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 5
    assert f"error: {bad}: probes.grid.0.type: unknown probe type 'logisitc_regression'; did you mean " \
           "'logistic_regression'?" in lines
    assert any(f"{bad}: probes.grid.1: logistic_regression {{'C': -1.0}}: The 'C' parameter" in line for line in lines)
    assert f"error: {bad}: probes.grid.2: linear_svc has no parameter 'CC'; did you mean 'C'?" in lines
    assert any(line.startswith(f"error: {bad}: extract.layres: unknown key; did you mean 'layers'?") for line in lines)
    assert any(f"{bad}: model.dtype:" in line for line in lines)
    assert "Traceback" not in result.stderr


def test_missing_spec_file_is_invalid_input(tmp_path: Path) -> None:
    result = guardray("validate", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and result.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: file not found"


def test_bad_data_path_is_one_line_exit_2(tmp_path: Path) -> None:
    raw = small_spec(str(tmp_path / "out"))
    raw["dataset"]["sources"] = [{"type": "file", "name": "f", "path": str(tmp_path / "missing.csv"), "harmful": True}]
    result = guardray("run", str(write_spec(tmp_path / "job.yaml", raw)))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'missing.csv'}: file not found"


def test_run_status_and_overrides(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "job.yaml", small_spec(str(tmp_path / "out")))
    status = guardray("status", str(spec))
    assert status.returncode == 0 and status.stdout.startswith("dataset    missing")
    run = guardray("run", str(spec), "--stages", "dataset", "--set", "dataset.subsample.every=4")
    assert run.returncode == 0, run.stderr
    assert "Source" in run.stdout and "Expected" in run.stdout and "advbench" in run.stdout
    # the override changed the dataset's key, so the un-overridden spec is still missing
    assert guardray("status", str(spec)).stdout.startswith("dataset    missing")
    assert guardray("status", str(spec), "--set", "dataset.subsample.every=4").stdout.startswith("dataset    done")
    assert guardray("run", str(spec), "--stages", "nope").returncode == 2


def test_datasets_lists_sources() -> None:
    result = guardray("datasets")
    assert result.returncode == 0
    assert "advbench" in result.stdout and "huggingface:alpaca" in result.stdout and "yes" in result.stdout


def test_duplicate_key_is_exit_2_one_line(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("name: tiny\noutput: out\ndataset:\n  sources:\n    - type: advbench\n"
                    "  sources:\n    - type: dan\n")
    result = guardray("validate", str(spec))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {spec}: duplicate key 'sources' at lines 4 and 6"


def test_non_utf8_spec_is_exit_2_one_line(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_bytes(b"name: caf\xe9\noutput: out\n")
    result = guardray("validate", str(spec))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {spec}: not UTF-8 text (byte 0xe9 at offset 9)"
