"""`guardray.decoding`, the leaf that the responses stage (both backends) and serving share: stop ids, where a
generation ends, per-batch seeds, the generation settings; the left padding `generate` runs on; and that
serving, which uses it, does not pull in the training stages."""
from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pytest
import torch

from guardray.activations import Batch
from guardray.decoding import (PART_SCHEMA, Generation, batch_seed, generation_config, response_table, split_stop,
                               stop_ids)
from guardray.encoding import pad
from guardray.models import load_tokenizer
from guardray.rendering import chat_renderer
from guardray.jobspec import ModelSpec
from tests.conftest import REPO
from tests.models import smollm2_dir

SMOL = ModelSpec(id="smollm2-135m-instruct", dtype="float32", max_length=256)


@pytest.fixture(scope="module")
def tokenizer() -> object:
    return load_tokenizer(SMOL)


def test_stop_ids_join_the_tokenizer_and_the_generation_config(tokenizer: object) -> None:
    from transformers import GenerationConfig

    assert stop_ids(tokenizer, GenerationConfig.from_pretrained(smollm2_dir())) == (2,)  # <|im_end|>
    assert stop_ids(tokenizer, None) == (tokenizer.eos_token_id,)  # a model that ships no generation config
    assert stop_ids(tokenizer, GenerationConfig(eos_token_id=[0, 2])) == (0, 2)  # sorted, each once


def test_split_stop_cuts_at_the_first_stop_and_says_why(tokenizer: object) -> None:
    stops = stop_ids(tokenizer, None)
    answer = tokenizer.encode("Yes.") + [stops[0]]
    assert split_stop(answer + [stops[0]], stops, 8) == Generation(answer[:-1], "stop")
    assert split_stop([5, 6, 2, 2], (2,), 4) == split_stop([5, 6, 2], (2,), 8)
    assert split_stop([5, 6, 7, 8], (2,), 4) == Generation([5, 6, 7, 8], "length")
    assert split_stop([5, 6, 7, 8, 9], (2,), 4).tokens == [5, 6, 7, 8]  # never past max_new_tokens
    assert split_stop([5, 6, 7, 2], (2,), 4) == Generation([5, 6, 7], "stop")  # a stop at the last step is a stop
    assert split_stop([5, 6], (2,), 4).finish_reason == "stop"  # ended early without a stop id (vLLM's own stop)


def test_left_padding_ends_every_row_at_the_last_column(tokenizer: object) -> None:
    renderer = chat_renderer(tokenizer, SMOL)
    encoded = [renderer.encode(p) for p in ("hi", "Write a haiku about autumn leaves falling")]
    short, long = (len(e.ids) for e in encoded)
    ids, mask = pad([e.ids for e in encoded], tokenizer.pad_token_id, left=True)
    assert ids.shape == mask.shape == (2, long) and ids.dtype == mask.dtype == torch.long
    assert ids[0, long - short:].tolist() == encoded[0].ids and ids[1].tolist() == encoded[1].ids
    assert (ids[0, : long - short] == tokenizer.pad_token_id).all()
    assert mask[0].tolist() == [0] * (long - short) + [1] * short and bool(mask[1].all())
    right, _ = pad([e.ids for e in encoded], tokenizer.pad_token_id)
    assert right[0, :short].tolist() == encoded[0].ids

    # The batch serving builds: the user spans move with the padding, so pooling reads the same tokens.
    batch = Batch.build(encoded, tokenizer.pad_token_id, torch.device("cpu"), left=True)
    assert batch.input_ids.equal(ids) and batch.attention_mask.equal(mask)
    for row, e in enumerate(encoded):
        span = batch.input_ids[row, batch.user_start[row]:batch.user_end[row]].tolist()
        assert span == e.ids[e.user_start:e.user_end] and span


def test_batch_seeds_follow_the_seed_and_the_rows() -> None:
    seed = batch_seed(7, ["a", "b"])
    assert seed == batch_seed(7, ["a", "b"]) and 0 <= seed < 16**15  # stable across processes: a hash, not hash()
    assert len({seed, batch_seed(8, ["a", "b"]), batch_seed(7, ["b", "a"]), batch_seed(7, ["a"])}) == 4


def test_generation_config_depends_on_the_settings_alone() -> None:
    greedy = generation_config((2,), 2, 16, 0.0, 0.9)
    assert not greedy.do_sample and greedy.top_p is None and greedy.max_new_tokens == 16
    assert greedy.eos_token_id == [2] and greedy.pad_token_id == 2 and greedy.repetition_penalty == 1.0
    sampled = generation_config((0, 2), None, 4, 0.7, 0.9)
    assert sampled.do_sample and (sampled.temperature, sampled.top_p, sampled.top_k) == (0.7, 0.9, 0)


def test_response_table_keeps_its_schema_when_empty(tokenizer: object) -> None:
    part = response_table(pa.array(["r1"]), [Generation(tokenizer.encode("Yes."), "stop")], tokenizer)
    assert part.schema == PART_SCHEMA and part.column("response").to_pylist() == ["Yes."]
    assert response_table(pa.array([], pa.string()), [], tokenizer).schema == PART_SCHEMA


def test_serving_imports_no_training_stage() -> None:
    """A serve replica imports the engine; the engine shares decoding with the responses stage, not its module."""
    training = ("guardray.features", "guardray.responses", "guardray.datasets.assemble", "guardray.sharded")
    code = ("import sys, guardray.serve.engine; "
            f"print(' '.join(m for m in sys.modules if m.startswith({training!r})))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == []
