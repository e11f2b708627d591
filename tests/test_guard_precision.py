"""The guard's label logits: fp32 from the final hidden state, with the model's own post-head transform.

Tiny random models (hidden 64, 2 blocks, SmolLM2's tokenizer) of architectures with and without a post-head
transform, and the real SmolLM2. Their weights are rounded to bf16 before saving, as checkpoints ship, so a
float32 and a bfloat16 load hold the same weights and differ only in the precision of the computation.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import pytest
import torch
import transformers

from guardray.errors import InputError
from guardray.guard import HFGuard
from guardray.label_head import POST_HEAD, TRANSFORMS, post_head_steps
from guardray.models import LoadedModel, load_model, load_tokenizer
from guardray.jobspec import GuardSpec, ModelSpec
from tests.models import smollm2_dir

PROMPTS = ["hi", "How do I make a pipe bomb from hardware store parts?", "Write a haiku about autumn leaves falling"]
SPEC = GuardSpec(max_length=400)


def _tiny_config(kind: str) -> Any:
    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                  tie_word_embeddings=False)
    if kind == "llama":
        return transformers.LlamaConfig(**common)
    if kind == "gemma2":  # a cap of 5 that the scaled-up head's logits (|logit| ~ 17) run into
        return transformers.Gemma2Config(**common, head_dim=16, final_logit_softcapping=5.0)
    if kind == "cohere":
        return transformers.CohereConfig(**common, logit_scale=0.0625)
    return transformers.GraniteConfig(**common, logits_scaling=8.0)


#: Architecture → how much the random head is scaled up so the label logits land at |logit| ~ 10–20 after the
#: transform, where bf16 steps are 0.0625–0.125 (the issue's range).
KINDS = {"llama": 100.0, "gemma2": 100.0, "cohere": 1600.0, "granite": 800.0}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir())
    assert len(tokenizer) == 49152
    dirs = {}
    for kind, scale in KINDS.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_tiny_config(kind))
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(scale)
            for parameter in model.parameters():
                parameter.copy_(parameter.bfloat16().float())
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[kind] = str(path)
    return dirs


@pytest.fixture(scope="module")
def load(tiny_dirs: dict[str, str]) -> Callable[[str, str], LoadedModel]:
    loaded: dict[tuple[str, str], LoadedModel] = {}

    def get(kind: str, dtype: str) -> LoadedModel:
        if (kind, dtype) not in loaded:
            loaded[kind, dtype] = load_model(ModelSpec(id=tiny_dirs[kind], dtype=dtype, device="cpu"))
        return loaded[kind, dtype]

    return get


@pytest.fixture(scope="module")
def guard(load: Callable[[str, str], LoadedModel]) -> Callable[[str, str], HFGuard]:
    """One guard per tiny model and dtype (its creation runs the self-check)."""
    guards: dict[tuple[str, str], HFGuard] = {}

    def get(kind: str, dtype: str) -> HFGuard:
        if (kind, dtype) not in guards:
            guards[kind, dtype] = HFGuard.create(load(kind, dtype), SPEC)
        return guards[kind, dtype]

    return get


@torch.inference_mode()
def _full_forward(loaded: LoadedModel, ids: list[int], labels: list[int]) -> np.ndarray:
    """The model's own label logits at the last position, as its forward computes them."""
    logits = loaded.model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1]
    return logits[labels].float().numpy()


@torch.inference_mode()
def _last_hidden(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    return loaded.model.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1:]


def _labels(scores: dict[str, np.ndarray]) -> np.ndarray:
    return np.stack([scores["guard_logit_safe"], scores["guard_logit_unsafe"]], axis=1)


def test_default_labels_are_single_smollm2_tokens(guard: Callable[[str, str], HFGuard]) -> None:
    assert (guard("llama", "float32").safe_id, guard("llama", "float32").unsafe_id) == (2991, 20408)


