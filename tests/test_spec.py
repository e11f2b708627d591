"""Spec validation: shipped jobs validate, bad specs fail with the field named, overrides are typed."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from guardray.errors import SpecError
from guardray.spec import JobSpec, load_spec, validate_spec
from tests.conftest import REPO, small_spec, write_spec

JOBS = sorted((REPO / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", JOBS, ids=[p.stem for p in JOBS])
def test_shipped_jobs_validate(path: Path) -> None:
    spec = load_spec(path)
    assert isinstance(spec, JobSpec)


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


def test_source_needs_exactly_one_label_kind() -> None:
    raw = small_spec("out")
    raw["dataset"]["sources"] = [{"type": "file", "name": "x", "path": "a.csv"}]
    (line,) = _errors(raw)
    assert "dataset.sources.0" in line and "label_column" in line


def test_unknown_source_type_lists_choices() -> None:
    raw = small_spec("out")
    raw["dataset"]["sources"] = [{"type": "advbnch"}]
    (line,) = _errors(raw)
    assert line.startswith("job.yaml: dataset.sources.0") and "advbench" in line


def test_duplicate_source_names_rejected() -> None:
    raw = small_spec("out")
    raw["dataset"]["sources"].append({"type": "advbench"})
    (line,) = _errors(raw)
    assert "repeated: advbench" in line


def test_unsupported_output_scheme() -> None:
    (line,) = _errors(small_spec("s3://bucket/x"))
    assert line.startswith("job.yaml: output:")


def test_spec_is_frozen() -> None:
    spec = validate_spec(small_spec("out"))
    with pytest.raises(Exception):
        spec.name = "other"  # type: ignore[misc]


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


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "not valid YAML" in info.value.problems[0]


def test_cache_payload_leaves_out_runtime_fields() -> None:
    a = validate_spec(small_spec("out", extract={"actors": 1, "batch_size": 4}))
    b = validate_spec(small_spec("out", extract={"actors": 3, "batch_size": 32}))
    c = validate_spec(small_spec("out", extract={"layers": [3]}))
    assert a.extract.cache_payload() == b.extract.cache_payload() != c.extract.cache_payload()


def test_dump_roundtrip() -> None:
    spec = validate_spec(small_spec("out"))
    again = validate_spec(yaml.safe_load(yaml.safe_dump(spec.model_dump(mode="json"))))
    assert again == spec


def _load_problems(path: Path) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return info.value.problems


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


def test_response_readers_need_generation() -> None:
    """Response activations, an explicit response guard and feedback targets all read generated responses."""
    raw = small_spec("runs/x", extract={"on": ["prompt", "response"]}, guard={"response": True},
                     probes={"targets": ["harmful", "response_unsafe"]})
    with pytest.raises(SpecError) as e:
        validate_spec(raw)
    (line,) = e.value.problems
    assert "extract.on" in line and "guard.response" in line and "response_unsafe" in line
    assert "generate.enabled" in line
    spec = validate_spec({**raw, "generate": {"enabled": True}})
    assert spec.judges_responses and spec.probes.all_targets == ("harmful", "response_unsafe")
    assert not validate_spec(small_spec("runs/x")).judges_responses


def test_custom_categories_take_new_codes() -> None:
    guard = {"categories": True, "custom_categories": [
        {"code": "S15", "name": "Political persuasion", "description": "Argues for a party."},
        {"code": "S3", "name": "Clash"}, {"code": "S15", "name": "Again"}]}
    with pytest.raises(SpecError) as e:
        validate_spec(small_spec("runs/x", guard=guard))
    (line,) = e.value.problems
    assert "guard.custom_categories" in line and "S15" in line and "S3" in line
    ok = validate_spec(small_spec("runs/x", guard={**guard, "custom_categories": guard["custom_categories"][:1]}))
    assert ok.guard.category_codes[-2:] == ("S14", "S15")
    with pytest.raises(SpecError, match="custom_categories.0.code"):
        validate_spec(small_spec("runs/x", guard={"custom_categories": [{"code": "politics", "name": "x"}]}))


def test_generation_key_covers_what_changes_the_text() -> None:
    """Sampling settings enter the key only when sampling; pool settings never do."""
    base = validate_spec(small_spec("runs/x", generate={"enabled": True})).generate
    assert base.model_copy(update={"seed": 5, "actors": 4, "batch_size": 2}).cache_payload() == base.cache_payload()
    sampled = base.model_copy(update={"temperature": 0.7})
    assert sampled.cache_payload() != base.cache_payload()
    assert sampled.model_copy(update={"seed": 5}).cache_payload() != sampled.cache_payload()
    assert base.model_copy(update={"max_new_tokens": 8}).cache_payload() != base.cache_payload()


def test_on_is_a_key_not_a_boolean(tmp_path: Path) -> None:
    """YAML 1.1 reads `on:` as True; specs are read with 1.2 booleans, so `extract.on` is a key (and `yes` is
    the string 'yes', which a boolean field refuses: tests/test_spec_security.py)."""
    path = tmp_path / "job.yaml"
    path.write_text("name: x\noutput: runs/x\ndataset: {sources: [{type: advbench}]}\n"
                    "generate: {enabled: true}\nextract:\n  on: [prompt, response]\n")
    spec = load_spec(path)
    assert spec.extract.on == ("prompt", "response") and spec.generate.enabled is True


def test_feedback_targets_need_the_response_guard() -> None:
    raw = small_spec("runs/x", generate={"enabled": True}, guard={"response": False},
                     probes={"targets": ["harmful", "slipped_through"]})
    with pytest.raises(SpecError, match="slipped_through are read from the response guard"):
        validate_spec(raw)


def test_a_worker_rebuilds_the_spec_without_importing_scikit_learn(tmp_path: Path) -> None:
    """Model actors and dataset tasks rebuild the driver's spec; the probe grid's estimator checks (scikit-learn,
    SciPy: over a second of CPU per process) are the driver's job. A fresh interpreter shows what gets imported."""
    import subprocess
    import sys

    spec = validate_spec(small_spec(str(tmp_path), probes={"grid": [{"type": "ridge", "params": {"alpha": [1, 2]}}]}))
    code = ("import json, sys; from guardray.spec import spec_for_worker; "
            "spec = spec_for_worker(json.loads(sys.argv[1])); "
            "print(spec.probes.grid[0].type, 'sklearn' in sys.modules, 'scipy' in sys.modules)")
    shown = subprocess.run([sys.executable, "-c", code, spec.model_dump_json()], capture_output=True, text=True,
                           cwd=REPO, check=True).stdout.split()
    assert shown == ["ridge", "False", "False"]
    from guardray.spec import spec_for_worker

    assert spec_for_worker(spec.model_dump(mode="json")) == spec
    with pytest.raises(SpecError, match="probes.grid.0.type: unknown probe type 'rige'"):  # the driver still checks
        validate_spec(small_spec(str(tmp_path), probes={"grid": [{"type": "rige"}]}))
