"""The guard's label logits in fp32: the output head cut down to the label tokens, plus the model's post-head transform.

A bf16 `lm_head` rounds its outputs (steps of 0.125 at |logit| 16–32), and calling `base_model` then `lm_head` skips
what the model's own forward does to the logits afterwards (Gemma-2's final softcapping, Cohere's `logit_scale`,
Granite's `logits_scaling`). `LabelHead` keeps the label rows of the output embedding in fp32, applies the
transform its model type is known to apply (`POST_HEAD`), and `verify` compares it once with the model's own
forward, so a model with a transform missing from `POST_HEAD` fails at start-up instead of skewing every score.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from guardray.errors import InputError


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(logits / cap) * cap


def multiply(logits: torch.Tensor, factor: float) -> torch.Tensor:
    return logits * factor


def divide(logits: torch.Tensor, divisor: float) -> torch.Tensor:
    return logits / divisor


#: Post-head transforms: name → function(logits, config value).
TRANSFORMS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "softcap": softcap, "multiply": multiply, "divide": divide,
}

_SOFTCAP = (("final_logit_softcapping", "softcap"),)
_GEMMA_SOFTCAP = ("gemma2", "gemma3_text", "gemma3n", "gemma3n_text", "gemma4", "gemma4_text", "gemma4_unified",
                  "gemma4_unified_text", "vaultgemma", "nanochat")

#: What each model type's forward does to the logits after its `lm_head`, as (config field, transform) steps in
#: order, read from the text config; a field set to None is skipped (as the forwards do). Keyed by the top-level
#: model type, not the field, because fields disagree across models: `logits_scaling` divides in Granite and
#: multiplies in HyperCLOVAX, and Gemma3ForConditionalGeneration ("gemma3") applies no softcapping at all.
#: Sources: transformers 5.19, models/<type>/modeling_<type>.py, the ForCausalLM / ForConditionalGeneration forward.
POST_HEAD: dict[str, tuple[tuple[str, str], ...]] = {
    # Gemma2ForCausalLM: `logits / final_logit_softcapping; tanh; * final_logit_softcapping`; the same lines in
    # Gemma3ForCausalLM, Gemma3n/Gemma4/Gemma4Unified (ForCausalLM, and ForConditionalGeneration via
    # get_text_config()), VaultGemmaForCausalLM, NanoChatForCausalLM.
    **{model_type: _SOFTCAP for model_type in _GEMMA_SOFTCAP},
    "recurrent_gemma": (("logits_soft_cap", "softcap"),),  # RecurrentGemmaForCausalLM: tanh(logits / cap) * cap
    # CohereForCausalLM: `logits = logits * self.logit_scale  # main diff from Llama`; Cohere2, Cohere2Moe, and
    # CohereCompass (text and conditional-generation) alike.
    **{model_type: (("logit_scale", "multiply"),)
       for model_type in ("cohere", "cohere2", "cohere2_moe", "cohere_compass", "cohere_compass_text")},
    # GraniteForCausalLM: `logits = logits / self.config.logits_scaling  # main diff with Llama`; GraniteSWA,
    # GraniteMoe(SWA, Hybrid, Shared) and Granite4VisionForConditionalGeneration (text_config.logits_scaling).
    **{model_type: (("logits_scaling", "divide"),)
       for model_type in ("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid",
                          "granitemoeshared", "granite4_vision")},
    # MiniCPM3ForCausalLM divides the hidden state by logits_scaling before its bias-free lm_head: the same thing.
    "minicpm3": (("logits_scaling", "divide"),),
    # HyperCLOVAXForCausalLM: `lm_head(...) * self.config.logits_scaling` ("cf. GraniteForCausalLM which divides").
    **{model_type: (("logits_scaling", "multiply"),) for model_type in ("hyperclovax", "hyperclovax_vision_v2")},
    "falcon_h1": (("lm_head_multiplier", "multiply"),),  # FalconH1ForCausalLM: lm_head(...) * lm_head_multiplier
    # MuseGlimmerForConditionalGeneration: `* output_multiplier`, then the Gemma softcap.
    "muse_glimmer": (("output_multiplier", "multiply"), ("final_logit_softcapping", "softcap")),
}


def post_head_steps(config: Any) -> tuple[tuple[str, float], ...]:
    """(transform, value) steps that `config`'s model type applies after its head, with None fields left out."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    steps = []
    for field, transform in POST_HEAD.get(config.model_type, ()):
        value = getattr(text, field, None)
        if value is not None:
            steps.append((transform, float(value)))
    return tuple(steps)


