"""Where a conversation row's texts sit in its rendering, and which turns to leave out when it is too long.

A prompt-only row is found by rendering a sentinel once per renderer (`PromptRenderer`). A conversation row has
its own history and system turn, so its texts are found per row: the row rendered with a marker in place of each
text, then the markers replaced by the texts; when that gives the real rendering exactly, every text's place is
known. A template that changes message text on the way (trims it, or drops an earlier answer's reasoning) is
tried with the texts trimmed as Jinja's `trim` and Python's `strip` would; if no form matches, the history's
places are unknown, and the row is refused only if a history text holds a control token (then it could not be
read as plain text: fail closed). The prompt's own place is always found from the sentinel rendering, as for
prompt-only rows.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from guardray.chats import Chat
from guardray.errors import InputError
from guardray.rendering.spans import SENTINEL, common_prefix, token_span
from guardray.tokenizing import Tokens

_MARK = "\ue000GUARDRAY_TEXT_{}\ue000"
_MARKS = re.compile("\ue000GUARDRAY_TEXT_(\\d+)\ue000")
_TRIMS: tuple[Callable[[str], str], ...] = (lambda t: t, str.strip, str.rstrip, str.lstrip)


@dataclass(frozen=True)
class Placed:
    """A conversation row's rendering and the character spans of its texts in it."""

    full: str
    prompt: tuple[int, int]
    response: tuple[int, int] | None
    context: list[tuple[int, int]]  # the row's own system turn and history texts that were found
    turns: list[tuple[int, int] | None]  # each history turn's content, oldest first (None: not found)

    @property
    def user_spans(self) -> list[tuple[int, int]]:
        """Every user-controlled span: read as plain text, never as template tokens."""
        return [self.prompt, *([self.response] if self.response else []), *self.context]


def place(render: Callable[..., str], chat: Chat, *response: str, added: Sequence[str] = ()) -> Placed:
    """The row rendered (`render(chat, *response)`) with its texts' places; InputError when the prompt's (or the
    response's) place is unknown, or a history text holding one of the tokenizer's `added` tokens cannot be
    placed."""
    texts = ([chat.system] if chat.system else []) + [content for _, content in chat.history] + \
        [chat.prompt] + list(response)
    if any("\ue000GUARDRAY_" in text for text in texts):  # would be taken for the markers placing the texts
        raise InputError("messages: a message holds guardray's own private-use marker text: refused")
    full = render(chat, *response)
    marks = [_MARK.format(i) for i in range(len(texts))]
    own = int(bool(chat.system))
    marked = Chat(marks[len(texts) - 1 - len(response)],
                  tuple((role, mark) for (role, _), mark in zip(chat.history, marks[own:])),
                  marks[0] if own else chat.system)
    skeleton = render(marked, *marks[len(texts) - len(response):])
    for trim in _TRIMS:
        found = _substituted(skeleton, [trim(t) for t in texts], full)
        if found is not None:
            if own and not found.get(0):
                raise InputError("the chat template drops the system turn, so this row's persona would be lost")
            break
    else:
        found = {i: [span] for i, span in _sentinel_spans(render, chat, full, texts, response, added).items() if span}
    n_history = len(chat.history)
    prompt_at = own + n_history
    judged = [prompt_at, *([prompt_at + 1] if response else [])]
    if any(len(found.get(i, [])) != 1 for i in judged):
        raise InputError("the chat template changed its own text around this conversation (or printed its prompt "
                         "or response more than once), so their places in the rendering are unknown")
    context = [span for i in range(prompt_at) for span in found.get(i, [])]
    return Placed(full, found[prompt_at][0], found[prompt_at + 1][0] if response else None, context,
                  [found[own + i][0] if found.get(own + i) else None for i in range(n_history)])


def _substituted(skeleton: str, texts: Sequence[str], full: str) -> dict[int, list[tuple[int, int]]] | None:
    """{text index: its spans} when the skeleton with each marker replaced by its text is `full`, else None. A
    text the template printed twice has two spans (both are user text); one it left out has none."""
    parts, spans, at, length = [], {}, 0, 0
    for found in _MARKS.finditer(skeleton):
        i = int(found.group(1))
        parts.append(skeleton[at:found.start()])
        length += found.start() - at
        spans.setdefault(i, []).append((length, length + len(texts[i])))
        parts.append(texts[i])
        length += len(texts[i])
        at = found.end()
    parts.append(skeleton[at:])
    return spans if "".join(parts) == full else None


def _sentinel_spans(render: Callable[..., str], chat: Chat, full: str, texts: Sequence[str],
                    response: Sequence[str], added: Sequence[str]) -> dict[int, tuple[int, int] | None]:
    """The prompt's place (and the response's) from renderings with a sentinel in its place, when the template
    rewrote some history text; the history's places stay unknown, so a history text holding a control token
    is refused (it could not be read as plain text)."""
    prompt_at = len(texts) - 1 - len(response)
    held = next((token for text in texts[:prompt_at] for token in added if token in text), None)
    if held is not None:
        raise InputError(f"messages: a message holds the control token {held!r}, and this chat template changes "
                         "message text, so it cannot be read as plain text exactly: refused")
    spans = {prompt_at: _between(full, render(Chat(SENTINEL, chat.history, chat.system), *response))}
    if response:
        spans[prompt_at + 1] = _between(full, render(chat, SENTINEL))
    return spans


def _between(full: str, with_sentinel: str) -> tuple[int, int] | None:
    """The span of `full` where `with_sentinel` has the sentinel, if the rest of the two renderings agree."""
    before, _, after = with_sentinel.partition(SENTINEL)
    a, b = len(before), len(full) - len(after)
    return (a, b) if full.startswith(before) and full.endswith(after) and b >= a else None


def turns_to_drop(tokens: Tokens, placed: Placed, excess: int) -> int:
    """How many of the oldest history turns to leave out to save `excess` tokens (at least one). A turn's
    tokens run from its text's start to the next text's (its template tokens come with it), so the count is
    exact up to merges across the cut, which the caller's re-rendering settles."""
    starts = [span[0] if span else None for span in placed.turns] + [placed.prompt[0]]
    dropped = 0
    for here, after in zip(starts, starts[1:]):
        dropped += 1
        if here is None or after is None:
            break  # a turn the template rewrote: one at a time
        saved = token_span(tokens, here, after, 0)
        excess -= saved[1] - saved[0]
        if excess <= 0:
            break
    return max(dropped, 1)


#: Histories a conversation row may open with (an assistant's greeting first, or a user's turn), rendered once
#: to find the head that conversation rows share with lone prompts.
HEAD_PROBES = (Chat("x", (("assistant", "Hello! How can I help?"), ("user", "hi"), ("assistant", "ok"))),
               Chat("x", (("user", "hi"), ("assistant", "ok"))))


def shared_head(render: Callable[..., str], tokenize: Any, prefix: list[int], *response: str) -> list[int]:
    """`prefix` (measured on lone prompts) cut to what conversation rows share too, less one token of margin
    where it is cut: the role text before a lone prompt ("User:") is not where a history opening with the
    assistant starts, and the guard's cached key/values must hold for every row."""
    for chat in HEAD_PROBES:
        try:
            ids = tokenize._encode([render(chat, *response)])[0].ids
        except Exception:  # noqa: BLE001 - a template refusing this history refuses such rows as well
            continue
        shared = common_prefix([prefix, ids])
        if shared < len(prefix):
            prefix = prefix[:max(shared - 1, 0)]
    return prefix
