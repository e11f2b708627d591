"""`gpu_check.py`'s correctness sections: do the activations guardray stores equal what the model computes?

- hooks against output_hidden_states: `capture`'s pooled block outputs against transformers' `hidden_states[L+1]`
  pooled the same way, every block but the last (whose `hidden_states` entry has the final norm applied);
- right padding (features, the guard) against left padding (serving) against each row alone (no padding): the
  train/serve skew of issue 26, in the model's dtype (bf16 on the GPU);
- a NaN/inf scan and the largest magnitude against float16's range (the parts store float16: 65504 at most);
- packed (`Batch.pack`: one unpadded sequence with per-row positions) against right padding;
- the OOM drill: the features path with an allocation failure injected above a token count.

Random weights: magnitudes are not those of a trained Llama (whose massive activations reach the thousands in a
few dimensions), so the float16 figure here checks the scan, not the real model's range.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch

from benchmarks.gpu_check_paths import POOLINGS
from benchmarks.gpu_check_setup import Context
from guardray.activations import Batch, capture, pool
from guardray.models import LoadedModel
from guardray.rendering import Encoded
from guardray.jobspec import ExtractSpec

FLOAT16_MAX = 65504.0
#: Rows per batch in the padding checks: prompts of mixed lengths, so most rows are padded.
CHECK_BATCH = 8
Pooled = dict[tuple[str, int], torch.Tensor]


def correctness(ctx: Context) -> dict[str, Any]:
    loaded = ctx.loaded()
    rows = mixed_lengths(ctx.encoded(), ctx.sizes.correctness)
    layers = list(range(loaded.num_layers))
    diffs: dict[str, dict[int, list[float]]] = {k: {} for k in ("hooks_vs_hidden_states", "right_vs_alone",
                                                                "left_vs_alone", "right_vs_left",
                                                                "packed_vs_right")}
    cosines: dict[str, list[float]] = {"right_vs_left": [], "right_vs_alone": [], "left_vs_alone": [],
                                       "packed_vs_right": []}
    scan = {"non_finite": 0, "values": 0}
    largest = {layer: 0.0 for layer in layers}
    for start in range(0, len(rows), CHECK_BATCH):
        chunk = rows[start:start + CHECK_BATCH]
        right, left = (batch_of(loaded, chunk, left=side) for side in (False, True))
        packed = Batch.pack(chunk, loaded.tokenizer.pad_token_id, loaded.device)
        pooled = {"right": capture(loaded.model, right, layers, POOLINGS),
                  "left": capture(loaded.model, left, layers, POOLINGS), "alone": alone(loaded, chunk, layers),
                  "packed": capture(loaded.model, packed, layers, POOLINGS)}
        record(diffs["hooks_vs_hidden_states"], pooled["right"], hidden_pooled(loaded, right, layers[:-1]))
        for first, second in (("right", "alone"), ("left", "alone"), ("right", "left"), ("packed", "right")):
            record(diffs[f"{first}_vs_{second}"], pooled[first], pooled[second])
            cosines[f"{first}_vs_{second}"].append(min_cosine(pooled[first], pooled[second]))
        for values in (v for variant in pooled.values() for v in variant.values()):
            scan["non_finite"] += int((~torch.isfinite(values)).sum())
            scan["values"] += values.numel()
        for (_, layer), values in pooled["right"].items():
            largest[layer] = max(largest[layer], float(values.abs().max()))
    summary = {name: summarise(per_layer) for name, per_layer in diffs.items()}
    for name, values in cosines.items():
        summary[name]["min_cosine"] = min(values)
    return {"rows": len(rows), "dtype": str(loaded.model.dtype).removeprefix("torch."), "poolings": POOLINGS,
            **summary, "hooks_vs_hidden_states_note": "every block but the last (hidden_states[-1] is normed)",
            "packed_attention": loaded.model.config._attn_implementation,
            "nan_scan": scan, "float16_range": {"max_abs_per_layer": largest, "float16_max": FLOAT16_MAX,
                                                "layers_over": [layer for layer, v in largest.items() if v > FLOAT16_MAX]}}


def mixed_lengths(encoded: Sequence[Encoded], n: int) -> list[Encoded]:
    """`n` rows spread over the length range (evenly spaced in length order), then interleaved short with long,
    so that every batch of the checks pads most of its rows."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    picked = [encoded[order[round(k * (len(order) - 1) / max(n - 1, 1))]] for k in range(min(n, len(order)))]
    half = (len(picked) + 1) // 2
    return [row for pair in zip(picked[:half], picked[half:][::-1] + [None]) for row in pair if row is not None]


def batch_of(loaded: LoadedModel, rows: Sequence[Encoded], left: bool) -> Batch:
    return Batch.build(rows, loaded.tokenizer.pad_token_id, loaded.device, left=left)


