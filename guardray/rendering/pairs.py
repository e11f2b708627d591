"""Rendering a chat and a response to it, where the RESPONSE is the text that matters: response activations
(`resp_last`, `resp_mean`) and the response guard (LlamaGuard's Agent turn)."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Sequence

from guardray.chats import Chat, as_chat
from guardray.errors import InputError
from guardray.jobspec import ModelSpec
from guardray.rendering.context import Placed, place, shared_head, turns_to_drop
from guardray.rendering.spans import (PROBES, SENTINEL, Encoded, RendererSettings, caught, caught_tokens,
                                      common_prefix, cut, token_span)
from guardray.rendering.templates import conversation_template
from guardray.tokenizing import OffsetTokenizer, Tokens

_RESPONSE_SENTINEL = "\ue000GUARDRAY_RESPONSE_TEXT\ue000"

#: (prompt, response) pairs rendered once to measure the template: every probe text as the prompt and as the response.
_PAIRPROBES = tuple(zip(PROBES, reversed(PROBES)))


def _variants(text: str) -> tuple[str, ...]:
    """The forms a template may print a message in: as given, or trimmed (Jinja's `trim`, Python's `strip`)."""
    return tuple(dict.fromkeys((text, text.strip(), text.rstrip(), text.lstrip())))


class ConversationRenderer(RendererSettings):
    """Renders (prompt, response) pairs through a two-slot template; the RESPONSE is the text that matters.

    The same guarantees as `PromptRenderer`: the whole chat is rendered once and tokenised once (untruncated ids
    are exactly the template's own tokenisation), the two texts are found by their characters and mapped to
    tokens by offsets, and one pair's failure is its own row's. `Encoded.user_start/user_end` is the response's
    token span (what `resp_last`/`resp_mean` pool and what a response guard judges); the prompt is context.

    A conversation row (a `Chat` with history or its own system turn, as the pair's first item) is placed per
    row (`rendering.context`), and over `max_length` loses its oldest turns first.

    `template(prompt, response)` renders the whole chat (`.chat(Chat, response)`, a conversation row). The text between the two slots (`middle`) is found in
    each rendering after the prompt as printed (as given or trimmed), so templates that trim messages work;
    a rendering where it cannot be found is that row's InputError.

    Truncation to `max_length` cuts the prompt first (it is context), then the response, each with the
    renderer's `truncation` mode, and keeps every template token. `prefix` is the ids every rendering starts
    with (the HF guard's shared key/value cache).
    """

    def __init__(self, tokenizer: Any, template: Callable[[str, str], str], max_length: int,
                 truncation: str = "middle"):
        super().__init__(tokenizer, template, max_length, truncation)
        rendered = template(SENTINEL, _RESPONSE_SENTINEL)
        if rendered.count(SENTINEL) != 1 or rendered.count(_RESPONSE_SENTINEL) != 1 \
                or rendered.index(SENTINEL) > rendered.index(_RESPONSE_SENTINEL):
            raise InputError("the conversation template must contain the prompt and then the response, once each")
        self._before, rest = rendered.split(SENTINEL)
        self._middle, self._after = rest.split(_RESPONSE_SENTINEL)
        # Probes the template cannot place are left out (Llama-2 with a system prompt trims its own text around
        # an empty message): such a pair is its own row's InputError, not the renderer's.
        located = [loc for loc in (caught(self._locate, p, r) for p, r in _PAIRPROBES)
                   if not isinstance(loc, Exception)]
        if len(located) < len(_PAIRPROBES) // 2:
            raise InputError("the conversation template changes its own text around most probe texts")
        self._tokenize = OffsetTokenizer(tokenizer, False, [loc[0] for loc in located])
        self._tokenize.check_escaping([loc[0] for loc in located], [_pair_spans(loc) for loc in located])
        measured = [(t, loc) for t, loc in zip(self._tokenize_located(located), located)
                    if not isinstance(t, Exception)]
        self._measure([t for t, _ in measured], [loc for _, loc in measured])
        if hasattr(template, "chat"):
            self.prefix = shared_head(template.chat, self._tokenize, self.prefix, "ok")

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

    def encode(self, prompt: str | Chat, response: str) -> Encoded:
        """The pair's ids: exactly the tokenised rendering, or cut to max_length (a conversation's oldest turns
        first, then the prompt, then the response)."""
        result = self.encode_many([(prompt, response)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def encode_many(self, pairs: Sequence[tuple[str | Chat, str]]) -> list[Encoded | Exception]:
        """`encode` for many pairs with one batched tokenizer call; a failing pair gets its exception in place."""
        chats = [(as_chat(prompt), response) for prompt, response in pairs]
        out: list[Encoded | Exception | None] = [None] * len(chats)
        plain = [i for i, (chat, _) in enumerate(chats) if not chat.has_context]
        for i, result in zip(plain, self._encode_pairs([(chats[i][0].prompt, chats[i][1]) for i in plain])):
            out[i] = result
        talks = [i for i, (chat, _) in enumerate(chats) if chat.has_context]
        for i, result in zip(talks, self._encode_chats([chats[i] for i in talks])):
            out[i] = result
        return out  # type: ignore[return-value]

    def _encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[Encoded | Exception]:
        located = [caught(self._locate, prompt, response) for prompt, response in pairs]
        ok = [loc for loc in located if not isinstance(loc, Exception)]
        tokens = iter(self._tokenize_located(ok))
        return [loc if isinstance(loc, Exception) else caught_tokens(self._encoded, next(tokens), loc[1:])
                for loc in located]

    # ---------------------------------------------------------------------------------- conversation rows
    def _encode_chats(self, pairs: Sequence[tuple[Chat, str]]) -> list[Encoded | Exception]:
        """Conversation rows and their responses, as `PromptRenderer._encode_chats`."""
        placed = [caught(self._place, chat, response) for chat, response in pairs]
        ok = [p for p in placed if not isinstance(p, Exception)]
        tokens = self._tokenize._encode([p.full for p in ok]) if ok else []
        checked = iter([caught(self._tokenize.as_data, p.full, t, p.user_spans) for p, t in zip(ok, tokens)])
        return [p if isinstance(p, Exception) else caught_tokens(self._fitted, next(checked), pair, p)
                for pair, p in zip(pairs, placed)]

    def _place(self, chat: Chat, response: str) -> Placed:
        chat = chat if self.reads_system else replace(chat, system=None)
        render = getattr(self.template, "chat", None)
        if render is None:
            raise InputError("this renderer reads lone prompts and responses: a conversation row needs a chat template")
        return place(render, chat, response, added=self._tokenize.added_texts)

    def _fitted(self, tokens: Tokens, pair: tuple[Chat, str], placed: Placed) -> Encoded:
        (chat, response), dropped = pair, 0
        while len(tokens.ids) > self.max_length and chat.history:
            shorter = chat.without_oldest_turns(turns_to_drop(tokens, placed, len(tokens.ids) - self.max_length))
            dropped += len(chat.history) - len(shorter.history)
            chat, placed = shorter, self._place(shorter, response)
            tokens = self._tokenize([placed.full], [placed.user_spans])[0]
        assert placed.response is not None
        encoded = self._encoded(tokens, (*placed.prompt, *placed.response), head_checked=self.prefix_required)
        return replace(encoded, dropped_turns=dropped) if dropped else encoded

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
        prompt = token_span(tokens, p0, p1, skip)
        response = token_span(tokens, r0, r1, prompt[0])
        return (prompt[0], min(prompt[1], response[0])), response

    def _encoded(self, tokens: Tokens, chars: Sequence[int], head_checked: bool = True) -> Encoded:
        ids = tokens.ids
        head_ok = ids[:len(self.prefix)] == self.prefix
        if not head_ok and (head_checked or self.prefix_required):
            raise InputError("this prompt changes how the template's shared head tokenises; it cannot share the "
                             "guard's cached prefix")
        (p0, p1), (r0, r1) = self._spans(tokens, chars, len(self.prefix) if head_ok else 0)
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
        prompt = cut(ids[p0:p1], budget - response_budget, keep_prompt, self.truncation)
        response = cut(ids[r0:r1], response_budget, keep_response, self.truncation)
        out = ids[:p0] + prompt + ids[p1:r0]
        start = len(out)
        return Encoded(out + response + ids[r1:], start, start + len(response), n_tokens, True)


def _pair_spans(located: Sequence[Any]) -> list[tuple[int, int]]:
    """The user-controlled character spans of a located pair: the prompt's and the response's."""
    return [(located[1], located[2]), (located[3], located[4])]


def chat_conversation_renderer(tokenizer: Any, spec: ModelSpec) -> ConversationRenderer:
    """The renderer for response activations: [system?, user, assistant] as the chat model sees a finished turn."""
    if not spec.chat_template or not getattr(tokenizer, "chat_template", None):
        raise InputError(f"extract.on: response needs a chat template to place the response; {spec.id} "
                         + ("has none" if spec.chat_template else "is set to chat_template: false"))
    return ConversationRenderer(tokenizer, conversation_template(tokenizer, spec.system_prompt), spec.max_length,
                                spec.truncation)
