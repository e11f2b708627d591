"""Targets: how each label the probes predict is obtained from the features stage's parts.

A target is a nullable boolean *Arrow expression* over the parts' columns, so every reader (a trial's column
read, a report task, a label count) projects and filters it in the scan itself, with no Python per row:

* a dataset label column (`harmful`, `cat_<name>`, `extra_labels`) is read as is (`columns.Target.column`);
  null = unknown, excluded;
* a feedback label (`spec.FEEDBACK_TARGETS`) is derived from the guard's scores with `spec.feedback`'s thresholds
  (`FEEDBACK`, a registry: adding one is one entry). A row missing a score it needs (null or NaN) gets a null
  label, so it is excluded from that target rather than counted as negative.

Which guard score a target is compared with in the report is decided here too (`guard_column`).
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from guardray.columns import (CATEGORY_PREFIX, GUARD_RESPONSE_SCORE, GUARD_SCORE, NOT_LABELS, RESPONSE_HARMFUL,
                              Target, category_column, guard_category_column)
from guardray.errors import InputError
from guardray.jobspec import FEEDBACK_TARGETS, FeedbackSpec, JobSpec


def _score(column: str) -> pc.Expression:
    """A guard score as float64, NaN turned into null: a missing score never compares as False."""
    value = pc.field(column).cast(pa.float64())
    return pc.if_else(pc.is_nan(value), pa.scalar(None, pa.float64()), value)


def _and(left: pc.Expression, right: pc.Expression) -> pc.Expression:
    """Null if either side is null (not Kleene logic, whose `False and null` is False: a row missing a score
    must be excluded, not counted as negative)."""
    return pc.Expression._call("and", [left, right])


def response_unsafe(feedback: FeedbackSpec) -> pc.Expression:
    """The response guard flags the generated response."""
    return _score(GUARD_RESPONSE_SCORE) > feedback.response_threshold


def slipped_through(feedback: FeedbackSpec) -> pc.Expression:
    """The input guard passed the prompt, and the response is unsafe."""
    return _and(_score(GUARD_SCORE) <= feedback.input_threshold, response_unsafe(feedback))


@dataclass(frozen=True)
class Feedback:
    needs: tuple[str, ...]
    build: Callable[[FeedbackSpec], pc.Expression]


#: Feedback labels: name → the guard columns it reads and its expression. Keys are `spec.FEEDBACK_TARGETS`.
FEEDBACK: dict[str, Feedback] = {
    "response_unsafe": Feedback((GUARD_RESPONSE_SCORE,), response_unsafe),
    "slipped_through": Feedback((GUARD_SCORE, GUARD_RESPONSE_SCORE), slipped_through),
}
assert tuple(FEEDBACK) == FEEDBACK_TARGETS, "spec.FEEDBACK_TARGETS and targets.FEEDBACK disagree"


def is_feedback(name: str) -> bool:
    return name in FEEDBACK


def uses_feedback(names: Sequence[str]) -> bool:
    """Whether any of `names` depends on the feedback thresholds (so they belong in a stage's cache key)."""
    return any(is_feedback(n) for n in names)


def available(schema: pa.Schema) -> list[str]:
    """Every target these parts can give: boolean label columns, then derivable feedback labels."""
    labels = [f.name for f in schema if f.type == pa.bool_() and f.name not in NOT_LABELS]
    return labels + [n for n, f in FEEDBACK.items() if set(f.needs) <= set(schema.names) and n not in labels]


def resolve(name: str, schema: pa.Schema, feedback: FeedbackSpec) -> Target:
    """The target `name` over parts with `schema`; a one-line InputError (did-you-mean) when it cannot be had.

    A feedback name is always derived, even if a column of that name exists: the thresholds define it.
    """
    if name in FEEDBACK and set(FEEDBACK[name].needs) <= set(schema.names):
        return Target(name, FEEDBACK[name].needs, FEEDBACK[name].build(feedback), derived=True)
    if name not in FEEDBACK and name in schema.names and schema.field(name).type == pa.bool_():
        return Target.column(name)
    labels = available(schema)
    if name in FEEDBACK:
        missing = [c for c in FEEDBACK[name].needs if c not in schema.names]
        why = f"needs {', '.join(missing)}, not in the features (generate responses with guard.response on)"
    else:
        hint = difflib.get_close_matches(name, labels, n=1)
        why = "is neither a label column of the features nor derivable" + (f"; did you mean '{hint[0]}'?" if hint else "")
    raise InputError(f"probes.targets: '{name}' {why}; labels available: {', '.join(labels) or 'none'}")


def resolve_all(names: Sequence[str], schema: pa.Schema, feedback: FeedbackSpec) -> dict[str, Target]:
    return {n: resolve(n, schema, feedback) for n in names}


# ------------------------------------------------------------------------------- matching guard score
def category_codes(spec: JobSpec) -> dict[str, str] | None:
    """Category name → guard code: `guardray.datasets.categories.CATEGORY_CODES` plus the custom categories.

    Imported lazily: the module belongs to the dataset side and may be absent (None then)."""
    try:
        codes = dict(importlib.import_module("guardray.datasets.categories").CATEGORY_CODES)
    except (ImportError, AttributeError):
        return None
    return {**codes, **{category_column(c.name): c.code for c in spec.guard.custom_categories}}


def _category_guard(spec: JobSpec, target: str) -> tuple[str, str | None]:
    codes = category_codes(spec)
    if codes is None:
        return GUARD_SCORE, ("no category mapping (guardray.datasets.categories.CATEGORY_CODES): compared with "
                             f"{GUARD_SCORE}")
    if target not in codes:
        return GUARD_SCORE, f"category '{target}' has no guard code: compared with {GUARD_SCORE}"
    return guard_category_column(codes[target]), None


#: Default guard score per kind of target (evaluate.guard_for overrides it). Feedback labels are compared with
#: the INPUT guard: the question is how well the prompt alone predicts them, before any token is generated.
DEFAULT_GUARD: dict[str, Callable[[JobSpec, str], tuple[str, str | None]]] = {
    "category": _category_guard,
    "response": lambda spec, target: (GUARD_RESPONSE_SCORE, None),
    "other": lambda spec, target: (GUARD_SCORE, SLIPPED_NOTE if target == "slipped_through" else None),
}

#: Why the input guard's figures for `slipped_through` are no benchmark (the section says so).
SLIPPED_NOTE = (f"by construction every positive of slipped_through passed the input guard ({GUARD_SCORE} <= "
                "feedback.input_threshold), so the input guard ranks them low: its figures here show what it "
                "missed, not how well it could do")


#: Labels of the reply itself (a given response's `response_harmful`): compared with the response guard, and
#: their headline probe reads the response's activations.
RESPONSE_LABELS = frozenset({RESPONSE_HARMFUL})


def labels_the_response(target: str) -> bool:
    return target in RESPONSE_LABELS


def _kind(target: str) -> str:
    if labels_the_response(target):
        return "response"
    return "category" if target.startswith(CATEGORY_PREFIX) else "other"


def guard_column(spec: JobSpec, target: str, schema_names: Sequence[str]) -> tuple[str, str | None]:
    """(guard score column, note or None) the target's best probe is compared with.

    `evaluate.guard_for[target]` when given, else the default of its kind; a column absent from the features
    falls back to guard_score, with a note saying so."""
    column, note = ((spec.evaluate.guard_for[target], None) if target in spec.evaluate.guard_for
                    else DEFAULT_GUARD[_kind(target)](spec, target))
    if column not in schema_names:
        note = f"{column} is not in the features: compared with {GUARD_SCORE} instead"
        column = GUARD_SCORE
    return column, note
