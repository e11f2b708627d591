"""Spec values that can attack the machine that reads them (guardray/jobspec/checks.py): engine arguments that
override safety fields, devices, model ids and dataset paths that escape. Each is refused at validate with one
line, exit 2."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from guardray.errors import SpecError
from guardray.jobspec import validate_spec
from tests.conftest import small_spec, write_spec
from tests.test_jobspec_loading import guardray, one_line_exit_2


def _errors(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as info:
        validate_spec(raw, "job.yaml")
    return info.value.problems


# ------------------------------------------------------------------------------- engine arguments
@pytest.mark.parametrize("section", ["guard", "generate"])
@pytest.mark.parametrize("args, named", [
    ({"trust_remote_code": True}, "trust_remote_code"),
    ({"download_dir": "/tmp/elsewhere"}, "download_dir"),
    ({"hf_overrides": {"architectures": ["Evil"]}}, "hf_overrides"),
    ({"worker_extension_cls": "evil.Extension"}, "worker_extension_cls"),
    ({"model_impl": "transformers"}, "model_impl"),
    ({"tokenizer": "/tmp/other-tokenizer"}, "tokenizer"),
    ({"allowed_local_media_path": "/"}, "allowed_local_media_path"),
    ({"io_processor_plugin": "evil"}, "io_processor_plugin"),
    ({"hf_token": "hf_secret"}, "hf_token"),
    ({"compilation_config": {"level": 3, "cache_dir": "/tmp/x"}}, "compilation_config.cache_dir"),
    ({"distributed_executor_backend": "evil.Executor"}, "distributed_executor_backend"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_engine_arguments_cannot_override_safety_fields(section: str, args: dict[str, Any], named: str) -> None:
    """`vllm_engine_args` are merged last into the engine's arguments: `{trust_remote_code: true}` there would win
    over `model.trust_remote_code`. Such keys are refused, each named."""
    raw = small_spec("out", **{section: {"backend": "vllm", "vllm_engine_args": {"gpu_memory_utilization": 0.5,
                                                                                **args}}})
    if section == "generate":
        raw["generate"]["enabled"] = True
    (line,) = _errors(raw)
    assert line.startswith(f"job.yaml: {section}.vllm_engine_args: refused (") and f"{named}:" in line


def test_speed_and_numerics_engine_arguments_stay_allowed() -> None:
    args = {"gpu_memory_utilization": 0.45, "quantization": "fp8", "enforce_eager": True, "max_num_seqs": 8,
            "distributed_executor_backend": "mp", "compilation_config": {"level": 3}}
    spec = validate_spec(small_spec("out", guard={"backend": "vllm", "vllm_engine_args": args}))
    assert spec.guard.vllm_engine_args == args


# ---------------------------------------------------------------------------------------- devices
@pytest.mark.parametrize("device", ["tpu:7; rm -rf /", "gpu", "CUDA", "cuda:", "cuda:x", "cuda:0 ", "meta", ""])
def test_model_devices_are_validated(device: str) -> None:
    raw = small_spec("out", model={"device": device}, guard={"model": {"id": "org/guard", "device": device}})
    problems = _errors(raw)
    assert [p.split(": ")[1] for p in problems] == ["model.device", "guard.model.device"]
    assert all("is not a device: use auto, cpu, cuda or cuda:N" in p for p in problems)


def test_known_devices_validate() -> None:
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert validate_spec(small_spec("out", model={"device": device})).model.device == device


# --------------------------------------------------------------------------------- models and paths
@pytest.mark.parametrize("model_id, says", [
    ("/etc", "'/etc' is a directory without config.json, not a model directory"),
    ("../../../../etc/passwd", "'../../../../etc/passwd' is a file, not a model directory (nor a .gguf file)"),
    ("/nonexistent/model", "model directory not found: /nonexistent/model"),
    ("org/name/extra", "model directory not found: org/name/extra"),
    ("org/na..me", "'org/na..me' is neither a Hugging Face model id ('org/name') nor a model directory"),
    ("missing.gguf", "GGUF file not found: missing.gguf"),
])
def test_a_model_id_is_a_hub_id_or_an_existing_model(model_id: str, says: str) -> None:
    problems = _errors(small_spec("out", model={"id": model_id}, guard={"model": {"id": model_id}}))
    assert problems == [f"job.yaml: model.id: {says}", f"job.yaml: guard.model.id: {says}"]


def test_path_model_ids_are_exit_2_through_the_cli(tmp_path: Path) -> None:
    """These reached transformers and failed with its message, exit 1."""
    path = write_spec(tmp_path / "job.yaml", small_spec(str(tmp_path / "out")))
    line = one_line_exit_2(guardray("validate", str(path), "--set", "model.id=../../../../etc/passwd"))
    assert line.endswith("model.id: '../../../../etc/passwd' is a file, not a model directory (nor a .gguf file)")


def test_hub_ids_aliases_and_model_directories_validate(tmp_path: Path) -> None:
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for model_id in ("meta-llama/Llama-Guard-3-1B", "gpt2", "smollm2-135m-instruct", str(model_dir)):
        assert validate_spec(small_spec("out", model={"id": model_id})).model.id == model_id


@pytest.mark.parametrize("field, value", [
    ("repo", "../secret"), ("repo", "/etc"), ("repo", "org/../../secret"), ("repo", "a/b/c"),
    ("data_files", "../../secret/*.parquet"), ("data_files", "/etc/passwd"), ("config", ".."),
    ("hf_split", "../x"),
])
def test_a_hugging_face_source_cannot_escape_its_mirror(tmp_path: Path, field: str, value: str) -> None:
    """`repo` (and the file pattern) are joined under `mirror`: `..` would read files outside it."""
    mirror = tmp_path / "mirror"
    (mirror / "org" / "data").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "rows.parquet").write_text("private")
    source = {"type": "huggingface", "repo": "org/data", "mirror": str(mirror), "data_files": "*.parquet",
              "harmful": True, field: value}
    (line,) = _errors(small_spec("out", dataset={"sources": [source]}))
    assert line.startswith(f"job.yaml: dataset.sources.0.{field}: '{value}'")