@dataclass(frozen=True)
class LabelHead:
    """The output embedding's rows (and bias) of a few label tokens in fp32, then the model's post-head transform.

    `head(hidden)` maps final hidden states (the `base_model` output, after the final norm), shape (n, d) in any
    dtype, to (n, len(label_ids)) fp32 logits equal to the full model's logits at those tokens.
    """

    model_class: str
    label_ids: tuple[int, ...]
    weight: torch.Tensor  # (labels, d) fp32
    bias: torch.Tensor | None  # (labels,) fp32
    steps: tuple[tuple[str, float], ...]

    @classmethod
    def create(cls, model: Any, label_ids: Sequence[int]) -> "LabelHead":
        head = model.get_output_embeddings()
        name = type(model).__name__
        if head is None or getattr(head, "weight", None) is None:
            raise InputError(f"guard: {name} has no output embedding to read the label logits from")
        ids = torch.tensor(list(label_ids), device=head.weight.device)
        bias = getattr(head, "bias", None)
        return cls(name, tuple(label_ids), head.weight.detach()[ids].float(),
                   None if bias is None else bias.detach()[ids].float(), post_head_steps(model.config))

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._logits(hidden.to(self.weight.device, torch.float32), self.weight, self.bias)

    def _logits(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """fp32 logits of (n, d) hidden states against rows (m, d), or per-row rows (n, m, d), then the transform."""
        # A broadcast product and sum rather than a matmul: it stays fp32 even where TF32 matmuls are switched on,
        # and costs nothing for a few rows.
        logits = (hidden[:, None, :] * weight).sum(dim=-1)
        if bias is not None:
            logits = logits + bias
        for transform, value in self.steps:
            logits = TRANSFORMS[transform](logits, value)
        return logits

    @torch.inference_mode()
    def verify(self, model: Any, input_ids: Sequence[int], top: int = 8) -> float:
        """Compare with the model's own forward on `input_ids`, at every position, for the labels and the `top`
        largest logits there (where a softcap bends most); raise `InputError` beyond what the model's dtype
        explains, i.e. for a post-head transform missing from `POST_HEAD`. Returns the largest difference."""
        captured: list[torch.Tensor] = []
        # One forward: the hook takes the final hidden state on its way from base_model to the head.
        hook = model.base_model.register_forward_hook(lambda module, args, out: captured.append(out[0]))
        try:
            ids = torch.tensor([list(input_ids)], device=self.weight.device)
            logits = model(input_ids=ids, use_cache=False).logits[0].to(self.weight.device)
        finally:
            hook.remove()
        hidden = captured[0][0].to(self.weight.device, torch.float32)
        labels = torch.tensor(self.label_ids, device=logits.device).expand(len(logits), -1)
        tokens = torch.cat([labels, logits.abs().topk(top, dim=-1).indices], dim=1)  # (positions, labels + top)
        head = model.get_output_embeddings()
        weight = head.weight.detach()[tokens.to(head.weight.device)].to(hidden.device, torch.float32)
        bias = None
        if self.bias is not None:
            bias = head.bias.detach()[tokens.to(head.bias.device)].to(hidden.device, torch.float32)
        ours, reference = self._logits(hidden, weight, bias), logits.gather(1, tokens).float()
        error = (ours - reference).abs()
        terms = (hidden.abs()[:, None, :] * weight.abs()).sum(dim=-1) * self._gain()  # sum of |h_i w_i| per logit
        # The head's own precision, not only the logits': Mamba, Mllama (Llama-Guard-3-Vision) and others upcast
        # a bf16 head's output to fp32, so the logits are fp32 yet were rounded in bf16.
        dtype = max((logits.dtype, head.weight.dtype), key=lambda d: torch.finfo(d).eps)
        allowed = self.tolerance(reference, terms, hidden.shape[-1], dtype, hidden.device)
        position, column = divmod(int(torch.argmax(error - allowed).item()), tokens.shape[1])
        at = (position, column)
        if error[at] > allowed[at]:
            raise InputError(
                f"guard: {self.model_class} logits from its output embedding{self._described()} disagree with its "
                f"own forward: {ours[at].item():.6g} vs {reference[at].item():.6g} (token {tokens[at].item()} at "
                f"position {position}, allowed {allowed[at].item():.3g} in {dtype}): its forward applies a "
                f"post-head transform that guardray.label_head.POST_HEAD does not list for model type "
                f"{model.config.model_type!r}"
            )
        return float(error.max().item())

    @staticmethod
    def tolerance(reference: torch.Tensor, terms: torch.Tensor, width: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
        """What rounding explains: the model's logits and its transform computed in `dtype` (a few units of its
        roundoff of |logit|), plus another order of summing the dot products' `width` terms, whose magnitudes add
        up to `terms` (fp32 sums: a few units of roundoff times sqrt(width), since their errors mostly cancel)."""
        rounding = torch.finfo(dtype).eps / 2
        accumulation = 4 * 2.0 ** -24 * width ** 0.5
        if device.type == "cuda":
            matmul = torch.backends.cuda.matmul
            if dtype == torch.float32 and matmul.allow_tf32:
                accumulation = 4 * 2.0 ** -11  # TF32 rounds every product's inputs
            elif (dtype == torch.bfloat16 and matmul.allow_bf16_reduced_precision_reduction
                  or dtype == torch.float16 and matmul.allow_fp16_reduced_precision_reduction):
                accumulation = 4 * rounding  # split-K partial sums may be rounded to the model's dtype
        return 4 * rounding * (reference.abs() + 1) + accumulation * terms

    def _gain(self) -> float:
        """The most the transform can scale a change of the raw logits (softcap's slope is at most 1)."""
        gain = 1.0
        for transform, value in self.steps:
            gain *= {"multiply": abs(value), "divide": 1 / abs(value)}.get(transform, 1.0)
        return gain

    def _described(self) -> str:
        return "".join(f", {transform} {value:g}" for transform, value in self.steps) or " (no post-head transform)"


@dataclass(frozen=True)
class VocabHead:
    """Next-token log-probabilities over the WHOLE vocabulary in fp32, for the category scores (which need the
    normalised distribution, not two logits).

    The output embedding is multiplied in chunks of rows cast to fp32, so a bf16 model gets fp32 logits without
    an fp32 copy of its head (128k × 4096 would be 2 GiB), then the model's post-head transform
    (`POST_HEAD`, as `LabelHead`) and a log-softmax in fp32. On a GPU with TF32 matmuls switched on
    (`torch.backends.cuda.matmul.allow_tf32`, off by default) the products round to TF32.
    """

    weight: torch.Tensor  # (vocab, d) the head's own weight, any dtype (not copied)
    bias: torch.Tensor | None
    steps: tuple[tuple[str, float], ...]
    chunk: int = 16384

    @classmethod
    def create(cls, model: Any) -> "VocabHead":
        head = model.get_output_embeddings()
        if head is None or getattr(head, "weight", None) is None:
            raise InputError(f"guard: {type(model).__name__} has no output embedding to read the categories from")
        bias = getattr(head, "bias", None)
        return cls(head.weight.detach(), None if bias is None else bias.detach(), post_head_steps(model.config))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, d) final hidden states → (n, vocab) fp32 logits, transform applied."""
        hidden = hidden.to(self.weight.device, torch.float32)
        parts = []
        for start in range(0, self.weight.shape[0], self.chunk):
            rows = self.weight[start:start + self.chunk].float()
            part = hidden @ rows.T
            if self.bias is not None:
                part = part + self.bias[start:start + self.chunk].float()
            parts.append(part)
        logits = torch.cat(parts, dim=1)
        for transform, value in self.steps:
            logits = TRANSFORMS[transform](logits, value)
        return logits

    def log_probs(self, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """(n, d) hidden states and (n, m) token ids → (n, m) fp32 log-probabilities of those next tokens."""
        return torch.log_softmax(self.logits(hidden), dim=-1).gather(1, token_ids.to(self.weight.device))
