"""`gpu_check.py`'s throughput sections: krnel-graph's way, guardray's features path, the HF and vLLM guards.

All on the same model and prompts in one process, so their figures compare. Useful FLOPs are 2 × the weights of
the decoder blocks a forward needs (up to the deepest probed layer) × the real (unpadded) tokens, counted ONCE
per prompt however many passes a path makes: a path that runs a full forward per layer, or pads, gets a lower
useful MFU for the same hardware work.
"""
from __future__ import annotations

import importlib.util
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks.gpu_check_setup import Context, Phases, block_params, length_stats, llama3_8b_config, sync, throughput, warm_up
from guardray.activations import Batch, capture, pool
from guardray.columns import GUARD_SCORE, HARMFUL, ID, N_TOKENS, SOURCE, SPLIT, TRUNCATED, feature_column
from guardray.encoding import encode_rows, length_batches
from guardray.features import STORE_DTYPES, FeatureExtractor, forward_budget, to_table
from guardray.models import LoadedModel
from guardray.rendering import Encoded
from guardray.jobspec import ExtractSpec, GuardSpec, ModelSpec

#: The two poolings every probing job asks for.
POOLINGS = ("last", "mean")
#: krnel-graph's batch: 4 prompts in dataset order.
KRNEL_BATCH = 4
#: The guard's label tokens in SmolLM2's vocabulary (single tokens with the leading space).
GUARD_LABELS = {"safe_token": " safe", "unsafe_token": " unsafe"}


def krnel(ctx: Context) -> dict[str, Any]:
    """krnel-graph's way: batches of 4 in dataset order, right-padded, one full forward with
    output_hidden_states per requested layer (L layers = L forwards); in the model's dtype, then fp32 on a subset."""
    loaded, encoded = ctx.loaded(), ctx.encoded()[: ctx.sizes.krnel]
    warm_up(loaded, encoded)
    out: dict[str, Any] = {"batch_size": KRNEL_BATCH, "poolings": POOLINGS, "dtype": str(ctx.dtype)[6:]}
    for label, layers in ctx.probe_layers().items():
        out[label] = {"skipped": "budget"} if ctx.over_budget() else krnel_run(loaded, encoded, layers, ctx.peaks())
    subset = encoded[: ctx.sizes.krnel_fp32]
    out["fp32_subset"] = {"skipped": "budget"} if ctx.over_budget() else in_fp32(
        loaded, lambda: {label: krnel_run(loaded, subset, layers, {}) for label, layers in ctx.probe_layers().items()})
    return out


@torch.inference_mode()
def krnel_run(loaded: LoadedModel, encoded: Sequence[Encoded], layers: list[int], peaks: dict[str, float | None]
              ) -> dict[str, Any]:
    model, pad_id = loaded.model, loaded.tokenizer.pad_token_id
    real, padded, forwards = sum(len(e.ids) for e in encoded), 0, 0
    sync(loaded.device)
    started = time.perf_counter()
    for layer in layers:
        for i in range(0, len(encoded), KRNEL_BATCH):
            batch = Batch.build(encoded[i:i + KRNEL_BATCH], pad_id, loaded.device)
            hidden = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           output_hidden_states=True).hidden_states[layer + 1]
            for pooling in POOLINGS:
                pool(hidden, batch, pooling).cpu()
            padded += batch.input_ids.numel() if layer == layers[0] else 0
            forwards += 1
    sync(loaded.device)
    seconds = time.perf_counter() - started
    useful = 2 * block_params(model, max(layers)) * real
    return {"layers": layers, "forwards": forwards, **throughput(len(encoded), real, padded, seconds, useful, peaks)}


def in_fp32(loaded: LoadedModel, work: Any) -> dict[str, Any]:
    """Run `work` with the model's weights in fp32 (converted in place: bf16 → fp32 → bf16 is exact), then back.
    TF32 stays as the process has it (recorded by the environment section)."""
    dtype = loaded.model.dtype
    loaded.model.float()
    try:
        return {"dtype": "float32", **work()}
    finally:
        loaded.model.to(dtype)
        if loaded.device.type == "cuda":
            torch.cuda.empty_cache()


def features(ctx: Context) -> dict[str, Any]:
    """guardray's features path at the job defaults and tuned, for 1 and 4 layers × (last, mean): time split
    into encode, forward, copy and write (the GPU synchronised at each boundary), then the same settings end to
    end through `FeatureExtractor.process` (what the actor runs, no synchronisation added)."""
    loaded, prompts = ctx.loaded(), ctx.prompts()[: ctx.sizes.features]
    warm_up(loaded, ctx.encoded())
    out: dict[str, Any] = {"prompts": len(prompts), "poolings": POOLINGS, "store_dtype": "float16",
                           "gpu_busy": "forward seconds / all four phases' seconds (the forward phase includes "
                                       "kernel launches: an upper bound on the GPU's busy time)"}
    for setting, extract in ctx.extract_settings().items():
        rows, tokens = forward_budget(extract, loaded.device)
        out[f"{setting}_settings"] = {"batch_size": rows, "rows_per_shard": extract.rows_per_shard,
                                      "max_tokens_per_batch": tokens}
        for label, layers in ctx.probe_layers().items():
            key = f"{setting}_{label}"
            out[key] = {"skipped": "budget"} if ctx.over_budget() else phased_run(ctx, prompts, layers, extract)
        layers = ctx.probe_layers()["4_layers"]
        out[f"{setting}_4_layers_end_to_end"] = ({"skipped": "budget"} if ctx.over_budget()
                                                 else end_to_end(ctx, prompts, layers, extract))
    return out


