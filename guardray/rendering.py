"""Rendering prompts into token ids with the model's own chat template.

Each prompt's whole chat is rendered once and tokenised once, so an untruncated prompt's ids are exactly what
`tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)` gives. Tokenising the
template's text before and after the user's text apart from the user's text and joining the ids (the method this
replaces) is not the same: SentencePiece tokenizers (Llama-2, LlamaGuard-7b) put a stray "▁" at the start of each
piece, and byte-level BPE leaves a lone space token where " hello" is one token in the real rendering.

The user's text is found in the rendering by its characters, then mapped to tokens with the tokenizer's offsets.
A sentinel rendered once gives the template's text before and after the user's text; templates may change the
text (Llama-2's strips it), so the user's span is whatever lies between that `before` and `after` in each
rendering. A token that merges template text with the user's text counts as the user's, so mean pooling sees all
of the user's text.

Truncation cuts only the user's tokens (ids are joined, not re-tokenised), so every prompt still ends with the
template's generation prompt, token for token as in its untruncated rendering, and the `last` token means the
same thing for every prompt.

Cost: one template render and one tokenisation of the whole chat per prompt, template included (a long guard
policy costs more than the user's text; splitting the tokenisation would not be exact for every tokenizer).
`encode_many` tokenises a batch in one call, which the Rust tokenizer spreads over the cores.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from guardray.errors import InputError
from guardray.tokenizing import OffsetTokenizer, Tokens
from guardray.jobspec import ModelSpec

_SENTINEL = "\ue000GUARDRAY_USER_TEXT\ue000"

# Texts that start and end with each kind of character tokenizers treat differently (letters, spaces, newlines,
# digits, punctuation, emoji, CJK, template markup), rendered once to find the tokens no user text can change.
_PROBES = ("", " ", "a", "Hello", " hello there ", "\n\nNew\nlines\n\n", "\tx\t", "123", "!?", "'s", ".",
           "😀 emoji 😀", "日本語", "[/INST]", "<|im_end|>", "</s>", "{{ braces }}", "  two  spaces  ", "x" * 64)

TRUNCATIONS = ("middle", "start")


@dataclass(frozen=True)
class Encoded:
    """A rendered prompt: token ids, where the user's text sits in them, and whether it was cut."""

    ids: list[int]
    user_start: int
    user_end: int
    n_tokens: int  # length before truncation
    truncated: bool


def _token_span(tokens: Tokens, a: int, b: int, skip: int) -> tuple[int, int]:
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


def _caught_tokens(fn: Callable[..., Any], tokens: Tokens | Exception, *args: Any) -> Any:
    """`caught(fn, tokens, *args)`, passing on the exception that tokenising the row already raised."""
    return tokens if isinstance(tokens, Exception) else caught(fn, tokens, *args)


def common_prefix(rows: Sequence[Sequence[Any]]) -> int:
    """Length of the longest prefix all rows share."""
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows[1:]):
            return i
    return n


