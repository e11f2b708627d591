"""The checks of a spec that need registries above the schema: probe types and their parameters
(guardray.probes.registry) and the dataset's adversarial affixes (guardray.datasets.normalize).

`validate_job` runs them on a JobSpec; `load_spec` and `validate_spec` call it after the schema. Each check reads
plain spec data, so `validate_spec` can also run them on a raw spec the schema refused elsewhere and report
every problem at once. Their problems have the schema's form (the dotted field path, e.g.
`probes.grid.0.type: unknown probe type ...`), and a SpecError is exit 2 as the schema's are.

The registries are imported when a check runs, not with this module: a worker rebuilding a driver-checked spec
(`spec_for_worker`) never imports scikit-learn.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from pydantic import BaseModel, TypeAdapter, ValidationError

from guardray.errors import SpecError
from guardray.jobspec.job import JobSpec, ProbeGridEntry
from guardray.jobspec.problems import problem_lines

#: A problem in pydantic's error form: `loc` (the field path), `type` and `msg`.
Problem = dict[str, Any]


def validate_job(spec: JobSpec, origin: str = "<spec>") -> JobSpec:
    """The spec, once every registry check passes; else a SpecError, one line per problem naming the field."""
    errors = job_errors(spec.model_dump())
    if errors:
        raise SpecError(problem_lines(origin, errors))
    return spec


def job_errors(raw: Mapping[str, Any]) -> list[Problem]:
    """Every registry check on raw spec data; a section the schema would refuse is passed over (the schema
    reports it), as a field validator does not run on a value of the wrong type."""
    return [problem for check in CHECKS for problem in check(raw)]


def _probe_grid(raw: Mapping[str, Any]) -> list[Problem]:
    """Each grid entry's type is registered; an entry the schema accepts builds every grid point's estimator now,
    so a bad parameter fails at validate, not after the GPU stage."""
    from guardray.probes.registry import check_probe_params, check_probe_type

    grid = _at(raw, "probes", "grid")
    problems = []
    for i, entry in enumerate(grid if isinstance(grid, (list, tuple)) else ()):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("type"), str):
            continue
        loc = ("probes", "grid", i)
        if problem := _failure((*loc, "type"), check_probe_type, entry["type"]):
            problems.append(problem)
        elif (parsed := _parsed(ProbeGridEntry, entry)) is not None and \
                (problem := _failure(loc, check_probe_params, parsed.type, parsed.params)):
            problems.append(problem)
    return problems


def _affixes(raw: Mapping[str, Any]) -> list[Problem]:
    """Each extra affix is a valid RE2 regex that does not match the empty string, all named in one line."""
    from guardray.datasets.normalize import check_affix

    affixes = _parsed(_STRINGS, _at(raw, "dataset", "adversarial_affixes")) or ()
    found = [f"[{i}] {p!r} {why}" for i, p in enumerate(affixes) if (why := check_affix(p))]
    return [_problem(("dataset", "adversarial_affixes"), "; ".join(found))] if found else []


#: The registry checks, in the order their sections come in the spec.
CHECKS: tuple[Callable[[Mapping[str, Any]], list[Problem]], ...] = (_affixes, _probe_grid)

_STRINGS = TypeAdapter(tuple[str, ...])


def _at(raw: Mapping[str, Any], *keys: str) -> Any:
    """raw[k1][k2]..., or None where a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(raw, Mapping):
            return None
        raw = raw.get(key)
    return raw


def _parsed(schema: type[BaseModel] | TypeAdapter, value: Any) -> Any:
    """`value` as the schema reads it, or None where the schema refuses it."""
    try:
        return schema.validate_python(value) if isinstance(schema, TypeAdapter) else schema.model_validate(value)
    except ValidationError:
        return None


def _failure(loc: tuple[Any, ...], check: Callable[..., None], *args: Any) -> Problem | None:
    """The ValueError a registry check raises, as a problem at `loc`."""
    try:
        check(*args)
    except ValueError as e:
        return _problem(loc, str(e))
    return None


def _problem(loc: tuple[Any, ...], message: str) -> Problem:
    return {"loc": loc, "type": "value_error", "msg": message}