def phased_run(ctx: Context, prompts: Sequence[str], layers: list[int], extract: ExtractSpec) -> dict[str, Any]:
    """The features actor's steps with guardray's own code, each phase timed: encode (`encode_rows`), forward
    (`length_batches`, `Batch.build`, `capture`), copy (device → host, float16 as stored), write (`to_table`,
    one parquet part per `rows_per_shard` rows, to a temporary folder)."""
    loaded = ctx.loaded()
    phases, errors = Phases(loaded.device), {}
    with phases("encode"):
        encoded = encode_rows(ctx.renderer(), prompts, range(len(prompts)), errors, "render")
    keys = list(encoded)
    batches = length_batches([len(encoded[k].ids) for k in keys], *forward_budget(extract, loaded.device))
    np_dtype = STORE_DTYPES["float16"][0]
    host: dict[str, np.ndarray] = {}
    real = padded = widest = 0
    for rows in batches:
        items = [encoded[keys[r]] for r in rows]
        lengths = [len(e.ids) for e in items]  # counted on the host: no device sync for statistics
        real, padded, widest = real + sum(lengths), padded + len(items) * max(lengths), max(widest, len(items) * max(lengths))
        with phases("forward"):
            batch = Batch.build(items, loaded.tokenizer.pad_token_id, loaded.device)
            pooled = capture(loaded.model, batch, layers, POOLINGS)
        with phases("copy"):
            for (pooling, layer), values in pooled.items():
                name = feature_column(pooling, layer)
                if name not in host:
                    host[name] = np.empty((len(keys), values.shape[1]), np_dtype)
                host[name][rows] = values.cpu().numpy()
    with phases("write"), tempfile.TemporaryDirectory(prefix="gpu-check-parts-") as folder:
        features = {feature_column(p, layer): (p, layer) for layer in layers for p in POOLINGS}
        write_parts(Path(folder), [encoded[k] for k in keys], host, features, extract)
    seconds = sum(phases.seconds.values())
    useful = 2 * block_params(loaded.model, max(layers)) * real
    return {"layers": layers, "render_errors": len(errors), "forwards": len(batches),
            "mean_padded_tokens_per_forward": padded / max(len(batches), 1), "max_padded_tokens_per_forward": widest,
            "phase_seconds": phases.seconds, "gpu_busy_pct": 100 * phases.seconds.get("forward", 0.0) / seconds,
            **throughput(len(keys), real, padded, seconds, useful, ctx.peaks()), **value_scan(host)}


def write_parts(folder: Path, encoded: list[Encoded], host: dict[str, np.ndarray], features: dict[str, tuple[str, int]],
                extract: ExtractSpec) -> None:
    """The parts as the features stage lays them out (`to_table`), one per `rows_per_shard` rows."""
    for start in range(0, len(encoded), extract.rows_per_shard):
        end = min(start + extract.rows_per_shard, len(encoded))
        meta = pa.table({ID: [f"row-{i}" for i in range(start, end)], HARMFUL: [False] * (end - start),
                         SOURCE: ["gpu_check"] * (end - start), SPLIT: ["train"] * (end - start)})
        columns = {N_TOKENS: np.array([e.n_tokens for e in encoded[start:end]], np.int32),
                   TRUNCATED: np.array([e.truncated for e in encoded[start:end]], bool),
                   **{name: values[start:end] for name, values in host.items()}}
        pq.write_table(to_table(meta, columns, "float16", features), folder / f"part-{start}-{end}.parquet")


def value_scan(host: dict[str, np.ndarray]) -> dict[str, Any]:
    """Non-finite values in what would be stored (float16), and the largest magnitude before storage overflows."""
    stored = np.stack(list(host.values())) if host else np.zeros(0, np.float16)
    return {"non_finite_stored": int((~np.isfinite(stored)).sum()), "max_abs_stored": float(np.abs(stored).max())}


def end_to_end(ctx: Context, prompts: Sequence[str], layers: list[int], extract: ExtractSpec) -> dict[str, Any]:
    """`FeatureExtractor.process` as the actor calls it (render, length batches, capture, host copies), timed
    from the outside only; parquet writing is not in it."""
    loaded = ctx.loaded()
    extractor = FeatureExtractor(loaded, ctx.renderer(), layers, POOLINGS, extract)
    sync(loaded.device)
    started = time.perf_counter()
    columns, errors = extractor.process(list(prompts))
    sync(loaded.device)
    seconds = time.perf_counter() - started
    stats = extractor.stats
    useful = 2 * block_params(loaded.model, max(layers)) * stats.tokens
    return {"layers": layers, "errors": len(errors), "extractor_seconds": stats.seconds,
            **throughput(len(columns["_index"]), stats.tokens, stats.padded_tokens, seconds, useful, ctx.peaks())}