def alone(loaded: LoadedModel, rows: Sequence[Encoded], layers: list[int]) -> Pooled:
    """Each row in a batch of its own (no padding at all): the reference both paddings are compared with."""
    singles = [capture(loaded.model, batch_of(loaded, [row], left=False), layers, POOLINGS) for row in rows]
    return {key: torch.cat([single[key] for single in singles]) for key in singles[0]}


@torch.inference_mode()
def hidden_pooled(loaded: LoadedModel, batch: Batch, layers: list[int]) -> Pooled:
    """transformers' own hidden states (`hidden_states[L + 1]` is block L's output), pooled as capture pools."""
    hidden = loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True,
                          logits_to_keep=1).hidden_states
    return {(p, layer): pool(hidden[layer + 1], batch, p) for layer in layers for p in POOLINGS}


def record(per_layer: dict[int, list[float]], ours: Pooled, reference: Pooled) -> None:
    """Per layer: the largest |difference| and the mean |reference| (for a relative figure), both poolings."""
    for key, values in reference.items():
        layer = key[1]
        diff, scale = float((ours[key] - values).abs().max()), float(values.abs().mean())
        best = per_layer.setdefault(layer, [0.0, 0.0])
        per_layer[layer] = [max(best[0], diff), max(best[1], scale)]


def min_cosine(first: Pooled, second: Pooled) -> float:
    """The smallest cosine similarity between the two variants' vectors of one row (a probe reads directions)."""
    return min(float(torch.nn.functional.cosine_similarity(first[k], second[k], dim=-1).min()) for k in first)


def summarise(per_layer: dict[int, list[float]]) -> dict[str, Any]:
    diffs = {layer: d for layer, (d, _) in sorted(per_layer.items())}
    relative = {layer: d / s if s else None for layer, (d, s) in sorted(per_layer.items())}
    return {"max_abs_diff": max(diffs.values()), "max_abs_diff_per_layer": diffs,
            "max_relative_diff": max((r for r in relative.values() if r is not None), default=None),
            "relative_to": "the mean |value| of the reference at that layer"}


def oom_drill(ctx: Context) -> dict[str, Any]:
    """The features path (`FeatureExtractor.process`, whose batches go through `guardray.isolation.run_isolating`:
    an out-of-memory batch is split in halves) with an allocation failure injected in every forward over a token
    limit: the rows longer than the limit cannot fit alone and must become error rows, no other row may, and no
    device failure may be raised."""
    return {"splitter": "guardray.isolation.run_isolating", "classification": classify_failures(),
            "drill": drill(ctx)}


def classify_failures() -> dict[str, str]:
    """What the shared retry logic makes of each allocation failure's message: a row error, or a device failure
    (the actor is restarted and the shard retried)."""
    from guardray.isolation import DeviceFailure, raise_device_failure

    messages = {"torch.OutOfMemoryError": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                "CUBLAS_STATUS_ALLOC_FAILED": RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling "
                                                           "`cublasCreate(handle)`")}
    out = {}
    for name, error in messages.items():
        try:
            raise_device_failure(error)
            out[name] = "out of memory (the batch is split in halves, down to one row)"
        except DeviceFailure:
            out[name] = "device failure (the actor restarts; the shard is retried)"
    return out


def drill(ctx: Context) -> dict[str, Any]:
    from guardray.features import FeatureExtractor

    loaded = ctx.loaded()
    prompts = ctx.prompts()[: ctx.sizes.drill]
    lengths = [len(e.ids) for e in ctx.renderer().encode_many(prompts) if isinstance(e, Encoded)]
    limit = int(np.percentile(lengths, 90)) - 1  # the longest tenth (at least one row) cannot fit even alone
    counts = {"forwards": 0, "refused": 0}

    def allocate(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        counts["forwards"] += 1
        if kwargs["input_ids"].numel() > limit:
            counts["refused"] += 1
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by gpu_check): "
                                         f"{kwargs['input_ids'].numel()} tokens > {limit}")

    extract = ExtractSpec(batch_size=64)
    extractor = FeatureExtractor(loaded, ctx.renderer(), [loaded.num_layers - 1], ("last",), extract)
    before = torch.cuda.memory_allocated() if loaded.device.type == "cuda" else 0
    handle = loaded.model.register_forward_pre_hook(allocate, with_kwargs=True)
    started = time.perf_counter()
    try:
        _, errors = extractor.process(prompts)
        raised = None
    except Exception as e:  # noqa: BLE001 - a device failure here is the finding
        errors, raised = {}, f"{type(e).__name__}: {e}"[:300]
    finally:
        handle.remove()
    expected = sum(n > limit for n in lengths)
    out = {"rows": len(prompts), "limit_tokens": limit, "batch_size": extract.batch_size,
           "rows_too_long_alone": expected, "error_rows": len(errors), "raised": raised,
           "neighbours_lost": len(errors) - expected if raised is None else None,
           "forwards": counts["forwards"], "refused_forwards": counts["refused"],
           "seconds": time.perf_counter() - started}
    if loaded.device.type == "cuda":
        out["gpu_gib_left_allocated"] = (torch.cuda.memory_allocated() - before) / 2**30
    return out
