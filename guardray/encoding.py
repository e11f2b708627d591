"""From rendered texts to model batches: encoding many rows at once, length batching and padding.

Every model stage (features, guard, responses) and serving feed the model the same way: a renderer
(`guardray.rendering`) turns each row into ids, `encode_rows` does that for many rows in one tokenizer call
while keeping each row's failure as that row's error, `length_batches` groups rows of similar length (less
padding), and `pad` makes one rectangular batch of them, on the right for a forward pass (activations, the
guard) or on the left for `generate` (every row then ends where generation starts).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from guardray.rendering import ConversationRenderer, Encoded, PromptRenderer, caught


def encode_rows(renderer: PromptRenderer | ConversationRenderer, items: Sequence[Any], indices: Sequence[int],
                errors: dict[int, str], what: str) -> dict[int, Encoded]:
    """Render the prompts or (prompt, response) pairs at `indices` of `items` (one batched tokenizer call); one
    that cannot be rendered is recorded in `errors` as "<what>: <reason>", never dropped."""
    encoded: dict[int, Encoded] = {}
    try:
        results = renderer.encode_many([items[i] for i in indices])
    except Exception:  # noqa: BLE001 - the batched tokenizer call failed as a whole: one at a time
        results = [caught(renderer.encode, *(items[i] if isinstance(items[i], tuple) else (items[i],)))
                   for i in indices]
    for i, result in zip(indices, results):
        if isinstance(result, Exception):
            errors[i] = f"{what}: {type(result).__name__}: {result}"
        else:
            encoded[i] = result
    return encoded


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None,
                   packed: bool = False) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted), each within `batch_size` rows and, when set,
    `max_tokens` tokens: padded tokens, or (`packed`: the rows run as one unpadded sequence) their sum. A prompt
    longer than the budget gets a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in order:
        # sorted ascending: the row being added is the batch's widest
        cost = total + lengths[i] if packed else lengths[i] * (len(current) + 1)
        over_budget = max_tokens is not None and current and cost > max_tokens
        if current and (len(current) >= batch_size or over_budget):
            batches.append(current)
            current, total = [], 0
        current.append(i)
        total += lengths[i]
    if current:
        batches.append(current)
    return batches


def pad(rows: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) as long tensors of shape (rows, longest row): each row's ids, `pad_id` and
    mask 0 in the rest, after the ids (right padding) or before them (`left`: every row ends at the last
    column, where `generate` continues)."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for n, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[n, span] = torch.tensor(list(row), dtype=torch.long)
        mask[n, span] = 1
    return ids, mask
