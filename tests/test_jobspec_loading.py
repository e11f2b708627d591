"""Reading a spec (guardray/jobspec/loading.py, problems.py): shipped jobs load, `--set` overrides are typed, YAML is
read safely and bounded (duplicate keys, size, depth, alias bombs), and every problem is one line naming file and
field. A spec may come from someone else: each bad file is refused at validate with one line, exit 2.

The CLI cases run the real `python -m guardray` in a subprocess (the bomb under a memory limit), since the point
is what the user sees: exit status 2 and a single stderr line, never a traceback."""
from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from guardray.errors import SpecError
from guardray.jobspec import JobSpec, load_spec, validate_spec
from tests.conftest import REPO, small_spec, write_spec


def _limit_memory() -> None:
    """In the child: 2 GiB of address space (imports need about 1 GiB), so a bomb fails instead of swapping."""
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def guardray(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guardray", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, preexec_fn=_limit_memory)


def one_line_exit_2(result: subprocess.CompletedProcess[str]) -> str:
    """The CLI's contract for bad input: exit 2, exactly one `error:` line on stderr, nothing else."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


def _load_problems(path: Path) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return info.value.problems


JOBS = sorted((REPO / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", JOBS, ids=[p.stem for p in JOBS])
def test_shipped_jobs_validate(path: Path) -> None:
    spec = load_spec(path)
    assert isinstance(spec, JobSpec)


# ------------------------------------------------------------------------------------ one-line problems
def _errors(raw: dict) -> list[str]:
    with pytest.raises(SpecError) as info:
        validate_spec(raw, "job.yaml")
    return info.value.problems


def test_unknown_key_suggests_the_closest_field() -> None:
    raw = small_spec("out")
    raw["extract"] = {"layer": [1]}
    (line,) = _errors(raw)
    assert line == "job.yaml: extract.layer: unknown key; did you mean 'layers'?"


def test_unknown_key_inside_a_source_names_its_index() -> None:
    raw = small_spec("out")
    raw["dataset"]["sources"].append({"type": "file", "name": "x", "path": "a.csv", "harmful": True, "text_colum": "t"})
    (line,) = _errors(raw)
    assert line == "job.yaml: dataset.sources.3.text_colum: unknown key; did you mean 'text_column'?"


def test_all_errors_are_reported_at_once_one_line_each() -> None:
    raw = small_spec("out")
    raw["model"] = {"dtype": "float64", "max_length": 2}
    raw["evaluate"] = {"bootstrap": -1}
    del raw["name"]
    problems = _errors(raw)
    assert len(problems) == 4
    assert all("\n" not in p for p in problems)
    fields = {p.split(": ")[1] for p in problems}
    assert fields == {"name", "model.dtype", "model.max_length", "evaluate.bootstrap"}


# -------------------------------------------------------------------------------------------- --set
def test_overrides_are_typed_by_the_schema(tmp_path: Path) -> None:
    path = write_spec(tmp_path / "job.yaml", small_spec("out"))
    spec = load_spec(path, ["dataset.subsample.every=20", "name=123", "dataset.sources.0.limit=7",
                            "extract.layers=[1, -1]"])
    assert spec.dataset.subsample.every == 20
    assert spec.name == "123"  # a string field keeps the text, not the int YAML would make of it
    assert spec.dataset.sources[0].limit == 7
    assert spec.extract.layers == (1, -1)


def test_bad_override_names_itself(tmp_path: Path) -> None:
    path = write_spec(tmp_path / "job.yaml", small_spec("out"))
    with pytest.raises(SpecError) as info:
        load_spec(path, ["dataset.sources.9.limit=3", "nonsense"])
    assert len(info.value.problems) == 2
    assert "--set dataset.sources.9.limit=3" in info.value.problems[0]


@pytest.mark.parametrize("value", ["1", "yes"])
def test_set_trust_remote_code_needs_a_yaml_boolean(tmp_path: Path, value: str) -> None:
    path = write_spec(tmp_path / "job.yaml", small_spec(str(tmp_path / "out")))
    line = one_line_exit_2(guardray("validate", str(path), "--set", f"model.trust_remote_code={value}"))
    assert "model.trust_remote_code: expected true or false" in line
    assert load_spec(path, ["model.trust_remote_code=true"]).model.trust_remote_code is True


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
    line = one_line_exit_2(guardray("validate", str(path), "--set", "extract.layers=[8,oops"))
    assert "--set extract.layers=[8,oops: not a YAML value" in line


# --------------------------------------------------------------------------------------- YAML files
def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "not valid YAML" in info.value.problems[0]


def test_duplicate_key_names_key_and_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("name: tiny\n"            # 1
                    "output: out\n"           # 2
                    "dataset:\n"              # 3
                    "  sources:\n"            # 4
                    "    - type: advbench\n"  # 5
                    "  split:\n"              # 6
                    "    seed: 0\n"           # 7
                    "  sources:\n"            # 8
                    "    - type: dan\n")      # 9
    assert _load_problems(path) == [f"{path}: duplicate key 'sources' at lines 4 and 8"]


def test_duplicate_top_level_key_and_flow_mapping(tmp_path: Path) -> None:
    top = tmp_path / "top.yaml"
    top.write_text(yaml.safe_dump(small_spec("out"), sort_keys=False) + "name: other\n")
    (line,) = _load_problems(top)
    assert line.startswith(f"{top}: duplicate key 'name' at lines 1 and ")
    flow = tmp_path / "flow.yaml"
    flow.write_text("name: tiny\noutput: out\nextract: {layers: [1], layers: [2]}\n")
    assert _load_problems(flow) == [f"{flow}: duplicate key 'layers' at line 3"]


def test_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    """`<<: *anchor` then the same key is an override, not a duplicate."""
    path = tmp_path / "job.yaml"
    path.write_text("name: tiny\noutput: out\n"
                    "dataset:\n  sources:\n    - &adv {type: advbench, limit: 40}\n    - <<: *adv\n      type: dan\n")
    spec = load_spec(path)
    assert [s.source_name for s in spec.dataset.sources] == ["advbench", "dan"]


def test_duplicate_check_constructs_keys_safely(tmp_path: Path) -> None:
    """The duplicate check builds each key before the mapping is built: a python tag there is still refused."""
    marker = tmp_path / "pwned"
    path = tmp_path / "job.yaml"
    path.write_text(f"name: tiny\n? !!python/object/apply:os.system ['touch {marker}']\n: 1\n")
    (line,) = _load_problems(path)
    assert "not valid YAML" in line and not marker.exists()


@pytest.mark.parametrize("data, offset", [(b"name: caf\xe9\noutput: out\n", 9), (b"\x00\x01PK\x03\x04\xff\xfe\x80", 6)],
                         ids=["latin-1", "binary"])
def test_non_utf8_file_is_one_line(tmp_path: Path, data: bytes, offset: int) -> None:
    path = tmp_path / "job.yaml"
    path.write_bytes(data)
    assert _load_problems(path) == [f"{path}: not UTF-8 text (byte 0x{data[offset]:02x} at offset {offset})"]


def test_directory_instead_of_spec_is_one_line(tmp_path: Path) -> None:
    assert _load_problems(tmp_path) == [f"{tmp_path}: cannot read: Is a directory"]


def test_on_is_a_key_not_a_boolean(tmp_path: Path) -> None:
    """YAML 1.1 reads `on:` as True; specs are read with 1.2 booleans, so `extract.on` is a key (and `yes` is
    the string 'yes', which a boolean field refuses: tests/test_jobspec.py)."""
    path = tmp_path / "job.yaml"
    path.write_text("name: x\noutput: runs/x\ndataset: {sources: [{type: advbench}]}\n"
                    "generate: {enabled: true}\nextract:\n  on: [prompt, response]\n")
    spec = load_spec(path)
    assert spec.extract.on == ("prompt", "response") and spec.generate.enabled is True


def test_quoted_yes_in_a_spec_file_is_refused(tmp_path: Path) -> None:
    path = write_spec(tmp_path / "job.yaml", small_spec("out", model={"trust_remote_code": "yes"},
                                                        guard={"model": {"id": "org/guard", "trust_remote_code": 1}}))
    problems = _load_problems(path)
    assert problems == [f"{path}: model.trust_remote_code: expected true or false (a YAML boolean), got 'yes'",
                        f"{path}: guard.model.trust_remote_code: expected true or false (a YAML boolean), got 1"]


# ------------------------------------------------------------------------------------ YAML limits
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
    line = one_line_exit_2(guardray(command, str(path)))
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
    line = one_line_exit_2(guardray("validate", str(path)))
    assert line == f"error: {path}: nested more than 64 levels deep at line 4"


# ------------------------------------------------------------------------------ where the job runs
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


def test_a_worker_rebuilds_the_spec_without_importing_scikit_learn(tmp_path: Path) -> None:
    """Model actors and dataset tasks rebuild the driver's spec; the probe grid's estimator checks (scikit-learn,
    SciPy: over a second of CPU per process) are the driver's job. A fresh interpreter shows what gets imported."""
    import subprocess
    import sys

    spec = validate_spec(small_spec(str(tmp_path), probes={"grid": [{"type": "ridge", "params": {"alpha": [1, 2]}}]}))
    code = ("import json, sys; from guardray.jobspec import spec_for_worker; "
            "spec = spec_for_worker(json.loads(sys.argv[1])); "
            "print(spec.probes.grid[0].type, 'sklearn' in sys.modules, 'scipy' in sys.modules)")
    shown = subprocess.run([sys.executable, "-c", code, spec.model_dump_json()], capture_output=True, text=True,
                           cwd=REPO, check=True).stdout.split()
    assert shown == ["ridge", "False", "False"]
    from guardray.jobspec import spec_for_worker

    assert spec_for_worker(spec.model_dump(mode="json")) == spec
    with pytest.raises(SpecError, match="probes.grid.0.type: unknown probe type 'rige'"):  # the driver still checks
        validate_spec(small_spec(str(tmp_path), probes={"grid": [{"type": "rige"}]}))
