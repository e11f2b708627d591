"""Tokenising rendered chats with character offsets, and reading user text in them as data.

`rendering` renders a chat once and tokenises it once; this module is that tokenisation: through the Rust
tokenizer directly where that is exact, and, when user text holds one of the tokenizer's added tokens
(`<|im_end|>`, `<think>`), again through an escaping copy that knows those tokens only by private-use aliases
of the same length and id, so the user's characters can never become control tokens (see `OffsetTokenizer.as_data`).
"""
from __future__ import annotations

import logging
import re
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

from guardray.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tokens:
    """One tokenised rendering. `lead`/`trail` count the ids the tokenizer itself added around the text (BOS,
    EOS in raw-text mode): they have no characters, so offsets cannot place them."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    lead: int
    trail: int


def _private_copy(backend: Any) -> Any:
    """A copy of the Rust tokenizer with truncation and padding off: transformers leaves those settings on the
    shared backend after any call with `truncation=True` or `padding=True`, which would cut renderings."""
    if backend is None:
        return None
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


class OffsetTokenizer:
    """Tokenises rendered strings with offsets, through the Rust tokenizer directly where that is exact.

    Calling the backend skips transformers' per-call Python work (about 2x faster); it is used only if it gives
    the same ids as `tokenizer(...)` on the probe renderings, since some tokenizers preprocess text in Python.

    With `spans` (each rendering's user-controlled character ranges), added tokens (special or not) written in
    those ranges are read as plain text while the template's own stay control tokens: see `as_data`.
    """

    def __init__(self, tokenizer: Any, add_special_tokens: bool, samples: Sequence[str]):
        if not getattr(tokenizer, "is_fast", False):
            raise InputError(f"rendering needs a fast tokenizer (character offsets); {type(tokenizer).__name__} "
                             "has none: load the model's tokenizer.json or a tokenizer with a fast version")
        self.tokenizer = tokenizer
        self.add_special_tokens = add_special_tokens
        copies = _copies(tokenizer)
        self.backend = copies.backend
        if self.backend is not None and any(t.ids != self._called([s])[0].ids for s, t in zip(samples, self(samples))):
            self.backend = None
        self.escaping = copies.escaping if self.backend is not None else None
        self.added_ids = copies.added_ids
        self.added_texts = copies.added_texts  # what a user's text must not turn into

    def __call__(self, texts: Sequence[str], spans: Sequence[Sequence[tuple[int, int]]] | None = None
                 ) -> list[Tokens]:
        tokens = self._encode(texts)
        if spans is None:
            return tokens
        return [self.as_data(text, t, s) for text, t, s in zip(texts, tokens, spans)]

    def _encode(self, texts: Sequence[str], backend: Any = None) -> list[Tokens]:
        backend = backend or self.backend
        if backend is None:
            return self._called(texts)
        if len(texts) == 1:  # encode_batch's thread pool costs more than it saves on one text
            return [self._from_encoding(backend.encode(texts[0], add_special_tokens=self.add_special_tokens))]
        encodings = backend.encode_batch(list(texts), add_special_tokens=self.add_special_tokens)
        return [self._from_encoding(e) for e in encodings]

    def _from_encoding(self, encoding: Any) -> Tokens:
        ids = encoding.ids
        lead = trail = 0
        if self.add_special_tokens:
            lead, trail = _added_counts(encoding.sequence_ids)
        return Tokens(ids, encoding.offsets, lead, trail)

    def _called(self, texts: Sequence[str]) -> list[Tokens]:
        batch = self.tokenizer(list(texts), add_special_tokens=self.add_special_tokens, return_offsets_mapping=True)
        out = []
        for i, ids in enumerate(batch["input_ids"]):
            lead, trail = _added_counts(batch.sequence_ids(i)) if self.add_special_tokens else (0, 0)
            out.append(Tokens(list(ids), [tuple(o) for o in batch["offset_mapping"][i]], lead, trail))
        return out

    # -------------------------------------------------------------------------------- user text as data
    def as_data(self, text: str, tokens: Tokens, spans: Sequence[tuple[int, int]]) -> Tokens:
        """`tokens`, or, when an added token's id overlaps a user span, the rendering tokenised again with the
        user's text as plain text.

        Why: the tokenizer matches its added tokens (`<|im_end|>`, `<think>`) anywhere in a string, so a user's
        `<|im_end|>` would close the turn and let them write the conversation, or the guard's verdict context,
        themselves. The escaping copy of the tokenizer knows each added token only by a private-use alias of
        the same length and id: the template's own occurrences (outside the spans) are written as aliases and
        stay control tokens, exactly as before (whitespace they strip included), while the user's characters no
        longer match any added token. One tokenisation of the whole rendering, so merges and offsets are those
        of the real tokenizer. Where no exact escaping copy exists, such a text is refused (fail closed).
        """
        hit = self._user_hit(tokens, spans)
        if hit is None:
            return tokens
        escaping = self.escaping
        if escaping is None or escaping.holds_alias(text, spans):
            raise InputError(f"the text holds the control token {text[hit[0]:hit[1]]!r}, and this tokenizer cannot "
                             "read it as plain text exactly: refused rather than encoded as a control token")
        return self._encode([escaping.escape(text, spans)], escaping.tokenizer)[0]

    def _user_hit(self, tokens: Tokens, spans: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
        """The characters of the first added token that overlaps a user span (a set lookup per id: cheap next
        to the tokenisation itself, even for Llama-3's 256 reserved tokens), or None."""
        added = self.added_ids
        for tid, (s, e) in zip(tokens.ids, tokens.offsets):
            if tid in added and e > s and any(s < b and e > a for a, b in spans):
                return s, e
        return None

    def check_escaping(self, texts: Sequence[str], spans: Sequence[Sequence[tuple[int, int]]]) -> None:
        """Drops the escaping copy unless it tokenises the probe renderings (no control token in their user
        text) exactly as the tokenizer does: then texts holding an added token are refused instead."""
        if self.escaping is None:
            return
        for text, t, s in zip(texts, self._encode(texts), spans):
            if self._user_hit(t, s) is None \
                    and self._encode([self.escaping.escape(text, s)], self.escaping.tokenizer)[0].ids != t.ids:
                log.warning("%s: its escaping copy tokenises the template differently; texts holding one of its "
                            "control tokens will be refused", type(self.tokenizer).__name__)
                self.escaping = None
                return


@dataclass(frozen=True)
class _Escaping:
    """A tokenizer copy whose added tokens answer only to same-length private-use aliases (same ids)."""

    tokenizer: Any
    aliases: dict[str, str]  # added token's text -> its alias
    pattern: Any  # matches any added token's text, longest first

    def escape(self, text: str, spans: Sequence[tuple[int, int]]) -> str:
        """The rendering with the template's added tokens (outside the user spans) written as their aliases."""
        out, at = [], 0
        for a, b in sorted(spans):
            a = max(a, at)  # overlapping spans: each character once
            out += [self._aliased(text[at:a]), text[a:b]]
            at = max(at, b)
        return "".join(out + [self._aliased(text[at:])])

    def _aliased(self, part: str) -> str:
        return self.pattern.sub(lambda m: self.aliases[m.group()], part) if part else part

    @staticmethod
    def holds_alias(text: str, spans: Sequence[tuple[int, int]]) -> bool:
        """A user span written in the aliases' own characters would forge a control token: refused."""
        return any(_ALIAS_RANGE.search(text, a, b) for a, b in spans)


#: Aliases use Unicode's supplementary private-use plane 15 (U+F0000-U+FFFFD), which no text needs.
_ALIAS_BASE, _ALIAS_SIZE = 0xF0000, 0xFFFD  # the last one, U+FFFFD, is the filler
_ALIAS_RANGE = re.compile("[\U000F0000-\U000FFFFD]")


@dataclass(frozen=True)
class _Copies:
    backend: Any
    escaping: _Escaping | None
    added_ids: frozenset[int]
    added_texts: tuple[str, ...]


_COPIES: "weakref.WeakKeyDictionary[Any, _Copies]" = weakref.WeakKeyDictionary()


def _copies(tokenizer: Any) -> _Copies:
    """The private backend and the escaping copy of a tokenizer, built once per tokenizer (a served
    conversation builds a renderer per distinct history; copying a 128k vocabulary each time would cost)."""
    try:
        return _COPIES[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = _private_copy(getattr(tokenizer, "backend_tokenizer", None))
    added = getattr(backend, "get_added_tokens_decoder", lambda: {})() if backend is not None else \
        getattr(tokenizer, "added_tokens_decoder", {})
    copies = _Copies(backend, _escaping_copy(backend) if backend is not None else None,
                     frozenset(i for i, t in added.items() if t.content),
                     tuple(t.content for t in added.values() if t.content))
    try:
        _COPIES[tokenizer] = copies
    except TypeError:
        pass
    return copies


def _escaping_copy(backend: Any) -> _Escaping | None:
    """The backend with every added token renamed to an alias of the same length (so offsets stay those of
    the rendering) and the same id; None when the copy does not keep every id (then texts holding an added
    token are refused)."""
    import json

    from tokenizers import Tokenizer

    data = json.loads(backend.to_str())
    vocab = data.get("model", {}).get("vocab")
    aliases: dict[str, str] = {}
    for n, token in enumerate(data.get("added_tokens", [])):
        content = token["content"]
        if not content or n >= _ALIAS_SIZE:
            return None
        # unique by its first character, as long as the text by a filler (offsets stay the rendering's)
        alias = chr(_ALIAS_BASE + n) + chr(_ALIAS_BASE + _ALIAS_SIZE) * (len(content) - 1)
        if isinstance(vocab, dict) and content in vocab:
            vocab[alias] = vocab.pop(content)
        elif isinstance(vocab, list) and vocab and isinstance(vocab[0], list):  # Unigram: [piece, score]
            vocab[:] = [[alias, score] if piece == content else [piece, score] for piece, score in vocab]
        aliases[content] = token["content"] = alias
    if not aliases:
        return None
    escaping = Tokenizer.from_str(json.dumps(data))
    escaping.no_truncation()
    escaping.no_padding()
    if any(escaping.token_to_id(aliases[t.content]) != i for i, t in backend.get_added_tokens_decoder().items()
           if t.content in aliases):
        return None
    pattern = re.compile("|".join(re.escape(c) for c in sorted(aliases, key=len, reverse=True)))
    return _Escaping(escaping, aliases, pattern)


def _added_counts(sequence_ids: list[int | None]) -> tuple[int, int]:
    """How many tokens the tokenizer added before and after the text (their sequence id is None)."""
    n = len(sequence_ids)
    lead = 0
    while lead < n and sequence_ids[lead] is None:
        lead += 1
    trail = 0
    while trail < n - lead and sequence_ids[n - 1 - trail] is None:
        trail += 1
    return lead, trail
