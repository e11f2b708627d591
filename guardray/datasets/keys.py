"""Per-row keys of the dataset stage: the row id, and the digests that find duplicates and split groups.

Split from `assemble.py`: these hash the prompt text a batch at a time and return numpy arrays, so the rest
of the assembly (dedupe, conflicts, subsample, split) never touches the text.
"""
from __future__ import annotations

import hashlib
import json
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from guardray.chats import USER
from guardray.columns import MESSAGES, PROMPT, RESPONSE, SOURCE
from guardray.datasets.normalize import text_keys

#: Prompts turned into Python bytes at a time while hashing (bounds that transient memory).
_HASH_BATCH_ROWS = 8192



def prompt_id(source: str, prompt: str) -> str:
    """Stable id: the same prompt from the same source gets the same id in every run."""
    return hashlib.sha256(f"{source}\0{prompt}".encode()).hexdigest()[:16]


def conversation_id(source: str, messages: list[dict[str, str]], response: str | None) -> str:
    """Stable id of a conversation row: its source, its whole chat and its given reply (`canonical`)."""
    return hashlib.sha256(f"{source}\0".encode() + canonical(messages, response)).hexdigest()[:16]


def canonical(messages: list[dict[str, str]], response: str | None) -> bytes:
    """A chat and its reply as one canonical JSON text: what a conversation row's id and exact key hash."""
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = json.dumps({"messages": turns, "response": response}, ensure_ascii=False, sort_keys=True,
                      separators=(",", ":"))
    return text.encode("utf-8", "surrogatepass")


class PromptKeys(NamedTuple):
    """Per loaded row (zeros where not usable): the id key and three prompt digests."""

    ids: np.ndarray  #: uint64: the first 8 bytes of `prompt_id`'s sha256
    exact: np.ndarray  #: V16 digest of the raw text (exact duplicates)
    dedupe: np.ndarray  #: V16 digest of the text `dataset.dedupe` compares (one of the others)
    group: np.ndarray  #: V16 digest of the base text (normalised, adversarial affixes stripped): the split group


def prompt_keys(
    loaded: pa.Table, mask: np.ndarray, dedupe: str = "exact", affixes: tuple[str, ...] = ()
) -> PromptKeys:
    """The id key and the prompt digests of the rows in `mask`.

    The id key is a uint64 (numbers sort fast; they become hex text only for the output); the digests are
    the first 16 bytes of a sha256 (a collision is ~1e-27 likely at a million rows). Hashing is a Python
    loop (hashlib per prompt) over UTF-8 bytes read from Arrow a batch at a time, and the normalised and
    base texts are made per batch by Arrow kernels and dropped after hashing, so the transient memory is
    one batch's worth. It is cheaper than Arrow's exact `dictionary_encode`, whose hash table holds two
    more copies of the text (measured once by hand, not by a repo benchmark, on a million 900-character
    prompts: 2.9 GB instead of 1.6 GB peak RSS, and slower).
    """
    n = loaded.num_rows
    ids = np.zeros(n, dtype=np.uint64)
    exact, normalized, group = (np.zeros(n, dtype="V16") for _ in range(3))
    start = 0
    for batch in loaded.select([SOURCE, PROMPT]).to_batches(max_chunksize=_HASH_BATCH_ROWS):
        local = np.flatnonzero(mask[start:start + batch.num_rows])
        if len(local):
            part = batch if len(local) == batch.num_rows else batch.take(pa.array(local))
            sources = pc.dictionary_encode(part.column(0))
            prefixes = [f"{s}\0".encode() for s in sources.dictionary.to_pylist()]
            texts = part.column(1).cast(pa.binary()).to_pylist()
            keys = [hashlib.sha256(prefixes[i] + t).digest()[:8] for i, t in zip(sources.indices.to_numpy(), texts)]
            ids[start + local] = np.frombuffer(b"".join(keys), dtype=">u8")
            exact[start + local] = _digests(texts)
            norm_text, base_text = text_keys(part.column(1), affixes)
            if dedupe == "normalized":
                normalized[start + local] = _digests(norm_text.cast(pa.binary()).to_pylist())
            group[start + local] = _digests(base_text.cast(pa.binary()).to_pylist())
        start += batch.num_rows
    chosen = {"exact": exact, "normalized": normalized, "variants": group}[dedupe]
    if MESSAGES in loaded.column_names and dedupe == "variants":
        chosen = group.copy()  # a reply makes a conversation row's dedupe key differ from its group
    keys = PromptKeys(ids, exact, chosen, group)
    if MESSAGES in loaded.column_names:
        _key_conversations(loaded, _conversation_rows(loaded, mask), dedupe, affixes, keys)
    return keys


