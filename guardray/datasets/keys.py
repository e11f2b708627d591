"""Per-row keys of the dataset stage: the row id, and the digests that find duplicates and split groups.

Split from `assemble.py`: these hash the prompt text a batch at a time and return numpy arrays, so the rest
of the assembly (dedupe, conflicts, subsample, split) never touches the text.
"""
from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from guardray.columns import PROMPT, SOURCE
from guardray.datasets.normalize import text_keys

#: Prompts turned into Python bytes at a time while hashing (bounds that transient memory).
_HASH_BATCH_ROWS = 8192



def prompt_id(source: str, prompt: str) -> str:
    """Stable id: the same prompt from the same source gets the same id in every run."""
    return hashlib.sha256(f"{source}\0{prompt}".encode()).hexdigest()[:16]

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
    return PromptKeys(ids, exact, chosen, group)


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
