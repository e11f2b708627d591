"""The spec's schema (guardray/jobspec/schema.py, dataset.py, job.py): bad sections fail with the field named,
booleans are real booleans, pool sizes and file modes make sense, and cache keys leave out how a stage runs."""
from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from guardray.errors import SpecError
from guardray.jobspec import JobSpec, validate_spec
from tests.conftest import small_spec, write_spec
from tests.test_jobspec_loading import guardray, one_line_exit_2


def _errors(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as info:
        validate_spec(raw, "job.yaml")
    return info.value.problems


# ---------------------------------------------------------------------------------------- sections
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


def test_feedback_targets_need_the_response_guard() -> None:
    raw = small_spec("runs/x", generate={"enabled": True}, guard={"response": False},
                     probes={"targets": ["harmful", "slipped_through"]})
    with pytest.raises(SpecError, match="slipped_through are read from the response guard"):
        validate_spec(raw)


def test_a_grid_that_expands_past_the_cap_is_refused(tmp_path: Path) -> None:
    """Every grid point is built at validate: five lists of 100 values would be 10^10 estimators (the old code
    exhausted memory expanding them). Run through the CLI, under the memory limit, so a regression fails alone."""
    params = {name: [1.0] * 100 for name in ("C", "tol", "intercept_scaling", "l1_ratio", "max_iter")}
    path = write_spec(tmp_path / "job.yaml", small_spec(
        str(tmp_path / "out"), probes={"grid": [{"type": "logistic_regression", "params": params}]}))
    line = one_line_exit_2(guardray("validate", str(path)))
    assert line == f"error: {path}: probes.grid.0.params: the lists expand to more than 10,000 grid points"


# --------------------------------------------------------------------------------------- cache keys
def test_cache_payload_leaves_out_runtime_fields() -> None:
    a = validate_spec(small_spec("out", extract={"actors": 1, "batch_size": 4}))
    b = validate_spec(small_spec("out", extract={"actors": 3, "batch_size": 32}))
    c = validate_spec(small_spec("out", extract={"layers": [3]}))
    assert a.extract.cache_payload() == b.extract.cache_payload() != c.extract.cache_payload()


def test_generation_key_covers_what_changes_the_text() -> None:
    """Sampling settings enter the key only when sampling; pool settings never do."""
    base = validate_spec(small_spec("runs/x", generate={"enabled": True})).generate
    assert base.model_copy(update={"seed": 5, "actors": 4, "batch_size": 2}).cache_payload() == base.cache_payload()
    sampled = base.model_copy(update={"temperature": 0.7})
    assert sampled.cache_payload() != base.cache_payload()
    assert sampled.model_copy(update={"seed": 5}).cache_payload() != sampled.cache_payload()
    assert base.model_copy(update={"max_new_tokens": 8}).cache_payload() != base.cache_payload()


def test_the_dataset_rules_reach_the_schema() -> None:
    """Presets and the dataset stage key's rule tables live in guardray.datasets, above the schema, and are handed
    to it (guardray/jobspec/links.py): a preset fills its source, the key carries the normalisation and category rules."""
    from guardray.datasets import categories, normalize

    spec = validate_spec(small_spec("out", dataset={"sources": [{"type": "huggingface", "preset": "advbench_hf"},
                                                                {"type": "donotanswer"}]}))
    assert spec.dataset.sources[0].repo and spec.dataset.sources[0].harmful is True
    key = spec.dataset.cache_payload()
    assert key["normalisation"]["affixes"] == normalize.AFFIXES and key["categories"]
    assert key["categories"] == categories.cache_key(["huggingface", "donotanswer"])["categories"]


def test_dump_roundtrip() -> None:
    spec = validate_spec(small_spec("out"))
    again = validate_spec(yaml.safe_load(yaml.safe_dump(spec.model_dump(mode="json"))))
    assert again == spec


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


# ------------------------------------------------------------------------------------------ pools
@pytest.mark.parametrize("section, field, value", [
    ("extract", "actors", 0), ("extract", "actors", -2), ("generate", "actors", 0), ("extract", "max_actors", 0),
    ("extract", "batch_size", 0), ("generate", "batch_size", -1), ("extract", "rows_per_shard", 0),
])
def test_pool_sizes_below_one_are_refused(section: str, field: str, value: int) -> None:
    """`actors: 0` used to run one actor silently."""
    (line,) = _errors(small_spec("out", **{section: {field: value}}))
    assert line.startswith(f"job.yaml: {section}.{field}: Input should be greater than or equal to 1")


# ------------------------------------------------------------------------------------ output, file mode
def test_an_output_that_is_a_file_is_exit_2(tmp_path: Path) -> None:
    """It failed with exit 1 when the first stage tried to make a directory there."""
    existing = tmp_path / "results.txt"
    existing.write_text("not a directory")
    path = write_spec(tmp_path / "job.yaml", small_spec(str(existing)))
    line = one_line_exit_2(guardray("validate", str(path)))
    assert line == f"error: {path}: output: '{existing}' exists and is not a directory"
    assert validate_spec(small_spec(str(tmp_path))).output == str(tmp_path)  # an existing directory is fine


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
