"""Specs written by someone else: engine arguments that override safety fields, lax booleans, YAML bombs,
paths that escape, devices and pool sizes that make no sense. Each is refused at validate with one line, exit 2.

The CLI cases run the real `python -m guardray` in a subprocess (the bomb under a memory limit), since the point
is what the user sees: exit status 2 and a single stderr line, never a traceback."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from guardray.errors import SpecError
from guardray.spec import JobSpec, load_spec, validate_spec
from tests.conftest import REPO, small_spec, write_spec


def _errors(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as info:
        validate_spec(raw, "job.yaml")
    return info.value.problems


def _limit_memory() -> None:
    """In the child: 2 GiB of address space (imports need about 1 GiB), so a bomb fails instead of swapping."""
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def guardray(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guardray", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, preexec_fn=_limit_memory)


def _one_line_exit_2(result: subprocess.CompletedProcess[str]) -> str:
    """The CLI's contract for bad input: exit 2, exactly one `error:` line on stderr, nothing else."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


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


# ------------------------------------------------------------------------------------- booleans
def _models(model: Any = JobSpec, seen: set | None = None) -> set[type[BaseModel]]:
    """Every spec model reachable from JobSpec (sources, nested sections)."""
    seen = set() if seen is None else seen
    if isinstance(model, type) and issubclass(model, BaseModel):
        if model in seen:
            return seen
        seen.add(model)
        for field in model.model_fields.values():
            _models(field.annotation, seen)
        return seen
    for arg in typing.get_args(model):
        _models(arg, seen)
    return seen


def _boolean_fields() -> list[tuple[str, Any]]:
    fields = []
    for model in _models():
        for name, field in model.model_fields.items():
            if "bool" in str(field.annotation):
                annotation = typing.Annotated[(field.annotation, *field.metadata)] if field.metadata else \
                    field.annotation
                fields.append((f"{model.__name__}.{name}", TypeAdapter(annotation)))
    return sorted(fields, key=lambda f: f[0])


BOOLEAN_FIELDS = _boolean_fields()


@pytest.mark.parametrize("name, adapter", BOOLEAN_FIELDS, ids=[n for n, _ in BOOLEAN_FIELDS])
def test_every_boolean_field_takes_only_real_booleans(name: str, adapter: TypeAdapter) -> None:
    """'yes', 1 and the string 'true' are not booleans: a safety switch must not be turned on by a near miss."""
    assert any(n.endswith(".trust_remote_code") for n, _ in BOOLEAN_FIELDS)
    for lax in ("yes", 1, "true", "on"):
        value = {"k": lax} if name.endswith(".label_map") else lax
        with pytest.raises(ValidationError):
            adapter.validate_python(value)
    assert adapter.validate_python({"k": True} if name.endswith(".label_map") else True)


def test_quoted_yes_in_a_spec_file_is_refused(tmp_path: Path) -> None:
    path = write_spec(tmp_path / "job.yaml", small_spec("out", model={"trust_remote_code": "yes"},
                                                        guard={"model": {"id": "org/guard", "trust_remote_code": 1}}))
    problems = _load_problems(path)
    assert problems == [f"{path}: model.trust_remote_code: expected true or false (a YAML boolean), got 'yes'",
                        f"{path}: guard.model.trust_remote_code: expected true or false (a YAML boolean), got 1"]


@pytest.mark.parametrize("value", ["1", "yes"])
def test_set_trust_remote_code_needs_a_yaml_boolean(tmp_path: Path, value: str) -> None:
    path = write_spec(tmp_path / "job.yaml", small_spec(str(tmp_path / "out")))
    line = _one_line_exit_2(guardray("validate", str(path), "--set", f"model.trust_remote_code={value}"))
    assert "model.trust_remote_code: expected true or false" in line
    assert load_spec(path, ["model.trust_remote_code=true"]).model.trust_remote_code is True


# ------------------------------------------------------------------------------------ YAML limits
def _load_problems(path: Path) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return info.value.problems


