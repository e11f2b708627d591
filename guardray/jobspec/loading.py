"""Reading a job spec: YAML in, a validated, frozen `JobSpec` out.

A YAML file is read with a strict safe loader, command-line overrides (`--set a.b=c`) are applied, and the result
is validated by the schema and then by `validate_job` (the checks that need the stages' registries). All problems
are reported at once, one line each, naming file and dotted field path.

A spec may come from someone else, so it is read as untrusted: at most 1 MiB, 64 levels deep and 250,000 values
after alias expansion, no key written twice, and only true/false are booleans.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from pydantic import ValidationError

from guardray.errors import SpecError, one_line
from guardray.jobspec.job import JobSpec
from guardray.jobspec.problems import location_order, problem_lines, step, unwrap
from guardray.jobspec.schema import CHECKED_ON_DRIVER, PATHS_ELSEWHERE
from guardray.jobspec.validate import job_errors, validate_job

_YAML12_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


class DuplicateKeyError(yaml.YAMLError):
    """A key written twice in one mapping; the lines are 1-based, as editors show them."""

    def __init__(self, key: Any, first_line: int, line: int):
        self.key, self.first_line, self.line = key, first_line, line
        lines = f"line {line}" if first_line == line else f"lines {first_line} and {line}"  # {a: 1, a: 2}
        super().__init__(f"duplicate key {key!r} at {lines}")


#: Largest spec file read: a job spec is a few KiB; anything near this is a mistake or an attack.
MAX_SPEC_BYTES = 1 << 20
#: Deepest nesting of lists/mappings: the composer recurses per level (5,000 levels overflow Python's stack).
MAX_DEPTH = 64
#: Largest spec after expanding aliases, in values (a scalar counts 1 per started 64 characters). A "billion
#: laughs" document is a few hundred bytes that aliases expand to 10^9 values when the spec is dumped and hashed.
MAX_EXPANDED = 250_000


class SpecLimitError(yaml.YAMLError):
    """A spec over one of the size limits above; the line is 1-based."""


class StrictSafeLoader(yaml.SafeLoader):
    """yaml's safe loader, except that a repeated key is an error, only true/false are booleans, and the
    document's nesting and its size after alias expansion are bounded.

    Plain `safe_load` keeps the last value, so a second `sources:` would silently replace the first. And YAML 1.1
    reads on/off/yes/no as booleans, so the key `on:` (extract.on) would become True; as in YAML 1.2 they stay
    strings here (and boolean fields refuse strings: they are StrictBool). Aliases are composed as shared nodes,
    so a tiny file can describe an exponentially large value; each node's expanded size is counted as it is
    composed and the load stops at MAX_EXPANDED, before anything is built from it.
    """

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    for _first in "tTfF":
        yaml_implicit_resolvers.setdefault(_first, []).insert(0, ("tag:yaml.org,2002:bool", _YAML12_BOOL))
    del _first

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0
        self._expanded: dict[int, int] = {}  # id(node) -> its size with aliases expanded; set once composed

    def compose_node(self, parent: Any, index: Any) -> Any:
        """Compose as usual, bounding the nesting depth and the expanded size of every node."""
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if id(node) not in self._expanded:  # the anchor is still being composed: a value that contains itself
                raise SpecLimitError(f"alias *{event.anchor} at line {event.start_mark.line + 1} refers to a value "
                                     "that contains it (recursive alias)")
            return node
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise SpecLimitError(f"nested more than {MAX_DEPTH} levels deep at line {event.start_mark.line + 1}")
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        size = self._size(node)
        if size > MAX_EXPANDED:
            raise SpecLimitError(f"the value at line {event.start_mark.line + 1} expands to more than "
                                 f"{MAX_EXPANDED:,} values (YAML aliases repeat what they point to)")
        self._expanded[id(node)] = size
        return node

    def _size(self, node: yaml.Node) -> int:
        if isinstance(node, yaml.ScalarNode):
            return 1 + len(node.value) // 64
        children = [item for pair in node.value for item in pair] if isinstance(node, yaml.MappingNode) else node.value
        return 1 + sum(self._expanded[id(child)] for child in children)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        _check_duplicate_keys(self, node)
        return super().construct_mapping(node, deep=deep)


def _check_duplicate_keys(loader: yaml.SafeLoader, node: yaml.MappingNode) -> None:
    """Raise DuplicateKeyError at the second occurrence of a key among the mapping's own keys.

    Keys brought in by a merge (`<<: *base`) are left out: overriding those is what merges are for.
    """
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            if key in seen:
                raise DuplicateKeyError(key, seen[key], line)
            seen[key] = line
        except TypeError:  # an unhashable key (a list): the base constructor reports it
            continue


def _read_yaml(path: Path) -> Any:
    """Parse a spec file as UTF-8 YAML; every way it can be unreadable becomes one SpecError line."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_SPEC_BYTES + 1)  # bounded: a huge file or /dev/zero is never read whole
        if len(data) > MAX_SPEC_BYTES:
            raise SpecError([f"{path}: larger than {MAX_SPEC_BYTES >> 20} MiB: not a job spec"])
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise SpecError([f"{path}: file not found"]) from None
    except UnicodeDecodeError as e:
        raise SpecError([f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"]) from None
    except OSError as e:  # a directory, no permission
        raise SpecError([f"{path}: cannot read: {e.strerror or e}"]) from None
    try:
        return yaml.load(text, Loader=StrictSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except (DuplicateKeyError, SpecLimitError) as e:
        raise SpecError([f"{path}: {e}"]) from None
    except yaml.YAMLError as e:
        raise SpecError([f"{path}: not valid YAML: {one_line(e, 10_000)}"]) from None


def load_spec(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = (), output: str | None = None,
              paths_elsewhere: bool = False) -> JobSpec:
    """Read, override and validate a job spec: a YAML file, or the spec as a mapping (from Python: a copy is
    validated, the caller's mapping is left alone). Raises SpecError listing every problem, one line each.
    `paths_elsewhere`: the job runs on another machine (submit), so local paths are checked in form only."""
    if isinstance(source, Mapping):
        path, raw = "<spec>", copy.deepcopy(dict(source))
    else:
        path = Path(source)
        raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise SpecError([f"{path}: the spec must be a mapping of sections, got {type(raw).__name__}"])
    problems = []
    for item in overrides:
        try:
            apply_override(raw, item)
        except ValueError as e:
            shown = item if len(item) <= 120 else f"{item[:80]}...{item[-20:]}"  # a huge value stays one short line
            problems.append(f"{path}: --set {shown}: {e}")
    if output:
        raw["output"] = output
    if problems:
        raise SpecError(problems)
    return validate_spec(raw, str(path), PATHS_ELSEWHERE if paths_elsewhere else None)


def spec_for_worker(spec_json: dict[str, Any]) -> JobSpec:
    """Rebuild, in a Ray worker, a spec the driver validated: the same model, without `validate_job`'s checks
    (the probe grid's scikit-learn estimators) or those of the driver's files. The estimator checks import
    scikit-learn and SciPy (about 1.3 s of CPU) in every process that rebuilds a spec. Dataset tasks and vLLM's
    tokenizer-only UDFs are spared it; a transformers model actor imports scikit-learn anyway
    (`transformers.generation` does when it is installed)."""
    return JobSpec.model_validate(spec_json, context=CHECKED_ON_DRIVER)


def validate_spec(raw: dict[str, Any], origin: str = "<spec>", context: dict[str, Any] | None = None) -> JobSpec:
    """A raw spec through the schema, then `validate_job`. Where the schema refuses it, `validate_job`'s checks
    still run on the raw sections they read, so every problem is reported at once, in the schema's field order."""
    try:
        spec = JobSpec.model_validate(raw, context=context)
    except ValidationError as e:
        errors = [*e.errors(), *job_errors(raw)]
        raise SpecError(problem_lines(origin, sorted(errors, key=lambda err: location_order(err["loc"])))) from None
    return validate_job(spec, origin)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply `dotted.path=value` to the raw YAML dict. Values are typed by the schema field they land in."""
    if "=" not in item:
        raise ValueError("expected dotted.path=value")
    dotted, text = item.split("=", 1)
    keys = dotted.strip().split(".")
    node: Any = raw
    for key in keys[:-1]:
        if isinstance(node, list):
            node = node[_index(key, node)]
        else:
            node = node.setdefault(key, {})
            if node is None:
                raise ValueError(f"'{key}' is empty")
    value = _typed_value(keys, text)
    if isinstance(node, list):
        node[_index(keys[-1], node)] = value
    else:
        node[keys[-1]] = value


def _index(key: str, node: list[Any]) -> int:
    if not key.lstrip("-").isdigit() or not -len(node) <= int(key) < len(node):
        raise ValueError(f"'{key}' is not an index of a list of {len(node)}")
    return int(key)


def _typed_value(keys: list[str], text: str) -> Any:
    """YAML-parse the value unless the schema field is a plain string (so `name=123` stays '123')."""
    model: Any = JobSpec
    for key in keys:
        if model is not None:
            _, model = step(model, int(key) if key.lstrip("-").isdigit() else key)
    if unwrap(model) is str:
        return text
    if len(text) > MAX_SPEC_BYTES:
        raise ValueError(f"value larger than {MAX_SPEC_BYTES >> 20} MiB")
    try:
        return yaml.load(text, Loader=StrictSafeLoader) if text.strip() else None  # noqa: S506 - a SafeLoader subclass
    except (DuplicateKeyError, SpecLimitError) as e:
        raise ValueError(str(e)) from None
    except yaml.YAMLError as e:
        raise ValueError(f"not a YAML value: {_yaml_problem(e)}") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A parser error as one short line: what went wrong and the column (the value is one line)."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem:
        mark = error.problem_mark
        return f"{error.problem}" + (f" at column {mark.column + 1}" if mark is not None else "")
    return one_line(error, 200)