class PromptRenderer:
    """Renders prompts with a template around the user's text and truncates only the user's text.

    `template(text)` returns the full rendered string for one user text. An identity template means raw text:
    the tokenizer's own special tokens (BOS) are added, as `tokenizer(text)` would; a template carries its own.

    `prefix` is the ids every encoded prompt starts with (`encode` checks it): the template's head up to a token
    no user text can change, found by rendering probe texts of every kind, less one token of margin. The HF
    guard computes its key/value cache once for it. `suffix` is the same from the end: the generation prompt's
    ids every probe rendering ends with.
    """

    def __init__(self, tokenizer: Any, template: Callable[[str], str], max_length: int, truncation: str = "middle",
                 context: Sequence[tuple[int, int]] = ()):
        if truncation not in TRUNCATIONS:
            raise InputError(f"truncation {truncation!r} is not one of {', '.join(TRUNCATIONS)}")
        rendered = template(_SENTINEL)
        if rendered.count(_SENTINEL) != 1:
            raise InputError("the chat template must contain the user's text exactly once")
        self._before, self._after = rendered.split(_SENTINEL)
        if any(b > len(self._before) for _, b in context):
            raise ValueError("context spans must lie in the template's text before the user's")
        self._context = tuple(context)  # user-controlled text in the template's head (a served conversation)
        self.template = template
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation = truncation
        self.prefix: list[int] = []
        located = [self._locate(p) for p in _PROBES]
        raw = not self._before and not self._after
        self._tokenize = OffsetTokenizer(tokenizer, raw, [full for full, _, _ in located])
        self._tokenize.check_escaping([full for full, _, _ in located], [self._user_spans(a, b) for _, a, b in located])
        # A tokenizer that must refuse control tokens in user text cannot measure the probes that hold them.
        measured = [(t, (a, b)) for t, (_, a, b) in
                    zip(self._tokenize_located(located), located) if not isinstance(t, Exception)]
        self._measure([t for t, _ in measured], [span for _, span in measured])

    def _measure(self, probes: list[Tokens], spans: list[tuple[int, int]]) -> None:
        """Sets `prefix`, `suffix` and `user_budget` from the probe renderings."""
        cuts = [_token_span(t, a, b, 0) for t, (a, b) in zip(probes, spans)]
        first = probes[0]
        head = min(common_prefix([t.ids for t in probes]), *(start for start, _ in cuts))
        tail = min(common_prefix([t.ids[::-1] for t in probes]),
                   *(len(t.ids) - end for t, (_, end) in zip(probes, cuts)))
        # One token of margin: the last head token can merge with text no probe tried. Tokens the tokenizer
        # added itself (raw text's BOS) never merge.
        self.prefix = first.ids[:max(head - 1, first.lead)]
        self.suffix = first.ids[len(first.ids) - max(tail - 1, first.trail):]
        template_tokens = max(len(t.ids) - (end - start) for t, (start, end) in zip(probes, cuts))
        self.user_budget = self.max_length - template_tokens
        if self.user_budget < 2:
            raise InputError(f"max_length {self.max_length} leaves no room for the prompt: the template alone "
                             f"takes {template_tokens} tokens")

    def encode(self, text: str) -> Encoded:
        """The prompt's ids: exactly the tokenised rendering, or with the user's tokens cut to fit max_length."""
        full, a, b = self._locate(text)
        return self._encoded(self._tokenize([full], [self._user_spans(a, b)])[0], a, b)

    def encode_many(self, texts: Sequence[str]) -> list[Encoded | Exception]:
        """`encode` for many prompts with one batched tokenizer call (parallel in Rust). A prompt that cannot
        be rendered gets its exception in its place, so one bad prompt does not fail the others."""
        located = [caught(self._locate, text) for text in texts]
        ok = [loc for loc in located if not isinstance(loc, Exception)]
        tokens = iter(self._tokenize_located(ok))
        return [loc if isinstance(loc, Exception) else _caught_tokens(self._encoded, next(tokens), loc[1], loc[2])
                for loc in located]

    def _tokenize_located(self, located: Sequence[tuple[str, int, int]]) -> list[Tokens | Exception]:
        """One batched tokenisation; a rendering whose user text cannot be read as data gets its exception."""
        if not located:
            return []
        texts = [full for full, _, _ in located]
        tokens = self._tokenize._encode(texts)
        return [caught(self._tokenize.as_data, full, t, self._user_spans(a, b)) for (full, a, b), t in zip(located, tokens)]

    def _user_spans(self, a: int, b: int) -> list[tuple[int, int]]:
        """The user-controlled character spans of a rendering: the prompt's, and any in the template's head."""
        return [(a, b), *self._context]

    def _locate(self, text: str) -> tuple[str, int, int]:
        """The rendering and the user's character span [a, b) in it."""
        full = self.template(text)
        a, b = len(self._before), len(full) - len(self._after)
        if b >= a and full.startswith(self._before) and full.endswith(self._after):
            return full, a, b
        if not text.strip():
            # A template that strips the message (Llama-2 with a system prompt) also strips its own whitespace
            # around an empty one: the user's span is empty where the renderings part.
            a = common_prefix([full, self._before])
            return full, a, a
        raise InputError("the chat template changed its own text around this prompt, so the prompt's place in "
                         "the rendering is unknown")

    def _encoded(self, tokens: Tokens, a: int, b: int) -> Encoded:
        ids = tokens.ids
        if ids[:len(self.prefix)] != self.prefix:
            # Never seen: it would take a merge reaching past the margin token into the template's head.
            raise InputError("this prompt changes how the template's shared head tokenises; it cannot share the "
                             "guard's cached prefix")
        start, end = _token_span(tokens, a, b, len(self.prefix))
        n_tokens = len(ids)
        budget = self.max_length - (n_tokens - (end - start))
        if end - start <= budget:
            return Encoded(ids, start, end, n_tokens, False)
        if budget < 1:
            raise InputError(f"max_length {self.max_length} leaves no room for this prompt: its template takes "
                             f"{n_tokens - (end - start)} tokens")
        keep_last = tokens.offsets[end - 1][1] > b
        if keep_last and budget < 2:  # the first and the last user token both have to stay
            raise InputError(f"max_length {self.max_length} leaves one token for this prompt, but its last token "
                             "also holds template text")
        user = self._cut(ids[start:end], budget, keep_last=keep_last)
        return Encoded(ids[:start] + user + ids[end:], start, start + len(user), n_tokens, True)

    def _cut(self, user: list[int], budget: int, keep_last: bool) -> list[int]:
        return _cut(user, budget, keep_last, self.truncation)