def _bomb(levels: int = 9) -> str:
    """Billion laughs inside guard.vllm_engine_args: ~800 bytes that alias-expand to 10^9 strings."""
    lines = ["name: bomb", "output: out", "dataset: {sources: [{type: advbench}]}", "guard:", "  backend: vllm",
             "  vllm_engine_args:", "    l0: &l0 [" + ", ".join(['"lol"'] * 10) + "]"]
    lines += [f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("command", ["validate", "status"])
def test_a_billion_laughs_fails_fast_with_one_line(tmp_path: Path, command: str) -> None:
    """The stage hashes dump the engine arguments: without a bound, `status` expands 10^9 strings (it runs past
    a minute and gigabytes) and `validate` passes the file. Under a 2 GiB limit both must end at once, exit 2."""
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb())
    started = time.monotonic()
    line = _one_line_exit_2(guardray(command, str(path)))
    assert time.monotonic() - started < 30
    assert "expands to more than" in line and "aliases" in line


def test_aliases_within_bounds_still_work(tmp_path: Path) -> None:
    """Anchors and merges for sharing settings are fine: a small expansion loads as before."""
    path = tmp_path / "job.yaml"
    path.write_text(_bomb(levels=2).replace("  backend: vllm\n", "  backend: vllm\n  enabled: true\n"))
    spec = load_spec(path)
    assert len(spec.guard.vllm_engine_args["l2"]) == 10 and spec.guard.vllm_engine_args["l2"][0][0] == ["lol"] * 10


def test_a_recursive_alias_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("name: r\noutput: out\ndataset: {sources: [{type: advbench}]}\n"
                    "guard: {vllm_engine_args: {x: &a [1, *a]}}\n")
    assert _load_problems(path) == [f"{path}: alias *a at line 4 refers to a value that contains it (recursive alias)"]


def test_a_spec_over_the_size_cap_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(small_spec("out")) + "#" * (1 << 20) + "\n")
    assert _load_problems(path) == [f"{path}: larger than 1 MiB: not a job spec"]


def test_a_5000_deep_list_is_exit_2_one_line(tmp_path: Path) -> None:
    """The YAML composer recurses per level: 5,000 levels were a RecursionError (exit 1)."""
    path = tmp_path / "deep.yaml"
    path.write_text("name: deep\noutput: out\ndataset: {sources: [{type: advbench}]}\n"
                    f"guard: {{vllm_engine_args: {{x: {'[' * 5000}{']' * 5000}}}}}\n")
    line = _one_line_exit_2(guardray("validate", str(path)))
    assert line == f"error: {path}: nested more than 64 levels deep at line 4"


@pytest.mark.parametrize("item, says", [
    ("extract.layers=[8,oops", "--set extract.layers=[8,oops: not a YAML value: expected ',' or ']'"),
    ("extract.layers=" + "[" * 5000 + "]" * 5000, "nested more than 64 levels deep"),
    ("guard.vllm_engine_args={a: &a [x, x, x, x], b: [*a, *a, *a]}", None),
], ids=["unclosed", "deep", "small-alias"])
def test_set_values_that_do_not_parse_are_one_line(tmp_path: Path, item: str, says: str | None) -> None:
    path = write_spec(tmp_path / "job.yaml", small_spec(str(tmp_path / "out")))
    if says is None:  # aliases inside one --set value are fine while small
        assert load_spec(path, [item]).guard.vllm_engine_args["b"][2] == ["x"] * 4
        return
    with pytest.raises(SpecError) as info:
        load_spec(path, [item])
    (line,) = info.value.problems
    assert says in line and len(line) < 400


def test_set_with_an_unclosed_list_through_the_cli(tmp_path: Path) -> None:
    path = write_spec(tmp_path / "job.yaml", small_spec(str(tmp_path / "out")))
    line = _one_line_exit_2(guardray("validate", str(path), "--set", "extract.layers=[8,oops"))
    assert "--set extract.layers=[8,oops: not a YAML value" in line


def test_a_grid_that_expands_past_the_cap_is_refused(tmp_path: Path) -> None:
    """Every grid point is built at validate: five lists of 100 values would be 10^10 estimators (the old code
    exhausted memory expanding them). Run through the CLI, under the memory limit, so a regression fails alone."""
    params = {name: [1.0] * 100 for name in ("C", "tol", "intercept_scaling", "l1_ratio", "max_iter")}
    path = write_spec(tmp_path / "job.yaml", small_spec(
        str(tmp_path / "out"), probes={"grid": [{"type": "logistic_regression", "params": params}]}))
    line = _one_line_exit_2(guardray("validate", str(path)))
    assert line == f"error: {path}: probes.grid.0.params: the lists expand to more than 10,000 grid points"


