"""How generation decodes and ends, shared by the responses stage (both backends) and serving.

A leaf: it imports no stage (features, datasets, sharded, responses), so a serve replica that needs the same
decoding as the responses stage does not pull in the training stages.

- `generation_config`: the transformers GenerationConfig of a decoding setting (greedy at temperature 0, else
  nucleus sampling), independent of the model's own generation defaults;
- `stop_ids` and `split_stop`: where a generation ends (an end-of-sequence id, or `max_new_tokens`) and why;
- `batch_seed`: the sampling seed of a batch (or a row) from the spec's seed and its row ids;
- `Generation` and `response_table`: one prompt's answer, and the responses stage's part of them.

Left padding for `generate` is `guardray.encoding.pad(..., left=True)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import pyarrow as pa

from guardray.columns import FINISH_REASON, ID, RESPONSE, RESPONSE_TOKENS
from guardray.cache import stable_hash

#: The responses stage's columns: the decoded text, the generated ids without the stop token, and why it ended.
RESPONSE_SCHEMA = pa.schema([(RESPONSE, pa.string()), (RESPONSE_TOKENS, pa.list_(pa.int32())),
                             (FINISH_REASON, pa.string())])
RESPONSE_COLUMNS = tuple(RESPONSE_SCHEMA.names)
#: A responses part: the row's id (checked against the dataset) and the response columns.
PART_SCHEMA = pa.schema([(ID, pa.string()), *RESPONSE_SCHEMA])


@dataclass(frozen=True)
class Generation:
    """One prompt's answer: generated ids without the stop token, and why generation ended."""

    tokens: list[int]
    finish_reason: str


def stop_ids(tokenizer: Any, generation_config: Any) -> tuple[int, ...]:
    """End-of-sequence ids: the tokenizer's eos and every id the model's generation config lists."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return tuple(sorted(i for i in ids if i is not None))


def split_stop(tokens: Sequence[int], stops: Sequence[int], max_new_tokens: int) -> Generation:
    """Cut generated ids at the first stop id ('stop'); without one, generation ran to `max_new_tokens`."""
    tokens = list(tokens)[:max_new_tokens]
    for position, token in enumerate(tokens):
        if token in stops:
            return Generation(tokens[:position], "stop")
    return Generation(tokens, "length" if len(tokens) >= max_new_tokens else "stop")


def batch_seed(seed: int, keys: Sequence[str]) -> int:
    """The sampling seed of one batch: from the spec's seed and the batch's row ids (in order)."""
    return int(stable_hash([seed, list(keys)], 15), 16)


def generation_config(stops: Sequence[int], pad_id: int | None, max_new_tokens: int, temperature: float,
                      top_p: float) -> Any:
    """A GenerationConfig that depends on these settings alone: greedy at temperature 0, else nucleus sampling.

    Every logits processor the model's own generation_config could switch on is set to off explicitly
    (transformers fills unset fields from it), so the answer depends on the settings alone, as with vLLM's.
    """
    from transformers import GenerationConfig

    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} \
        if temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    neutral = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_p": None, "typical_p": None,
               "encoder_repetition_penalty": 1.0, "length_penalty": 1.0, "min_new_tokens": 0,
               "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
               "epsilon_cutoff": None, "eta_cutoff": None}
    return GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=list(stops), pad_token_id=pad_id,
                            use_cache=True, **neutral, **sampling)


def response_table(ids: Any, generations: Sequence[Generation], tokenizer: Any) -> pa.Table:
    """A responses part: ids plus response (decoded without special tokens), response_tokens (int32) and
    finish_reason, typed as PART_SCHEMA so that a shard where every row failed keeps the schema."""
    texts = tokenizer.batch_decode([g.tokens for g in generations], skip_special_tokens=True) if generations else []
    return pa.table({
        ID: ids,
        RESPONSE: pa.array(texts, pa.string()),
        RESPONSE_TOKENS: pa.array([g.tokens for g in generations], pa.list_(pa.int32())),
        FINISH_REASON: pa.array([g.finish_reason for g in generations], pa.string()),
    }).cast(PART_SCHEMA)
