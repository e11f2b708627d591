"""Seconds per row of the guard's per-category pass (`HFGuard.category_logprobs`), prompt and response judge.

SmolLM2-135M-Instruct in fp32 on CPU, the 15 codes of jobs/local-conversations.yaml (S1..S14 + a custom S15),
realistic prompts (`extract_throughput.py`) in length-sorted batches (`length_batches`, as the guard stage
batches). The verdict pass runs first, untimed, with its cache kept; only the category pass that continues
from it is timed, as `HFGuard.score` calls it. `--save` writes the log-probabilities; `--compare` a file saved
by another version of the code prints the largest difference (run it with PYTHONPATH at an older checkout to
time that code: `--no-packing` needs `HFGuard.category_packing`).

On 2 busy cores (another job running), 32 rows a judge in batches of 16, fp32: the per-row pass of a5cd572
0.73-0.84 s per row on 1 thread, 0.51-0.59 on 2; the packed batched pass 0.10-0.12 and 0.06-0.07; the expanded
batched pass (`--no-packing`, 1 thread) 0.92-1.03, slower than per row on a CPU (its expanded cache is memory
bound). Log-probabilities within 4.2e-5 of the per-row pass (which differs from itself by 3.7e-5 between 1
and 2 threads).

    python benchmarks/guard_category_pass.py [--n 32] [--batch-size 16] [--threads 1] [--no-packing]
        [--save a.npz] [--compare b.npz]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.extract_throughput import realistic_prompts
from guardray.encoding import length_batches
from guardray.guard import HFGuard
from guardray.models import load_model
from guardray.jobspec import CustomCategory, GuardSpec, ModelSpec

POLITICS = CustomCategory(code="S15", name="Political persuasion",
                          description="Messages that argue for or against a party, candidate, referendum or policy.")


def timed_logprobs(guard: HFGuard, encoded: list, batch_size: int) -> tuple[float, np.ndarray]:
    guard.score(encoded[:2])  # warm-up and the prefix cache
    out = np.empty((len(encoded), len(guard.categories.remainders)))
    elapsed = 0.0
    with torch.inference_mode():
        for batch in length_batches([len(e.ids) for e in encoded], batch_size, None):
            rows = [encoded[i] for i in batch]
            _, cache = guard._verdict(rows, keep_cache=True)
            started = time.perf_counter()
            out[batch] = guard.category_logprobs(rows, cache=cache)
            elapsed += time.perf_counter() - started
    return elapsed, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--no-packing", action="store_true", help="the expanded-cache path (category_packing=False)")
    parser.add_argument("--save")
    parser.add_argument("--compare")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(ModelSpec(id="smollm2-135m-instruct", dtype="float32", device="cpu", max_length=512))
    spec = GuardSpec(safe_token=" safe", unsafe_token=" unsafe", max_length=512, categories=True,
                     custom_categories=[POLITICS])
    prompts = realistic_prompts(2 * args.n)
    # responses: another prompt's text, so their lengths vary as much as the prompts'
    inputs = {"prompt": prompts[: args.n], "response": list(zip(prompts[: args.n], prompts[args.n:]))}
    saved = {}
    for judge, texts in inputs.items():
        guard = HFGuard.create(loaded, spec, judge)
        if args.no_packing:
            guard.category_packing = False
        encoded = guard.renderer.encode_many(texts)
        lengths = [len(e.ids) for e in encoded]
        seconds, logprobs = timed_logprobs(guard, encoded, args.batch_size)
        saved[judge] = logprobs
        print(f"{judge:8s}: {len(encoded)} rows, {min(lengths)}..{max(lengths)} tokens (mean {np.mean(lengths):.0f}), "
              f"{len(guard.categories.remainders)} continuations, category pass {seconds:6.1f} s = "
              f"{seconds / len(encoded):.3f} s per row (batches of {args.batch_size}, {torch.get_num_threads()} threads)")
    if args.save:
        np.savez(args.save, **saved)
    if args.compare:
        reference = np.load(args.compare)
        for judge, logprobs in saved.items():
            print(f"{judge:8s}: max |log-prob difference| vs {args.compare}: "
                  f"{np.abs(logprobs - reference[judge]).max():.2e}")


if __name__ == "__main__":
    main()
