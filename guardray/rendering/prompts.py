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

A conversation row (a `Chat` with history or a system turn of its own) is rendered whole the same way, its
texts placed per row (`rendering.context`); over `max_length` its oldest whole turns go first (never the system
turn, never the last user turn), then the last user turn is cut as above.

Cost: one template render and one tokenisation of the whole chat per prompt, template included (a long guard
policy costs more than the user's text; splitting the tokenisation would not be exact for every tokenizer).
`encode_many` tokenises a batch in one call, which the Rust tokenizer spreads over the cores.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Sequence

from guardray.chats import Chat, as_chat
from guardray.errors import InputError
from guardray.jobspec import JobSpec, ModelSpec
from guardray.rendering.context import Placed, place, shared_head, turns_to_drop
from guardray.rendering.spans import (PROBES, SENTINEL, Encoded, RendererSettings, caught, caught_tokens,
                                      common_prefix, cut, token_span)
from guardray.rendering.templates import chat_template, persona_problem
from guardray.tokenizing import OffsetTokenizer, Tokens


class PromptRenderer(RendererSettings):
    """Renders prompts with a template around the user's text and truncates only the user's text.

    `template(text)` returns the full rendered string for one user text. An identity template means raw text:
    the tokenizer's own special tokens (BOS) are added, as `tokenizer(text)` would; a template carries its own.
    A template with a `.chat(Chat)` method (`templates.ChatTemplate`) also renders conversation rows.

    `prefix` is the ids every encoded prompt starts with (`encode` checks it): the template's head up to a token
    no user text can change, found by rendering probe texts of every kind, less one token of margin. The HF
    guard computes its key/value cache once for it. `suffix` is the same from the end: the generation prompt's
    ids every probe rendering ends with.
    """

    def __init__(self, tokenizer: Any, template: Callable[[str], str], max_length: int, truncation: str = "middle"):
        super().__init__(tokenizer, template, max_length, truncation)
        rendered = template(SENTINEL)
        if rendered.count(SENTINEL) != 1:
            raise InputError("the chat template must contain the user's text exactly once")
        self._before, self._after = rendered.split(SENTINEL)
        located = [self._locate(p) for p in PROBES]
        raw = not self._before and not self._after
        self._tokenize = OffsetTokenizer(tokenizer, raw, [full for full, _, _ in located])
        self._tokenize.check_escaping([full for full, _, _ in located], [self._user_spans(a, b) for _, a, b in located])
        # A tokenizer that must refuse control tokens in user text cannot measure the probes that hold them.
        measured = [(t, (a, b)) for t, (_, a, b) in
                    zip(self._tokenize_located(located), located) if not isinstance(t, Exception)]
        self._measure([t for t, _ in measured], [span for _, span in measured])
        if hasattr(template, "chat"):
            self.prefix = shared_head(template.chat, self._tokenize, self.prefix)

    def _measure(self, probes: list[Tokens], spans: list[tuple[int, int]]) -> None:
        """Sets `prefix`, `suffix` and `user_budget` from the probe renderings."""
        cuts = [token_span(t, a, b, 0) for t, (a, b) in zip(probes, spans)]
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

    def encode(self, item: str | Chat) -> Encoded:
        """The row's ids: exactly the tokenised rendering, or cut to fit max_length (a conversation's oldest
        turns first, then the user's tokens)."""
        result = self.encode_many([item])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def encode_many(self, items: Sequence[str | Chat]) -> list[Encoded | Exception]:
        """`encode` for many rows (prompts, or `Chat`s) with one batched tokenizer call (parallel in Rust). A row
        that cannot be rendered gets its exception in its place, so one bad row does not fail the others."""
        chats = [as_chat(item) for item in items]
        out: list[Encoded | Exception | None] = [None] * len(chats)
        plain = [i for i, chat in enumerate(chats) if not chat.has_context]
        for i, result in zip(plain, self._encode_prompts([chats[i].prompt for i in plain])):
            out[i] = result
        talks = [i for i, chat in enumerate(chats) if chat.has_context]
        for i, result in zip(talks, self._encode_chats([chats[i] for i in talks])):
            out[i] = result
        return out  # type: ignore[return-value]

    def _encode_prompts(self, texts: Sequence[str]) -> list[Encoded | Exception]:
        located = [caught(self._locate, text) for text in texts]
        ok = [loc for loc in located if not isinstance(loc, Exception)]
        tokens = iter(self._tokenize_located(ok))
        return [loc if isinstance(loc, Exception) else caught_tokens(self._encoded, next(tokens), loc[1], loc[2])
                for loc in located]

    # ---------------------------------------------------------------------------------- conversation rows
    def _encode_chats(self, chats: Sequence[Chat]) -> list[Encoded | Exception]:
        """Conversation rows: placed and tokenised in one batch; a row over max_length loses its oldest turns
        (re-rendered, so the ids stay the template's own) before its last user turn is cut."""
        placed = [caught(self._place, chat) for chat in chats]
        ok = [p for p in placed if not isinstance(p, Exception)]
        tokens = iter(self._tokenize_placed(ok))
        return [p if isinstance(p, Exception) else caught_tokens(self._fitted, next(tokens), chat, p)
                for chat, p in zip(chats, placed)]

    def _place(self, chat: Chat) -> Placed:
        chat = chat if self.reads_system else replace(chat, system=None)
        render = getattr(self.template, "chat", None)
        if render is None:
            raise InputError("this renderer reads lone prompts (no chat template): a conversation row needs one")
        return place(render, chat, added=self._tokenize.added_texts)

    def _tokenize_placed(self, placed: Sequence[Placed]) -> list[Tokens | Exception]:
        if not placed:
            return []
        tokens = self._tokenize._encode([p.full for p in placed])
        return [caught(self._tokenize.as_data, p.full, t, p.user_spans) for p, t in zip(placed, tokens)]

    def _fitted(self, tokens: Tokens, chat: Chat, placed: Placed) -> Encoded:
        dropped = 0
        while len(tokens.ids) > self.max_length and chat.history:
            shorter = chat.without_oldest_turns(turns_to_drop(tokens, placed, len(tokens.ids) - self.max_length))
            dropped += len(chat.history) - len(shorter.history)
            chat, placed = shorter, self._place(shorter)
            tokens = self._tokenize([placed.full], [placed.user_spans])[0]
        # a row's own system turn changes the template's head: it cannot share the guard's cached prefix
        encoded = self._encoded(tokens, *placed.prompt, head_checked=self.prefix_required)
        return replace(encoded, dropped_turns=dropped) if dropped else encoded

    def _tokenize_located(self, located: Sequence[tuple[str, int, int]]) -> list[Tokens | Exception]:
        """One batched tokenisation; a rendering whose user text cannot be read as data gets its exception."""
        if not located:
            return []
        texts = [full for full, _, _ in located]
        tokens = self._tokenize._encode(texts)
        return [caught(self._tokenize.as_data, full, t, self._user_spans(a, b)) for (full, a, b), t in zip(located, tokens)]

    def _user_spans(self, a: int, b: int) -> list[tuple[int, int]]:
        """The user-controlled character spans of a prompt-only rendering: the prompt's."""
        return [(a, b)]

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

    def _encoded(self, tokens: Tokens, a: int, b: int, head_checked: bool = True) -> Encoded:
        ids = tokens.ids
        head_ok = ids[:len(self.prefix)] == self.prefix
        if not head_ok and (head_checked or self.prefix_required):
            # Never seen: it would take a merge reaching past the margin token into the template's head.
            raise InputError("this prompt changes how the template's shared head tokenises; it cannot share the "
                             "guard's cached prefix")
        start, end = token_span(tokens, a, b, len(self.prefix) if head_ok else 0)
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
        return cut(user, budget, keep_last, self.truncation)


def chat_renderer(tokenizer: Any, spec: ModelSpec) -> PromptRenderer:
    """The renderer for activation capture, per the model spec (chat template or raw text)."""
    if spec.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(f"model.chat_template: {spec.id} has no chat template; set chat_template: false")
        template: Callable[[str], str] = chat_template(tokenizer, spec.system_prompt)
    else:
        template = lambda text: text  # noqa: E731 - raw text: conversation rows are refused
    return PromptRenderer(tokenizer, template, spec.max_length, spec.truncation)


def check_personas(tokenizer: Any, spec: JobSpec) -> None:
    """One line, before any actor starts, when the job gives rows a persona (a source's `system_prompt` or
    `system_column`) and the chat model's template cannot keep a system turn."""
    personas = any(getattr(s, "system_prompt", None) or getattr(s, "system_column", None) for s in spec.dataset.sources)
    problem = persona_problem(tokenizer, spec.model.id) if personas and spec.model.chat_template else None
    if problem:
        raise InputError(problem)
