"""The verdict's label tokens and the guard's output columns, shared by every backend."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from guardray.columns import (GUARD_COLUMNS, GUARD_LOGIT_SAFE, GUARD_LOGIT_UNSAFE, GUARD_P_UNSAFE, GUARD_SCORE,
                              guard_category_column, judged_column)
from guardray.errors import InputError
from guardray.jobspec import GuardSpec


def resolve_label_tokens(tokenizer: Any, spec: GuardSpec) -> tuple[int, int]:
    """(safe_id, unsafe_id): explicit ids, or the first spelling where both labels are single tokens."""
    if spec.safe_token_id is not None and spec.unsafe_token_id is not None:
        return spec.safe_token_id, spec.unsafe_token_id
    if (spec.safe_token_id is None) != (spec.unsafe_token_id is None):
        raise InputError("guard: give both safe_token_id and unsafe_token_id, or neither")
    tried = []
    for safe, unsafe in _spellings(spec.safe_token, spec.unsafe_token):
        safe_ids = tokenizer(safe, add_special_tokens=False)["input_ids"]
        unsafe_ids = tokenizer(unsafe, add_special_tokens=False)["input_ids"]
        if len(safe_ids) == 1 and len(unsafe_ids) == 1:
            return safe_ids[0], unsafe_ids[0]
        tried.append(f"{safe!r}->{safe_ids} {unsafe!r}->{unsafe_ids}")
    raise InputError(
        "guard: safe/unsafe labels are not single tokens in any spelling; tried " + "; ".join(tried)
        + " (set guard.safe_token_id and guard.unsafe_token_id)"
    )


def _spellings(safe: str, unsafe: str) -> list[tuple[str, str]]:
    forms = [(safe, unsafe), (" " + safe.strip(), " " + unsafe.strip()), (safe.strip(), unsafe.strip()),
             ("\n" + safe.strip(), "\n" + unsafe.strip())]
    return list(dict.fromkeys(forms))


def guard_columns(logit_safe: np.ndarray, logit_unsafe: np.ndarray) -> dict[str, np.ndarray]:
    """The four guard outputs from the two label logits (or logprobs: the difference is the same)."""
    score = logit_unsafe - logit_safe
    return {
        GUARD_LOGIT_SAFE: logit_safe.astype(np.float32),
        GUARD_LOGIT_UNSAFE: logit_unsafe.astype(np.float32),
        GUARD_SCORE: score.astype(np.float32),
        GUARD_P_UNSAFE: (1.0 / (1.0 + np.exp(-score))).astype(np.float32),  # softmax over the two labels
    }


def category_columns(codes: Sequence[str]) -> tuple[str, ...]:
    """`guard_cat_<code>` for each policy code (`GuardSpec.category_codes`)."""
    return tuple(guard_category_column(code) for code in codes)


def output_columns(spec: GuardSpec, judge: str = "prompt") -> tuple[str, ...]:
    """Every column a guard judging `judge` writes: the four verdict columns, then the category columns when
    `guard.categories` is on; judge="response" gives the `guard_response_*` names."""
    names = GUARD_COLUMNS + (category_columns(spec.category_codes) if spec.categories else ())
    return tuple(judged_column(name, judge) for name in names)


def renamed(columns: dict[str, np.ndarray], judge: str) -> dict[str, np.ndarray]:
    """`score()`'s columns under the names for `judge` (the response guard's are `guard_response_*`)."""
    return {judged_column(name, judge): values for name, values in columns.items()}