def guard_hf(ctx: Context) -> dict[str, Any]:
    """The transformers guard (the chat model as its own guard, SmolLM2's label tokens) at the features path's
    default and tuned batching, its shared-prefix cache on (`HFGuard.prefix_cache`, the default) and off; same
    batches, same process; the largest score difference between the two."""
    from guardray.guard import HFGuard

    loaded = ctx.loaded()
    started = time.perf_counter()
    guard = HFGuard.create(loaded, GuardSpec(**GUARD_LABELS, max_length=ctx.sizes.guard_max_length))
    out: dict[str, Any] = {"create_seconds": time.perf_counter() - started,
                           "shared_prefix_tokens": len(guard.renderer.prefix)}
    encoded = [e for e in guard.renderer.encode_many(ctx.prompts()[: ctx.sizes.guard]) if isinstance(e, Encoded)]
    lengths = [len(e.ids) for e in encoded]
    out["guard_tokens"] = length_stats(lengths)
    for setting, extract in ctx.extract_settings().items():
        batches = length_batches(lengths, *forward_budget(extract, loaded.device))
        scores = {}
        for cached in (True, False):
            if ctx.over_budget():
                out[f"{setting}_prefix_cache_{'on' if cached else 'off'}"] = {"skipped": "budget"}
                continue
            guard.prefix_cache = cached
            seconds, scores[cached] = timed_scores(guard, encoded, batches, loaded.device)
            out[f"{setting}_prefix_cache_{'on' if cached else 'off'}"] = {
                "forwards": len(batches), "seconds": seconds, "rows_per_s": len(encoded) / seconds,
                "guard_tokens_per_s": sum(lengths) / seconds}
        if len(scores) == 2:
            out[f"{setting}_max_abs_score_diff"] = float(np.abs(scores[True] - scores[False]).max())
            out[f"{setting}_cache_speedup"] = (out[f"{setting}_prefix_cache_off"]["seconds"]
                                               / out[f"{setting}_prefix_cache_on"]["seconds"])
    guard.prefix_cache = True
    return out


def timed_scores(guard: Any, encoded: list[Encoded], batches: list[list[int]], device: torch.device
                 ) -> tuple[float, np.ndarray]:
    guard.score(encoded[:2])  # warm-up, and the prefix's cache when it is on
    scores = np.empty(len(encoded))
    sync(device)
    started = time.perf_counter()
    for batch in batches:
        scores[batch] = guard.score([encoded[i] for i in batch])[GUARD_SCORE]
    sync(device)
    return time.perf_counter() - started, scores


def guard_vllm(ctx: Context) -> dict[str, Any]:
    """The vLLM guard with dummy (random) weights of the same config, beside the resident HF model: batches of
    16 (as the features path feeds it today) and all prompts in one call (as issue 26 asks)."""
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm is not importable in this environment"}
    if ctx.smoke:
        return {"skipped": "smoke: the vLLM guard is timed on a GPU only (a CPU engine takes ~30 s to start)"}
    from guardray.guard.vllm import VLLMGuard

    tokenizer = ctx.loaded().tokenizer
    directory = tempfile.mkdtemp(prefix="gpu-check-llama3-8b-")
    llama3_8b_config().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    free, total = torch.cuda.mem_get_info()
    utilization = round(max(0.05, (free - 4 * 2**30) / total), 3)  # vLLM refuses more than is free
    spec = GuardSpec(**GUARD_LABELS, max_length=ctx.sizes.guard_max_length).model_copy(update={"vllm_engine_args": {
        "load_format": "dummy", "gpu_memory_utilization": utilization}})
    started = time.perf_counter()
    guard = VLLMGuard.create(ModelSpec(id=directory, dtype="bfloat16"), spec, tokenizer)
    out: dict[str, Any] = {"create_seconds": time.perf_counter() - started, "gpu_memory_utilization": utilization}
    encoded = [e for e in guard.renderer.encode_many(ctx.prompts()[: ctx.sizes.guard]) if isinstance(e, Encoded)]
    tokens = sum(len(e.ids) for e in encoded)
    for label, size in (("batches_of_16", 16), ("all_at_once", len(encoded))):
        if ctx.over_budget():
            out[label] = {"skipped": "budget"}
            continue
        batches = [list(range(i, min(i + size, len(encoded)))) for i in range(0, len(encoded), size)]
        seconds, _ = timed_scores(guard, encoded, batches, torch.device("cuda"))
        out[label] = {"seconds": seconds, "rows_per_s": len(encoded) / seconds, "guard_tokens_per_s": tokens / seconds}
    return out