def _cut(tokens: list[int], budget: int, keep_last: bool, truncation: str) -> list[int]:
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


#: The date given to templates that print one (Llama 3.1-3.3: `date_string`, else `strftime_now`), the
#: default those templates ship with: today's date would change the rendering, the guard's cached prefix and
#: the features mid-run, and differ between actors started on different days.
TEMPLATE_DATE = "26 Jul 2024"


def chat_template(tokenizer: Any, system_prompt: str | None,
                  history: Sequence[tuple[str, str]] = ()) -> Callable[[str], str]:
    """The tokenizer's chat template with the text as the user turn (after `history`'s (role, content) turns,
    for a served conversation) and the generation prompt appended (and a fixed `date_string`, so a
    date-stamped template renders the same on every day)."""

    def render(text: str) -> str:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
            [{"role": role, "content": content} for role, content in history] + [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             date_string=TEMPLATE_DATE)

    return render


def conversation_renderer(tokenizer: Any, system_prompt: str | None, history: Sequence[tuple[str, str]],
                          max_length: int, truncation: str, own_system: bool = False) -> PromptRenderer:
    """The renderer of a conversation's last user turn after `history`, with the history's texts (and the
    system prompt when it is the caller's `own_system`, not the spec's) read as data like the user's text."""
    template = chat_template(tokenizer, system_prompt, history)
    texts = ([system_prompt] if own_system and system_prompt else []) + [content for _, content in history]
    return PromptRenderer(tokenizer, template, max_length, truncation,
                          context=_context_spans(tokenizer, system_prompt, history, own_system, texts))


def _context_spans(tokenizer: Any, system_prompt: str | None, history: Sequence[tuple[str, str]],
                   own_system: bool, texts: Sequence[str]) -> list[tuple[int, int]]:
    """Where `texts` sit in the rendering's head: the template rendered with a marker for each text, the markers
    then replaced by the texts. A template that changes message text (trims it) renders otherwise; then the
    places are unknown, and a conversation whose texts hold a special token is refused (fail closed)."""
    marks = [f"\ue000GUARDRAY_CONTEXT_{i}\ue000" for i in range(len(texts))]
    by_mark = dict(zip(marks, texts))
    protect_system = own_system and bool(system_prompt)
    system = marks[0] if protect_system else system_prompt
    marked = [(role, mark) for (role, _), mark in zip(history, marks[int(protect_system):])]
    skeleton = chat_template(tokenizer, system, marked)(_SENTINEL)
    spans, parts, at = [], [], 0
    for found in re.finditer("\ue000GUARDRAY_CONTEXT_\\d+\ue000", skeleton):
        parts.append(skeleton[at:found.start()])
        start = sum(map(len, parts))
        parts.append(by_mark[found.group()])
        spans.append((start, start + len(by_mark[found.group()])))
        at = found.end()
    parts.append(skeleton[at:])
    if "".join(parts) == chat_template(tokenizer, system_prompt, history)(_SENTINEL):
        return spans
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.content]
    held = next((s for text in texts for s in added if s in text), None)
    if held is not None:
        raise InputError(f"messages: a message holds the special token {held!r}, and this chat template changes "
                         "message text, so it cannot be read as plain text exactly: refused")
    return []


def chat_renderer(tokenizer: Any, spec: ModelSpec) -> PromptRenderer:
    """The renderer for activation capture, per the model spec (chat template or raw text)."""
    if spec.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(f"model.chat_template: {spec.id} has no chat template; set chat_template: false")
        template = chat_template(tokenizer, spec.system_prompt)
    else:
        template = lambda text: text  # noqa: E731
    return PromptRenderer(tokenizer, template, spec.max_length, spec.truncation)


# ------------------------------------------------------------------------------------------ conversations
_RESPONSE_SENTINEL = "\ue000GUARDRAY_RESPONSE_TEXT\ue000"

#: (prompt, response) pairs rendered once to measure the template: every probe text as the prompt and as the response.
_PAIR_PROBES = tuple(zip(_PROBES, reversed(_PROBES)))