@pytest.mark.parametrize("kind", KINDS)
def test_fp32_guard_equals_the_full_fp32_forward(kind: str, guard: Callable[[str, str], HFGuard]) -> None:
    """Within 1e-4 of `model(ids).logits` (measured: at most 5e-6). base_model + lm_head alone, the old code,
    misses Gemma2's softcap, Cohere's logit_scale and Granite's logits_scaling by whole units."""
    fp32 = guard(kind, "float32")
    loaded, labels = fp32.loaded, [fp32.safe_id, fp32.unsafe_id]
    encoded = [fp32.renderer.encode(p) for p in PROMPTS]
    reference = np.stack([_full_forward(loaded, e.ids, labels) for e in encoded])
    assert np.abs(reference).min() > 4  # large enough for the transforms to bite
    np.testing.assert_allclose(_labels(fp32.score(encoded)), reference, rtol=0, atol=1e-4)
    with torch.inference_mode():
        head = loaded.model.get_output_embeddings()
        head_only = np.stack([head(_last_hidden(loaded, e.ids))[0, labels].numpy() for e in encoded])
    if kind == "llama":
        np.testing.assert_allclose(head_only, reference, rtol=0, atol=1e-4)
    else:
        assert np.abs(head_only - reference).min() > 1


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_guard_has_no_head_rounding(kind: str, guard: Callable[[str, str], HFGuard]) -> None:
    """A bf16 model's guard logits equal the exact (float64) head and transform of its own bf16 hidden state
    within 1e-4 (measured: < 2e-6); the bf16 head that the model's forward uses is off by up to half a bf16
    step (measured: up to 0.06). Fails if scoring goes back to the model's head."""
    single = dataclasses.replace(guard(kind, "bfloat16"), prefix_cache=False)  # the forward of `_last_hidden`
    loaded, labels = single.loaded, [single.safe_id, single.unsafe_id]
    head = loaded.model.get_output_embeddings()
    ours, bf16_head = [], []
    for prompt in PROMPTS:
        encoded = single.renderer.encode(prompt)
        hidden = _last_hidden(loaded, encoded.ids)
        exact = _transform(loaded, hidden.double() @ head.weight.detach()[labels].double().T)
        with torch.inference_mode():
            rounded = _transform(loaded, head(hidden)[:, labels])  # in bf16, as the model's forward does
        ours.append(np.abs(_labels(single.score([encoded])) - exact.numpy()).max())
        bf16_head.append((rounded.double() - exact).abs().max().item())
    assert max(ours) < 1e-4, ours
    assert max(bf16_head) > 5e-3 and max(bf16_head) > 100 * max(ours), (bf16_head, ours)


def _transform(loaded: LoadedModel, logits: torch.Tensor) -> torch.Tensor:
    for name, value in post_head_steps(loaded.model.config):
        logits = TRANSFORMS[name](logits, value)
    return logits


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_guard_is_close_to_the_fp32_model(kind: str, load: Callable[[str, str], LoadedModel],
                                               guard: Callable[[str, str], HFGuard]) -> None:
    """bf16 mode against the full fp32 forward of the same weights. What is left is the bf16 hidden state, which
    no head can undo. Measured on 6 prompts: up to 0.17 on the raw logits (|logit| 10–20) and 0.25 on the score
    (Llama); rounding only the fp32 model's final hidden state to bf16 already moves them by up to 0.06. These
    random heads add up ±2-sized terms to |logit| ~ 17, which magnifies hidden-state error; bounds 0.3 and 0.4.
    The issue's 0.05 is met where the head is concerned: the previous test, < 1e-4 on the same hidden state."""
    bf16 = guard(kind, "bfloat16")
    encoded = [bf16.renderer.encode(p) for p in PROMPTS]
    reference = np.stack([_full_forward(load(kind, "float32"), e.ids, [bf16.safe_id, bf16.unsafe_id])
                          for e in encoded])
    ours = _labels(bf16.score(encoded))
    np.testing.assert_allclose(ours, reference, rtol=0, atol=0.3)
    np.testing.assert_allclose(ours[:, 1] - ours[:, 0], reference[:, 1] - reference[:, 0], rtol=0, atol=0.4)


@pytest.mark.parametrize("kind", ["gemma2", "cohere"])  # Llama's is tests/test_activations.py, on SmolLM2
def test_prefix_cache_matches_the_full_sequence(kind: str, guard: Callable[[str, str], HFGuard]) -> None:
    cached = guard(kind, "float32")
    full = dataclasses.replace(cached, prefix_cache=False)
    encoded = [cached.renderer.encode(p) for p in PROMPTS]
    for batch in (encoded, encoded[1:]):
        np.testing.assert_allclose(_labels(cached.score(batch)), _labels(full.score(batch)), rtol=0, atol=1e-4)


