"""What every renderer shares: the encoded row (`Encoded`), character spans to token spans, and truncation.

Renderers find the user's texts in a rendering by their characters and map them to tokens with the tokenizer's
offsets (`token_span`); a token that merges template text with user text counts as the user's, so mean pooling
sees all of the user's text. Truncation cuts only user tokens (`cut`), so template tokens never are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from guardray.errors import InputError
from guardray.tokenizing import Tokens

#: Stands for the prompt when a template is rendered to find what it prints around the prompt.
SENTINEL = "\ue000GUARDRAY_USER_TEXT\ue000"

# Texts that start and end with each kind of character tokenizers treat differently (letters, spaces, newlines,
# digits, punctuation, emoji, CJK, template markup), rendered once to find the tokens no user text can change.
PROBES = ("", " ", "a", "Hello", " hello there ", "\n\nNew\nlines\n\n", "\tx\t", "123", "!?", "'s", ".",
          "😀 emoji 😀", "日本語", "[/INST]", "<|im_end|>", "</s>", "{{ braces }}", "  two  spaces  ", "x" * 64)

TRUNCATIONS = ("middle", "start")


@dataclass(frozen=True)
class Encoded:
    """A rendered row: token ids, where the text that matters sits in them (the last user turn; the response
    for a response renderer), and what was cut to fit `max_length`."""

    ids: list[int]
    user_start: int
    user_end: int
    n_tokens: int  # length before truncation (after any dropped turns)
    truncated: bool
    dropped_turns: int = 0  # a conversation's oldest turns left out to fit max_length


class RendererSettings:
    """What every renderer holds: its tokenizer and template, the length it fits rows to and how it cuts.

    `prefix` is the ids every row starts with (measured by the renderer); `prefix_required`: every row must
    start with it (the HF guard computes its key/value cache once for it), else only rows without a system turn
    of their own must (a persona changes the chat model's head). `reads_system`: a row's own system turn is
    rendered (the chat model); a guard's renderer leaves it out (a persona instructs the chat model, it is not a
    turn the guard judges), so its rows all share the guard's head.
    """

    def __init__(self, tokenizer: Any, template: Callable[..., str], max_length: int, truncation: str):
        if truncation not in TRUNCATIONS:
            raise InputError(f"truncation {truncation!r} is not one of {', '.join(TRUNCATIONS)}")
        self.tokenizer, self.template = tokenizer, template
        self.max_length, self.truncation = max_length, truncation
        self.prefix: list[int] = []
        self.prefix_required = False
        self.reads_system = True


def token_span(tokens: Tokens, a: int, b: int, skip: int) -> tuple[int, int]:
    """Indices [start, end) of the tokens overlapping characters [a, b); `skip` tokens are known to lie before.

    A token straddling a or b holds the user's characters too, so it is the user's. With an empty span (a == b)
    only a token straddling a is the user's.
    """
    offsets = tokens.offsets
    stop = len(offsets) - tokens.trail
    start = max(skip, tokens.lead)
    while start < stop and offsets[start][1] <= a:
        start += 1
    end = stop
    while end > start and offsets[end - 1][0] >= b:
        end -= 1
    return start, end


def caught(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), or the exception it raised (a template's own raise_exception included)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - one prompt's failure belongs to its row, not to the batch
        return e


def caught_tokens(fn: Callable[..., Any], tokens: Tokens | Exception, *args: Any) -> Any:
    """`caught(fn, tokens, *args)`, passing on the exception that tokenising the row already raised."""
    return tokens if isinstance(tokens, Exception) else caught(fn, tokens, *args)


def common_prefix(rows: Sequence[Sequence[Any]]) -> int:
    """Length of the longest prefix all rows share."""
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows[1:]):
            return i
    return n


def cut(tokens: list[int], budget: int, keep_last: bool, truncation: str) -> list[int]:
    """Text tokens cut to `budget`. `keep_last`: the last token also holds template text (a merge like
    "?\\n\\n"), so it is kept and the template's text stays whole."""
    if budget <= 0:
        return []
    if keep_last and budget == 1:
        return tokens[-1:]
    if truncation == "middle":
        head = (budget + 1) // 2
        return tokens[:head] + tokens[len(tokens) - (budget - head):]
    if keep_last:
        return tokens[:budget - 1] + tokens[-1:]
    return tokens[:budget]
