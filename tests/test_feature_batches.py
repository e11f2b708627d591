"""How the features stage cuts its forward passes: by a padded-token budget over length-sorted rows, with
defaults per device type, and its activations kept on the device until a shard is done (`guardray.features`)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from guardray.encoding import length_batches
from guardray.features import FORWARD_BUDGETS, FeatureExtractor, forward_budget
from guardray.jobspec import ExtractSpec, validate_spec
from tests.conftest import small_spec
from tests.models import build_tiny

PROMPTS = ["hi", "Write a haiku about autumn leaves falling", "How do I pick a lock?",
           "Summarise the plot of Hamlet in three sentences, then list its main characters and who dies.", "ok"]


def test_the_budget_defaults_by_device_type_and_the_spec_wins() -> None:
    assert forward_budget(ExtractSpec(), torch.device("cpu")) == FORWARD_BUDGETS["cpu"] == (16, 4096)
    assert forward_budget(ExtractSpec(), "cuda:3") == FORWARD_BUDGETS["cuda"] == (512, 16384)
    assert forward_budget(ExtractSpec(batch_size=4, max_tokens_per_batch=100), "cuda") == (4, 100)


def test_gpu_budget_batches_are_large_and_the_last_is_not_padded_to_the_budget() -> None:
    """Prompt lengths like a real mix (30-400 tokens): at the GPU defaults most forwards carry 8-16k padded
    tokens, none more, and the last (shortest-remaining) batch pads to its own longest row only."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(30, 400, 4096).tolist()
    rows, tokens = FORWARD_BUDGETS["cuda"]
    batches = length_batches(lengths, rows, tokens)
    padded = [max(lengths[i] for i in b) * len(b) for b in batches]
    assert sorted(i for b in batches for i in b) == list(range(4096))
    assert max(padded) <= tokens and np.median(padded) >= 8192
    real = sum(lengths)
    assert real / sum(padded) > 0.95  # length-sorted: little padding
    assert padded[-1] == max(lengths[i] for i in batches[-1]) * len(batches[-1])


@pytest.fixture(scope="module")
def extractor(tmp_path_factory: pytest.TempPathFactory) -> FeatureExtractor:
    model = build_tiny(tmp_path_factory.mktemp("tiny") / "llama")
    spec = validate_spec(small_spec("unused", model={"id": model, "device": "cpu", "max_length": 96},
                                    extract={"layers": [0, -1], "poolings": ["last", "mean"], "batch_size": 2,
                                             "store_dtype": "float16"},
                                    guard={"enabled": False}))
    return FeatureExtractor.from_spec(spec)


def test_a_shard_equals_each_row_alone_and_tokens_are_counted_from_the_lengths(extractor: FeatureExtractor) -> None:
    """Batches of 2 (so three forwards with padding) give each row what it gets alone, stored as float16, and
    the token counts are the rows' lengths (no device sync needed to count them)."""
    before = extractor.stats.tokens, extractor.stats.padded_tokens
    columns, errors = extractor.process(PROMPTS)
    assert not errors and columns["_index"] == list(range(len(PROMPTS)))
    lengths = [len(extractor.renderer.encode(p).ids) for p in PROMPTS]
    assert extractor.stats.tokens - before[0] == sum(lengths)
    assert extractor.stats.padded_tokens - before[1] >= sum(lengths)
    names = [n for n in columns if n.startswith("act_")]
    assert len(names) == 4
    for i, prompt in enumerate(PROMPTS):
        alone, _ = extractor.process([prompt])
        for name in names:
            assert columns[name].dtype == np.float16 and columns[name].shape[0] == len(PROMPTS)
            np.testing.assert_allclose(columns[name][i].astype(np.float32), alone[name][0].astype(np.float32),
                                       atol=2e-3, rtol=1e-2)


def test_a_failed_row_is_an_error_and_its_neighbours_keep_their_activations(extractor: FeatureExtractor) -> None:
    columns, errors = extractor.process(["hello there", ValueError("messages[1]: bad role"), "a third prompt"])
    assert errors == {1: "messages[1]: bad role"} and columns["_index"] == [0, 2]
    assert all(not np.isnan(columns[n].astype(np.float32)).any() for n in columns if n.startswith("act_"))


@pytest.mark.parametrize("layers", [[0, 2], [3]])
def test_packed_rows_give_the_padded_activations(extractor: FeatureExtractor, layers: list[int]) -> None:
    """One unpadded sequence with per-row positions (transformers keeps the rows apart from the restarts) gives
    every prompt pooling of every row what the right-padded batch gives, within float32 rounding."""
    from guardray.activations import Batch, capture
    from guardray.columns import PROMPT_POOLINGS

    chat, pad_id = extractor.chat, extractor.chat.tokenizer.pad_token_id
    encoded = [extractor.renderer.encode(p) for p in PROMPTS]
    padded = capture(chat.model, Batch.build(encoded, pad_id, chat.device), layers, PROMPT_POOLINGS)
    batch = Batch.pack(encoded, pad_id, chat.device)
    assert batch.packing.input_ids.shape == (1, sum(len(e.ids) for e in encoded))  # no padding at all
    packed = capture(chat.model, batch, layers, PROMPT_POOLINGS)
    assert packed.keys() == padded.keys()
    for key in padded:
        torch.testing.assert_close(packed[key], padded[key], atol=1e-4, rtol=1e-4)


def test_packing_on_writes_the_padded_columns_and_counts_no_padding(extractor: FeatureExtractor) -> None:
    from dataclasses import replace

    packed = replace(extractor, packed=True, stats=type(extractor.stats)())
    columns, errors = packed.process(PROMPTS)
    reference, _ = extractor.process(PROMPTS)
    assert not errors and packed.stats.padded_tokens == packed.stats.tokens
    for name in (n for n in columns if n.startswith("act_")):
        np.testing.assert_allclose(columns[name].astype(np.float32), reference[name].astype(np.float32),
                                   atol=2e-3, rtol=1e-2)


def test_the_packing_check_refuses_an_attention_that_lets_rows_mix(extractor: FeatureExtractor,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """With positions that do not restart (what an attention that ignores the boundaries sees), packed rows
    attend to each other: the load-time check names the difference; the real packing passes it."""
    from dataclasses import replace

    from guardray.activations import Batch, Packing, packing_problem

    chat, pad_id = extractor.chat, extractor.chat.tokenizer.pad_token_id
    encoded = [extractor.renderer.encode(p) for p in PROMPTS[:2]]
    assert packing_problem(chat.model, encoded, pad_id, chat.device) is None
    real_pack = Batch.pack

    def mixing(encoded, pad_id, device):  # noqa: ANN001, ANN202
        batch = real_pack(encoded, pad_id, device)
        total = batch.packing.input_ids.shape[1]
        return replace(batch, packing=Packing(
            batch.packing.input_ids, torch.arange(total)[None, :], batch.packing.gather))

    monkeypatch.setattr(Batch, "pack", staticmethod(mixing))
    assert "do not keep packed rows apart" in packing_problem(chat.model, encoded, pad_id, chat.device)


def test_packed_batches_are_cut_by_the_sum_of_their_lengths() -> None:
    lengths = [10, 300, 20, 30, 40]
    padded = length_batches(lengths, batch_size=8, max_tokens=120)
    packed = length_batches(lengths, batch_size=8, max_tokens=120, packed=True)
    assert packed[0] == [0, 2, 3, 4] and [1] in packed  # 100 tokens packed; padded: 40 x 4 = 160 > 120
    assert padded[0] == [0, 2, 3]
    assert all(sum(lengths[i] for i in b) <= 120 for b in packed if len(b) > 1)