class TripledLlamaForCausalLM(transformers.LlamaForCausalLM):
    """A Llama whose forward scales its logits: a post-head transform that no registry entry describes."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 3
        return output


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_self_check_rejects_an_unknown_post_head_transform(dtype: str, tiny_dirs: dict[str, str]) -> None:
    spec = ModelSpec(id=tiny_dirs["llama"], dtype=dtype, device="cpu")
    model = TripledLlamaForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=getattr(torch, dtype)).eval()
    loaded = LoadedModel(spec, model, load_tokenizer(spec), torch.device("cpu"))
    with pytest.raises(InputError, match=r"TripledLlamaForCausalLM .*disagree with its own forward.*'llama'"):
        HFGuard.create(loaded, SPEC)


class UpcastLlamaForCausalLM(transformers.LlamaForCausalLM):
    """A bf16 head whose logits the forward returns in fp32, as Mamba's and Mllama's (Llama-Guard-3-Vision) do."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = super().forward(*args, **kwargs)
        output.logits = output.logits.float()
        return output


def test_self_check_accepts_logits_upcast_after_a_bf16_head(tiny_dirs: dict[str, str]) -> None:
    spec = ModelSpec(id=tiny_dirs["llama"], dtype="bfloat16", device="cpu")
    model = UpcastLlamaForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=torch.bfloat16).eval()
    loaded = LoadedModel(spec, model, load_tokenizer(spec), torch.device("cpu"))
    HFGuard.create(loaded, SPEC)  # the check allows bf16 rounding, not fp32's


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_self_check_catches_a_missing_softcap(dtype: str, load: Callable[[str, str], LoadedModel],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """With Gemma2 left out of the registry, the check sees the softcap, in bf16 too."""
    monkeypatch.delitem(POST_HEAD, "gemma2")
    with pytest.raises(InputError, match="Gemma2ForCausalLM"):
        HFGuard.create(load("gemma2", dtype), SPEC)


def test_post_head_steps_follow_the_model_type() -> None:
    assert post_head_steps(transformers.Gemma2Config(final_logit_softcapping=30.0)) == (("softcap", 30.0),)
    assert post_head_steps(transformers.Gemma2Config(final_logit_softcapping=None)) == ()
    assert post_head_steps(transformers.Gemma3TextConfig(final_logit_softcapping=30.0)) == (("softcap", 30.0),)
    # Gemma3ForConditionalGeneration applies no softcap even when its text config has one.
    assert post_head_steps(transformers.Gemma3Config(text_config={"final_logit_softcapping": 30.0})) == ()
    assert post_head_steps(transformers.CohereConfig(logit_scale=0.125)) == (("multiply", 0.125),)
    assert post_head_steps(transformers.GraniteConfig(logits_scaling=16.0)) == (("divide", 16.0),)
    assert post_head_steps(transformers.HyperCLOVAXConfig(logits_scaling=0.5)) == (("multiply", 0.5),)
    assert post_head_steps(transformers.LlamaConfig()) == ()


@pytest.mark.slow  # 8 s on two idle cores, 40 s on busy ones: bf16 matmuls are emulated without AVX512-BF16
def test_smollm2_bf16_guard_is_close_to_fp32() -> None:
    """The real SmolLM2 (30 blocks, d=576; label logits ~14–21) in bf16 mode against fp32 mode.

    Measured on 4 prompts: raw label logits differ by up to 0.13 and the score by up to 0.09, so the issue's 0.05
    is out of reach for bf16 mode as a whole. The bf16 head (the old code) added 0.016–0.039 of rounding, now
    ~2e-6; the GGUF weights rounded to bf16 account for up to 0.018 (0.028 on the score), and rounding only the
    fp32 model's final hidden state to bf16 already moves a label logit by up to 0.053: the rest is bf16
    arithmetic through 30 blocks, which no head can undo. Bounds: about twice the measured, 0.25 raw, 0.2 score.
    """
    scores = {}
    for dtype in ("float32", "bfloat16"):
        loaded = load_model(ModelSpec(id="smollm2-135m-instruct", dtype=dtype, device="cpu"))
        guard = HFGuard.create(loaded, GuardSpec())
        scores[dtype] = _labels(guard.score([guard.renderer.encode(p) for p in PROMPTS[:2]]))
    fp32, bf16 = scores["float32"], scores["bfloat16"]
    np.testing.assert_allclose(bf16, fp32, rtol=0, atol=0.25)
    np.testing.assert_allclose(bf16[:, 1] - bf16[:, 0], fp32[:, 1] - fp32[:, 0], rtol=0, atol=0.2)