# ------------------------------------------------------------------------------ devices and pools
@pytest.mark.parametrize("device", ["tpu:7; rm -rf /", "gpu", "CUDA", "cuda:", "cuda:x", "cuda:0 ", "meta", ""])
def test_model_devices_are_validated(device: str) -> None:
    raw = small_spec("out", model={"device": device}, guard={"model": {"id": "org/guard", "device": device}})
    problems = _errors(raw)
    assert [p.split(": ")[1] for p in problems] == ["model.device", "guard.model.device"]
    assert all("is not a device: use auto, cpu, cuda or cuda:N" in p for p in problems)


def test_known_devices_validate() -> None:
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert validate_spec(small_spec("out", model={"device": device})).model.device == device


@pytest.mark.parametrize("section, field, value", [
    ("extract", "actors", 0), ("extract", "actors", -2), ("generate", "actors", 0), ("extract", "max_actors", 0),
    ("extract", "batch_size", 0), ("generate", "batch_size", -1), ("extract", "rows_per_shard", 0),
])
def test_pool_sizes_below_one_are_refused(section: str, field: str, value: int) -> None:
    """`actors: 0` used to run one actor silently."""
    (line,) = _errors(small_spec("out", **{section: {field: value}}))
    assert line.startswith(f"job.yaml: {section}.{field}: Input should be greater than or equal to 1")


# -------------------------------------------------------------------------------- paths and files
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
    line = _one_line_exit_2(guardray("validate", str(path), "--set", "model.id=../../../../etc/passwd"))
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


def test_an_output_that_is_a_file_is_exit_2(tmp_path: Path) -> None:
    """It failed with exit 1 when the first stage tried to make a directory there."""
    existing = tmp_path / "results.txt"
    existing.write_text("not a directory")
    path = write_spec(tmp_path / "job.yaml", small_spec(str(existing)))
    line = _one_line_exit_2(guardray("validate", str(path)))
    assert line == f"error: {path}: output: '{existing}' exists and is not a directory"
    assert validate_spec(small_spec(str(tmp_path))).output == str(tmp_path)  # an existing directory is fine


# ------------------------------------------------------------------------------------- file mode
def test_file_mode_defaults_private_and_is_validated() -> None:
    assert validate_spec(small_spec("out")).file_mode == "0600"
    assert validate_spec(small_spec("out", file_mode="0644")).file_mode_bits == 0o644
    assert validate_spec(small_spec("out", file_mode="640")).file_mode_bits == 0o640
    for bad, says in [(420, "got the number 420: write the mode as a quoted octal string"),
                      ("0999", "is not a file mode"), ("rw-r--r--", "is not a file mode"),
                      ("4755", "is not a file mode"),
                      ("0044", "the owner digit must be 6 or 7")]:
        (line,) = _errors(small_spec("out", file_mode=bad))
        assert line.startswith("job.yaml: file_mode: ") and says in line, line


def test_file_mode_changes_no_stage_hash(tmp_path: Path) -> None:
    """How files are written is not what a stage computes: the same stage directories for every mode."""
    from guardray.runner import plan

    raw = small_spec(str(tmp_path), generate={"enabled": True})
    dirs = {mode: {name: d.name for name, d in plan(validate_spec({**raw, "file_mode": mode})).items()}
            for mode in ("0600", "0640", "0644")}
    assert dirs["0600"] == dirs["0640"] == dirs["0644"] and set(dirs["0600"]) >= {"dataset", "responses", "report"}


def test_submit_checks_a_cluster_paths_form_not_its_presence_here(tmp_path: Path) -> None:
    """`guardray submit` validates on the laptop a spec that runs on the cluster: a model directory that exists
    only there is accepted in form (the job's own validate on the cluster checks it exists), `..` is not."""
    raw = small_spec(str(tmp_path / "out"), model={"id": "/mnt/models/llama-3-8b"})
    path = write_spec(tmp_path / "job.yaml", raw)
    with pytest.raises(SpecError, match="model directory not found"):
        load_spec(path)
    assert load_spec(path, paths_elsewhere=True).model.id == "/mnt/models/llama-3-8b"
    raw["model"]["id"] = "/mnt/models/../../etc"
    with pytest.raises(SpecError, match="climbs out"):
        load_spec(write_spec(tmp_path / "job.yaml", raw), paths_elsewhere=True)
