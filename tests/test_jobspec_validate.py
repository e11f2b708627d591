"""`validate_job` (guardray/jobspec/validate.py): the checks that need the registries above the schema. The schema
alone accepts any probe type or affix; these tests fail if `load_spec` / `validate_spec` skip the registry."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from guardray.errors import SpecError
from guardray.jobspec import JobSpec, load_spec, validate_job, validate_spec
from tests.conftest import small_spec, write_spec
from tests.test_jobspec_loading import guardray, one_line_exit_2

BAD_GRID = {"grid": [{"type": "rige"}, {"type": "linear_svc", "params": {"CC": 1}},
                     {"type": "logistic_regression", "params": {"C": [0.1, -1.0]}}]}


def _problems(call: Callable[..., object], *args: object) -> list[str]:
    with pytest.raises(SpecError) as info:
        call(*args)
    return info.value.problems


def test_the_schema_leaves_probe_types_and_parameters_to_validate_job() -> None:
    spec = JobSpec.model_validate(small_spec("out", probes=BAD_GRID))  # no registry below the schema
    problems = _problems(validate_job, spec, "job.yaml")
    assert problems[:2] == ["job.yaml: probes.grid.0.type: unknown probe type 'rige'; did you mean 'ridge'?",
                            "job.yaml: probes.grid.1: linear_svc has no parameter 'CC'; did you mean 'C'?"]
    assert problems[2].startswith("job.yaml: probes.grid.2: logistic_regression {'C': -1.0}: The 'C' parameter")
    assert len(problems) == 3
    assert _problems(validate_spec, small_spec("out", probes=BAD_GRID), "job.yaml") == problems


def test_validate_job_checks_the_affixes() -> None:
    raw = small_spec("out")
    raw["dataset"]["adversarial_affixes"] = ["(unclosed", r"sure, here is$"]
    (line,) = _problems(validate_job, JobSpec.model_validate(raw))
    assert line.startswith("<spec>: dataset.adversarial_affixes: [0] '(unclosed' is not a valid RE2 regular")


def test_a_valid_spec_passes_unchanged() -> None:
    spec = JobSpec.model_validate(small_spec("out", probes={"grid": [{"type": "ridge", "params": {"alpha": [1, 2]}}]}))
    assert validate_job(spec) is spec


def test_registry_and_schema_problems_come_at_once_in_field_order() -> None:
    """Where the schema refuses other fields, the registry checks still run on the sections they read; an entry
    the schema refuses is not built (as before, when the checks were validators)."""
    raw = small_spec("out", extract={"layres": [1]}, evaluate={"bootstrap": -1}, probes={"grid": [
        {"type": "rige"}, {"type": "linear_svc", "preprocessing": "scale", "params": {"CC": 1}}]})
    raw["dataset"]["adversarial_affixes"] = ["(unclosed"]
    fields = [line.split(": ")[1] for line in _problems(validate_spec, raw, "job.yaml")]
    assert fields == ["dataset.adversarial_affixes", "extract.layres", "probes.grid.0.type",
                      "probes.grid.1.preprocessing", "evaluate.bootstrap"]


def test_load_spec_runs_validate_job(tmp_path: Path) -> None:
    path = write_spec(tmp_path / "job.yaml", small_spec(str(tmp_path / "out"), probes={"grid": [{"type": "ridge"}]}))
    assert load_spec(path).probes.grid[0].type == "ridge"
    (line,) = _problems(load_spec, path, ["probes.grid.0.type=rige"])
    assert line == f"{path}: probes.grid.0.type: unknown probe type 'rige'; did you mean 'ridge'?"
    (line,) = _problems(load_spec, path, ["probes.grid.0.params={alpha: [1.0], alphaa: 1}"], None, True)  # submit's
    assert line == f"{path}: probes.grid.0: ridge has no parameter 'alphaa'; did you mean 'alpha'?"


def test_a_registry_problem_is_exit_2_one_line(tmp_path: Path) -> None:
    path = write_spec(tmp_path / "job.yaml", small_spec(str(tmp_path / "out"), probes={"grid": [{"type": "rige"}]}))
    line = one_line_exit_2(guardray("validate", str(path)))
    assert line == f"error: {path}: probes.grid.0.type: unknown probe type 'rige'; did you mean 'ridge'?"
