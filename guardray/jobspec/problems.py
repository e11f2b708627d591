"""Spec problems as one line each: pydantic's errors (and `validate_job`'s, in the same form) become
`<file>: <dotted.field.path>: <message>`, with a "did you mean" for an unknown key or source type.

The walk through the schema that names a location (`step`, `unwrap`) also types `--set` values (loading.py).
"""
from __future__ import annotations

import difflib
import types
import typing
from typing import Annotated, Any, Union

from pydantic import BaseModel

from guardray.errors import one_line
from guardray.jobspec.job import JobSpec


def problem_lines(origin: str, errors: list[Any]) -> list[str]:
    """One line per error; a union field's errors (one per member: `true/false` and `'auto'`, say) become one line."""
    lines: dict[Any, str] = {}
    for n, err in enumerate(errors):
        line = _format_error(origin, err)
        path = _dotted(err["loc"])
        key = path if len(path.split(".")) < len(err["loc"]) else n  # locations with union tags merge by field
        head = f"{origin}: {path}: "
        lines[key] = f"{lines[key]}, or {line.removeprefix(head)}" if key in lines and line.startswith(head) else line
    return list(lines.values())


def location_order(loc: tuple[Any, ...]) -> tuple[int, ...]:
    """Where a location comes in the schema: each field's place in its model (unknown keys after the fields),
    each item's index in its list. Problems from the schema and from `validate_job`, stably sorted by it, come in
    the order pydantic lists its own."""
    order: list[int] = []
    model: Any = JobSpec
    for item in loc:
        is_tag, inner = step(model, item)
        if not is_tag:
            order.append(_place(unwrap(model), item))
        model = inner
    return tuple(order)


def _place(annotation: Any, item: Any) -> int:
    fields = list(getattr(annotation, "model_fields", ()))
    if fields:
        return fields.index(item) if item in fields else len(fields)
    is_sequence = typing.get_origin(annotation) in (tuple, list)
    return item if is_sequence and isinstance(item, int) else 0  # a mapping's keys keep their input order


def _format_error(origin: str, err: dict[str, Any]) -> str:
    loc, kind = err["loc"], err["type"]
    path = _dotted(loc)
    if kind == "extra_forbidden":
        choices = _fields_at(loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), choices, n=1)
        extra = f"; did you mean '{hint[0]}'?" if hint else (f"; allowed: {', '.join(choices)}" if choices else "")
        return f"{origin}: {path}: unknown key{extra}"
    if kind == "union_tag_invalid":
        tags = [t.strip(" '") for t in err["ctx"]["expected_tags"].split(",")]
        hint = difflib.get_close_matches(str(err["ctx"]["tag"]), tags, n=1)
        extra = f"did you mean '{hint[0]}'?" if hint else f"choose one of: {', '.join(tags)}"
        field = err["ctx"]["discriminator"].strip(chr(39))
        return f"{origin}: {path}.{field}: unknown type {err['ctx']['tag']!r}; {extra}"
    if kind == "bool_type":
        return f"{origin}: {path}: expected true or false (a YAML boolean), got {one_line(repr(err['input']), 80)}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{origin}: {path or '(top level)'}: {msg}"


def _dotted(loc: tuple[Any, ...]) -> str:
    """'dataset.sources.0.text_column', dropping pydantic's discriminator tags from the location."""
    parts: list[str] = []
    model: Any = JobSpec
    for item in loc:
        is_tag, model = step(model, item)
        if not is_tag:
            parts.append(str(item))
    return ".".join(parts)


def step(annotation: Any, item: Any) -> tuple[bool, Any]:
    """Follow one element of an error location through the schema.

    Returns (is_tag, next_annotation); is_tag marks the union-branch names pydantic inserts into locations.
    """
    annotation = unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(str(item))
        return False, (unwrap(field.annotation) if field else None)
    origin = typing.get_origin(annotation)
    if origin in (tuple, list) and isinstance(item, int):
        return False, unwrap(typing.get_args(annotation)[0])
    if origin is dict:
        return False, unwrap(typing.get_args(annotation)[1])
    if origin in (Union, types.UnionType):
        for member in typing.get_args(annotation):
            tag = getattr(member, "model_fields", {}).get("type")
            if tag is not None and item in typing.get_args(tag.annotation):
                return True, member
            if getattr(member, "__name__", None) == item:
                return True, member
        return True, None
    return False, None


def unwrap(annotation: Any) -> Any:
    """Strip Annotated and Optional so the walk sees the model or container type."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return unwrap(args[0])
    return annotation


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model found at an error location (for 'did you mean')."""
    model: Any = JobSpec
    for item in loc:
        _, model = step(model, item)
        if model is None:
            return []
    model = unwrap(model)
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []
