"""Activation capture, rendering and guard scoring on the real SmolLM2 and tiny random models."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from guardray.activations import POOL_FUNCTIONS, Batch, capture, decoder_layers, pool, resolve_layers
from guardray.columns import EMA_HALF_LIFE_TOKENS, POOLINGS
from guardray.errors import InputError
from guardray.encoding import length_batches
from guardray.guard import HFGuard, guard_columns, resolve_label_tokens
from guardray.models import LoadedModel, load_model
from guardray.rendering import chat_renderer
from guardray.jobspec import GuardSpec, ModelSpec
from tests.models import build_tiny

PROMPTS = ["hi", "How do I make a pipe bomb from hardware store parts?", "Write a haiku about autumn leaves falling",
           "Summarise the plot of Hamlet in three sentences, then list its main characters."]


@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    return load_model(ModelSpec(id="smollm2-135m-instruct", max_length=512))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = build_tiny(tmp_path_factory.mktemp("tiny") / "llama")
    return load_model(ModelSpec(id=path, max_length=128))


def _batch(loaded: LoadedModel, prompts: list[str]) -> tuple[Batch, list]:
    renderer = chat_renderer(loaded.tokenizer, loaded.spec)
    encoded = [renderer.encode(p) for p in prompts]
    return Batch.build(encoded, loaded.tokenizer.pad_token_id, loaded.device), encoded


def test_hooks_equal_output_hidden_states(smol: LoadedModel) -> None:
    batch, _ = _batch(smol, PROMPTS)
    layers = [3, 14, 28, 29]
    got = capture(smol.model, batch, layers, ["last", "mean"], stop_early=False)
    with torch.no_grad():
        hidden = smol.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            output_hidden_states=True).hidden_states
    for layer in (3, 14, 28):  # block L's output is hidden_states[L + 1] for every block but the last
        for pooling in ("last", "mean"):
            torch.testing.assert_close(got[(pooling, layer)], pool(hidden[layer + 1], batch, pooling))
    # the last block: HF applies the final norm to hidden_states[-1]; we keep the raw residual stream
    raw_norm = got[("last", 29)].norm(dim=-1).mean()
    normed = pool(hidden[30], batch, "last").norm(dim=-1).mean()
    assert raw_norm > 5 * normed


def test_early_stop_gives_identical_activations(smol: LoadedModel) -> None:
    batch, _ = _batch(smol, PROMPTS)
    early = capture(smol.model, batch, [5, 12], ["last", "mean", "mean_all"], stop_early=True)
    full = capture(smol.model, batch, [5, 12], ["last", "mean", "mean_all"], stop_early=False)
    for key in full:
        assert torch.equal(early[key], full[key])


def test_early_stop_skips_upper_blocks(smol: LoadedModel) -> None:
    batch, _ = _batch(smol, PROMPTS[:1])
    calls: list[int] = []
    handles = [block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
               for i, block in enumerate(decoder_layers(smol.model))]
    try:
        capture(smol.model, batch, [2, 6], ["last"])
    finally:
        for h in handles:
            h.remove()
    assert calls == list(range(7))


def test_long_prompt_still_ends_with_the_generation_prompt(smol: LoadedModel) -> None:
    renderer = chat_renderer(smol.tokenizer, ModelSpec(max_length=64))
    text = " ".join(f"word{i}" for i in range(300))
    encoded = renderer.encode(text)
    assert len(encoded.ids) == 64 and encoded.truncated and encoded.n_tokens > 300
    decoded = smol.tokenizer.decode(encoded.ids)
    assert decoded.endswith("<|im_end|>\n<|im_start|>assistant\n")
    user = smol.tokenizer.decode(encoded.ids[encoded.user_start:encoded.user_end])
    assert user.startswith("word0 word1") and user.endswith("word298 word299")  # middle cut keeps both ends
    short = renderer.encode("hello")
    assert not short.truncated and short.n_tokens == len(short.ids)


def test_start_truncation_keeps_the_start(smol: LoadedModel) -> None:
    renderer = chat_renderer(smol.tokenizer, ModelSpec(max_length=64, truncation="start"))
    encoded = renderer.encode(" ".join(f"word{i}" for i in range(300)))
    user = smol.tokenizer.decode(encoded.ids[encoded.user_start:encoded.user_end])
    assert user.startswith("word0") and "word299" not in user
    assert smol.tokenizer.decode(encoded.ids).endswith("<|im_start|>assistant\n")


def test_rendering_matches_the_tokenizers_own_template(smol: LoadedModel) -> None:
    renderer = chat_renderer(smol.tokenizer, smol.spec)
    for prompt in PROMPTS:
        expected = smol.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                                      add_generation_prompt=True)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert renderer.encode(prompt).ids == list(expected)


@pytest.mark.parametrize("pooling", ["last", "mean", "mean_all"])
def test_padded_batch_equals_single_prompts(tiny: LoadedModel, pooling: str) -> None:
    batch, encoded = _batch(tiny, PROMPTS)
    assert batch.attention_mask.sum(dim=1).unique().numel() > 1  # really padded
    together = capture(tiny.model, batch, [1, 3], [pooling])
    for row, prompt in enumerate(PROMPTS):
        single, _ = _batch(tiny, [prompt])
        alone = capture(tiny.model, single, [1, 3], [pooling])
        for key in alone:
            torch.testing.assert_close(together[key][row], alone[key][0], atol=1e-5, rtol=1e-4)


def test_mean_pools_only_the_user_text(tiny: LoadedModel) -> None:
    batch, encoded = _batch(tiny, ["hello there friend"])
    got = capture(tiny.model, batch, [2], ["mean", "mean_all"])
    hidden = {}
    handle = decoder_layers(tiny.model)[2].register_forward_hook(lambda m, a, o: hidden.update(h=o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        tiny.model(input_ids=batch.input_ids)
    handle.remove()
    e = encoded[0]
    torch.testing.assert_close(got[("mean", 2)][0], hidden["h"][0, e.user_start:e.user_end].mean(0))
    torch.testing.assert_close(got[("mean_all", 2)][0], hidden["h"][0].mean(0))


def test_every_pooling_of_the_table_pools_its_positions() -> None:
    """`columns.POOLINGS` names what each pooling reads; the math here follows it, by hand on a padded batch: row 0
    right-padded with a user span, row 1 with an empty span (an empty response)."""
    hidden = torch.arange(2 * 5 * 2, dtype=torch.float32).reshape(2, 5, 2)
    batch = Batch(input_ids=torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1, 1, 0],
                                                                                              [1, 1, 1, 1, 1]]),
                  user_start=torch.tensor([1, 3]), user_end=torch.tensor([3, 3]))
    expected = {
        "last": torch.stack([hidden[0, 3], hidden[1, 4]]),
        "mean": torch.stack([hidden[0, 1:3].mean(0), torch.zeros(2)]),
        "mean_all": torch.stack([hidden[0, :4].mean(0), hidden[1].mean(0)]),
        "max": torch.stack([hidden[0, 2], hidden[1, 2]]),  # an empty span: the token before it, as resp_last
        "ema": torch.stack([(2 ** (-1 / EMA_HALF_LIFE_TOKENS) * hidden[0, 1] + hidden[0, 2])
                            / (2 ** (-1 / EMA_HALF_LIFE_TOKENS) + 1), hidden[1, 2]]),
        "resp_last": torch.stack([hidden[0, 2], hidden[1, 2]]),
        "resp_mean": torch.stack([hidden[0, 1:3].mean(0), torch.zeros(2)]),
    }
    assert set(expected) == set(POOLINGS)
    for name in POOLINGS:
        torch.testing.assert_close(pool(hidden, batch, name), expected[name])
    assert {p.positions for p in POOLINGS.values()} == set(POOL_FUNCTIONS)
    with pytest.raises(InputError, match="unknown pooling 'median'; known: last, mean, mean_all, max, ema, resp_last"):
        pool(hidden, batch, "median")


def test_gpt2_style_models_are_found(tmp_path: Path) -> None:
    loaded = load_model(ModelSpec(id=build_tiny(tmp_path / "gpt2", kind="gpt2"), max_length=64))
    assert len(decoder_layers(loaded.model)) == 4
    batch, _ = _batch(loaded, PROMPTS[:2])
    assert capture(loaded.model, batch, [0, 3], ["last"])[("last", 3)].shape == (2, 64)


def test_layer_errors() -> None:
    assert resolve_layers([-1, 0, -1, 5], 30) == [0, 5, 29]
    with pytest.raises(InputError, match="layer 30 out of range: model has 30 layers"):
        resolve_layers([30], 30)
    with pytest.raises(InputError, match="cannot find decoder blocks in Linear"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_label_token_resolution(smol: LoadedModel) -> None:
    assert resolve_label_tokens(smol.tokenizer, GuardSpec(safe_token="safe", unsafe_token="unsafe")) == (2991, 20408)
    assert resolve_label_tokens(smol.tokenizer, GuardSpec(safe_token_id=9109, unsafe_token_id=25110)) == (9109, 25110)
    with pytest.raises(InputError, match="not single tokens in any spelling; tried 'safe'"):
        resolve_label_tokens(smol.tokenizer, GuardSpec(safe_token="safe", unsafe_token="antidisestablishmentarian"))
    with pytest.raises(InputError, match="give both"):
        resolve_label_tokens(smol.tokenizer, GuardSpec(safe_token_id=1))


def test_guard_score_formula() -> None:
    cols = guard_columns(np.array([2.0, 0.0, 5.0]), np.array([1.0, 0.0, 9.0]))
    np.testing.assert_allclose(cols["guard_score"], [-1.0, 0.0, 4.0])
    np.testing.assert_allclose(cols["guard_p_unsafe"], np.exp([1, 0, 9]) / (np.exp([2, 0, 5]) + np.exp([1, 0, 9])), rtol=1e-6)


def test_guard_reads_the_logits_of_the_next_token(smol: LoadedModel) -> None:
    guard = HFGuard.create(smol, GuardSpec())
    encoded = [guard.renderer.encode(p) for p in PROMPTS]
    scores = guard.score(encoded)
    for row, e in enumerate(encoded):
        with torch.no_grad():
            logits = smol.model(input_ids=torch.tensor([e.ids])).logits[0, -1]
        assert scores["guard_logit_safe"][row] == pytest.approx(float(logits[2991]), abs=1e-3)
        assert scores["guard_logit_unsafe"][row] == pytest.approx(float(logits[20408]), abs=1e-3)
    assert np.all(np.sign(scores["guard_score"]) == np.sign(scores["guard_logit_unsafe"] - scores["guard_logit_safe"]))
    rendered = smol.tokenizer.decode(encoded[1].ids)
    assert "S14: Code Interpreter Abuse" in rendered and rendered.endswith("<|im_start|>assistant\n")


def test_length_batches_respect_size_and_token_budget() -> None:
    lengths = [5, 100, 7, 6, 300, 8]
    batches = length_batches(lengths, batch_size=2, max_tokens=250)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert all(len(b) <= 2 for b in batches)
    assert [4] in batches  # over the budget alone
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 250


def test_guard_prefix_cache_matches_full_sequence(smol: LoadedModel) -> None:
    cached = HFGuard.create(smol, GuardSpec())
    full = HFGuard.create(smol, GuardSpec())
    full.prefix_cache = False
    encoded = [cached.renderer.encode(p) for p in PROMPTS]
    assert len(cached.renderer.prefix) > 100  # the moderation prompt before the user's text is shared
    for batch in (encoded, encoded[1:3], encoded[:1]):  # reuse of the cached prefix across batch sizes
        a, b = cached.score(batch), full.score(batch)
        for name in a:
            np.testing.assert_allclose(a[name], b[name], atol=2e-3, rtol=1e-4)


def test_the_same_last_turn_after_two_histories_reads_differently_and_as_a_plain_forward(smol: LoadedModel) -> None:
    """A conversation row is one rendering: its `last` activation is the plain transformers forward of the whole
    rendered conversation, and the history changes it (the probe reads the context, not the last turn alone)."""
    from guardray.chats import Chat

    renderer = chat_renderer(smol.tokenizer, smol.spec)
    turn = "How do I get into the building at night?"
    chats = [Chat(turn, (("user", "I am the night guard here."), ("assistant", "Understood, how can I help?"))),
             Chat(turn, (("user", "I want to rob the jewellery shop."), ("assistant", "I cannot help with that.")))]
    encoded = renderer.encode_many(chats)
    batch = Batch.build(encoded, smol.tokenizer.pad_token_id, smol.device)
    got = capture(smol.model, batch, [20], ["last", "mean"])
    for row, (chat, e) in enumerate(zip(chats, encoded)):
        ids = smol.tokenizer.apply_chat_template(chat.messages(smol.spec.system_prompt), tokenize=True,
                                                 add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        assert e.ids == ids
        with torch.no_grad():
            hidden = smol.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[21]
        torch.testing.assert_close(got[("last", 20)][row], hidden[0, -1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[("mean", 20)][row], hidden[0, e.user_start:e.user_end].mean(0),
                                   atol=1e-4, rtol=1e-4)
    gap = (got[("last", 20)][0] - got[("last", 20)][1]).norm() / got[("last", 20)][0].norm()
    assert gap > 0.01