def _variants(text: str) -> tuple[str, ...]:
    """The forms a template may print a message in: as given, or trimmed (Jinja's `trim`, Python's `strip`)."""
    return tuple(dict.fromkeys((text, text.strip(), text.rstrip(), text.lstrip())))


class ConversationRenderer:
    """Renders (prompt, response) pairs through a two-slot template; the RESPONSE is the text that matters.

    The same guarantees as `PromptRenderer`: the whole chat is rendered once and tokenised once (untruncated ids
    are exactly the template's own tokenisation), the two texts are found by their characters and mapped to
    tokens by offsets, and one pair's failure is its own row's. `Encoded.user_start/user_end` is the response's
    token span (what `resp_last`/`resp_mean` pool and what a response guard judges); the prompt is context.

    `template(prompt, response)` renders the whole chat. The text between the two slots (`middle`) is found in
    each rendering after the prompt as printed (as given or trimmed), so templates that trim messages work;
    a rendering where it cannot be found is that row's InputError.

    Truncation to `max_length` cuts the prompt first (it is context), then the response, each with the
    renderer's `truncation` mode, and keeps every template token. `prefix` is the ids every rendering starts
    with (the HF guard's shared key/value cache).
    """

    def __init__(self, tokenizer: Any, template: Callable[[str, str], str], max_length: int,
                 truncation: str = "middle"):
        if truncation not in TRUNCATIONS:
            raise InputError(f"truncation {truncation!r} is not one of {', '.join(TRUNCATIONS)}")
        rendered = template(_SENTINEL, _RESPONSE_SENTINEL)
        if rendered.count(_SENTINEL) != 1 or rendered.count(_RESPONSE_SENTINEL) != 1 \
                or rendered.index(_SENTINEL) > rendered.index(_RESPONSE_SENTINEL):
            raise InputError("the conversation template must contain the prompt and then the response, once each")
        self._before, rest = rendered.split(_SENTINEL)
        self._middle, self._after = rest.split(_RESPONSE_SENTINEL)
        self.template = template
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation = truncation
        self.prefix: list[int] = []
        # Probes the template cannot place are left out (Llama-2 with a system prompt trims its own text around
        # an empty message): such a pair is its own row's InputError, not the renderer's.
        located = [loc for loc in (caught(self._locate, p, r) for p, r in _PAIR_PROBES)
                   if not isinstance(loc, Exception)]
        if len(located) < len(_PAIR_PROBES) // 2:
            raise InputError("the conversation template changes its own text around most probe texts")
        self._tokenize = OffsetTokenizer(tokenizer, False, [loc[0] for loc in located])
        self._tokenize.check_escaping([loc[0] for loc in located], [_pair_spans(loc) for loc in located])
        measured = [(t, loc) for t, loc in zip(self._tokenize_located(located), located)
                    if not isinstance(t, Exception)]
        self._measure([t for t, _ in measured], [loc for _, loc in measured])

    def _measure(self, probes: list[Tokens], located: list[tuple[str, int, int, int, int]]) -> None:
        """Sets `prefix` (less one token of margin, as `PromptRenderer`) and checks the template leaves room."""
        spans = [self._spans(t, loc[1:], 0) for t, loc in zip(probes, located)]
        head = min(common_prefix([t.ids for t in probes]), *(prompt[0] for prompt, _ in spans))
        self.prefix = probes[0].ids[:max(head - 1, 0)]
        template_tokens = max(len(t.ids) - (p1 - p0) - (r1 - r0) for t, ((p0, p1), (r0, r1)) in zip(probes, spans))
        self.text_budget = self.max_length - template_tokens
        if self.text_budget < 2:
            raise InputError(f"max_length {self.max_length} leaves no room for the conversation: the template "
                             f"alone takes {template_tokens} tokens")

    def encode(self, prompt: str, response: str) -> Encoded:
        """The pair's ids: exactly the tokenised rendering, or cut to max_length (prompt first)."""
        located = self._locate(prompt, response)
        return self._encoded(self._tokenize([located[0]], [_pair_spans(located)])[0], located[1:])

    def encode_many(self, pairs: Sequence[tuple[str, str]]) -> list[Encoded | Exception]:
        """`encode` for many pairs with one batched tokenizer call; a failing pair gets its exception in place."""
        located = [caught(self._locate, prompt, response) for prompt, response in pairs]
        ok = [loc for loc in located if not isinstance(loc, Exception)]
        tokens = iter(self._tokenize_located(ok))
        return [loc if isinstance(loc, Exception) else _caught_tokens(self._encoded, next(tokens), loc[1:])
                for loc in located]

    def _locate(self, prompt: str, response: str) -> tuple[str, int, int, int, int]:
        """The rendering and the character spans [p0, p1) of the prompt and [r0, r1) of the response in it."""
        full = self.template(prompt, response)
        p0, r1 = len(self._before), len(full) - len(self._after)
        if full.startswith(self._before) and full.endswith(self._after) and r1 >= p0:
            for shown in _variants(prompt):
                p1 = p0 + len(shown)
                if full.startswith(shown, p0) and full.startswith(self._middle, p1) and p1 + len(self._middle) <= r1:
                    return full, p0, p1, p1 + len(self._middle), r1
        raise InputError("the chat template changed its own text around this conversation, so the prompt's and "
                         "the response's places in the rendering are unknown")

    def _tokenize_located(self, located: Sequence[tuple[str, int, int, int, int]]) -> list[Tokens | Exception]:
        """One batched tokenisation; a rendering whose texts cannot be read as data gets its exception."""
        if not located:
            return []
        tokens = self._tokenize._encode([loc[0] for loc in located])
        return [caught(self._tokenize.as_data, loc[0], t, _pair_spans(loc)) for loc, t in zip(located, tokens)]

    def _spans(self, tokens: Tokens, chars: Sequence[int], skip: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Token spans of the prompt and the response; a token straddling both belongs to the response."""
        p0, p1, r0, r1 = chars
        prompt = _token_span(tokens, p0, p1, skip)
        response = _token_span(tokens, r0, r1, prompt[0])
        return (prompt[0], min(prompt[1], response[0])), response

    def _encoded(self, tokens: Tokens, chars: Sequence[int]) -> Encoded:
        ids = tokens.ids
        if ids[:len(self.prefix)] != self.prefix:
            raise InputError("this prompt changes how the template's shared head tokenises; it cannot share the "
                             "guard's cached prefix")
        (p0, p1), (r0, r1) = self._spans(tokens, chars, len(self.prefix))
        n_tokens = len(ids)
        budget = self.max_length - (n_tokens - (p1 - p0) - (r1 - r0))
        if (p1 - p0) + (r1 - r0) <= budget:
            return Encoded(ids, r0, r1, n_tokens, False)
        # A text's last token that also holds template characters is kept, so the template stays whole.
        keep_prompt = p1 > p0 and tokens.offsets[p1 - 1][1] > chars[1]
        keep_response = r1 > r0 and tokens.offsets[r1 - 1][1] > chars[3]
        # Likewise its first token, when it starts inside the template's text (" How" after "User:"): `_cut`
        # keeps a text's head, so one token of budget keeps it.
        keep_first = p1 > p0 and tokens.offsets[p0][0] < chars[0]
        prompt_floor = min(p1 - p0, int(keep_prompt) + int(keep_first))
        response_budget = min(r1 - r0, budget - prompt_floor)
        if response_budget < 1 + int(keep_response):
            raise InputError(f"max_length {self.max_length} leaves no room for this response: its template takes "
                             f"{n_tokens - (p1 - p0) - (r1 - r0)} tokens")
        prompt = _cut(ids[p0:p1], budget - response_budget, keep_prompt, self.truncation)
        response = _cut(ids[r0:r1], response_budget, keep_response, self.truncation)
        out = ids[:p0] + prompt + ids[p1:r0]
        start = len(out)
        return Encoded(out + response + ids[r1:], start, start + len(response), n_tokens, True)


def _pair_spans(located: Sequence[Any]) -> list[tuple[int, int]]:
    """The user-controlled character spans of a located pair: the prompt's and the response's."""
    return [(located[1], located[2]), (located[3], located[4])]


def conversation_template(tokenizer: Any, system_prompt: str | None) -> Callable[[str, str], str]:
    """The tokenizer's chat template with the prompt as the user turn and the response as a finished assistant
    turn (no generation prompt; the fixed `date_string` of `chat_template`)."""

    def render(prompt: str, response: str) -> str:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                             date_string=TEMPLATE_DATE)

    return render


def chat_conversation_renderer(tokenizer: Any, spec: ModelSpec) -> ConversationRenderer:
    """The renderer for response activations: [system?, user, assistant] as the chat model sees a finished turn."""
    if not spec.chat_template or not getattr(tokenizer, "chat_template", None):
        raise InputError(f"extract.on: response needs a chat template to place the response; {spec.id} "
                         + ("has none" if spec.chat_template else "is set to chat_template: false"))
    return ConversationRenderer(tokenizer, conversation_template(tokenizer, spec.system_prompt), spec.max_length,
                                spec.truncation)