def _conversation_rows(loaded: pa.Table, mask: np.ndarray) -> np.ndarray:
    """Positions of the rows in `mask` that carry a chat or a given reply; the others are prompt-only rows and
    keep their prompt keys (and ids) exactly."""
    has = pc.or_(pc.is_valid(loaded[MESSAGES]), pc.is_valid(loaded[RESPONSE])).to_numpy(zero_copy_only=False)
    return np.flatnonzero(mask & has)


def _key_conversations(loaded: pa.Table, rows: np.ndarray, dedupe: str, affixes: tuple[str, ...],
                       keys: PromptKeys) -> None:
    """Overwrite `keys` at conversation `rows` (in place): the id and exact key hash the whole chat and the
    reply (`canonical`); the dedupe keys compare every turn and the reply, normalised like a prompt; the split
    group is the chat without the reply, so both replies to one request land on one side, and one last turn
    after two histories is two groups. A reply to a bare prompt keeps the prompt's group."""
    if not len(rows):
        return
    records = loaded.select([SOURCE, PROMPT, MESSAGES, RESPONSE]).take(pa.array(rows)).to_pylist()
    chats = [r[MESSAGES] or [{"role": USER, "content": r[PROMPT]}] for r in records]
    texts = [m["content"] for chat in chats for m in chat] + [r[RESPONSE] or "" for r in records]
    normal, base = (k.to_pylist() for k in text_keys(pa.array(texts, pa.string()), affixes))
    at, replies = 0, len(texts) - len(records)
    ids, exact, dedupe_texts, groups = [], [], [], []
    for i, (record, chat) in enumerate(zip(records, chats)):
        roles, span = [m["role"] for m in chat], slice(at, at + len(chat))
        at += len(chat)
        reply = record[RESPONSE] is not None
        whole = canonical(chat, record[RESPONSE])
        ids.append(hashlib.sha256(f"{record[SOURCE]}\0".encode() + whole).digest()[:8])
        exact.append(whole)
        group = base[span][0] if len(chat) == 1 else _turns_text(roles, base[span], None)
        groups.append(group.encode("utf-8", "surrogatepass"))
        form = {"exact": None, "normalized": normal, "variants": base}[dedupe]
        if form is not None:
            text = _turns_text(roles, form[span], form[replies + i] if reply else None)
            dedupe_texts.append(text.encode("utf-8", "surrogatepass"))
    keys.ids[rows] = np.frombuffer(b"".join(ids), dtype=">u8")
    keys.exact[rows] = _digests(exact)
    keys.group[rows] = _digests(groups)
    if dedupe != "exact":  # with 'exact' the dedupe key is `exact` itself, already set
        keys.dedupe[rows] = _digests(dedupe_texts)


def _turns_text(roles: list[str], texts: list[str], reply: str | None) -> str:
    return json.dumps([list(zip(roles, texts)), reply], ensure_ascii=False, separators=(",", ":"))


def _digests(texts: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join([hashlib.sha256(t).digest()[:16] for t in texts]), "V16")


def first_occurrence(digests: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """For each usable row, the position of the first usable row with the same prompt digest (-1 for others);
    np.unique's return_index is the first occurrence, so 'first' follows the load order (spec order)."""
    positions = np.flatnonzero(usable)
    _, first, inverse = np.unique(digests[positions], return_index=True, return_inverse=True)
    result = np.full(len(digests), -1, dtype=np.int64)
    result[positions] = positions[first][inverse.reshape(-1)]
    return result


def hex_ids(keys: np.ndarray) -> pa.Array:
    """uint64 keys → the 16-hex-digit id strings (`prompt_id`), built in numpy without per-row strings."""
    octets = keys.astype(">u8").view(np.uint8).reshape(-1, 8)
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    text = np.empty((len(keys), 16), dtype=np.uint8)
    text[:, 0::2], text[:, 1::2] = digits[octets >> 4], digits[octets & 15]
    offsets = np.arange(0, 16 * (len(keys) + 1), 16, dtype=np.int32)
    return pa.StringArray.from_buffers(len(keys), pa.py_buffer(offsets), pa.py_buffer(text.tobytes()))
