"""Guard scoring with and without the shared-prefix key/value cache (`HFGuard.prefix_cache`).

Same prompts (the realistic mix of `extract_throughput.py`), same length-sorted batches, same process: prints
the time of each, the ratio, and the largest difference between their scores.

    python benchmarks/guard_prefix_cache.py [--n 48] [--batch-size 8]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.extract_throughput import realistic_prompts
from guardray.encoding import length_batches
from guardray.guard import HFGuard
from guardray.models import load_model
from guardray.jobspec import GuardSpec, ModelSpec


def timed_scores(guard: HFGuard, encoded: list, batch_size: int) -> tuple[float, np.ndarray]:
    guard.score(encoded[:2])  # warm-up (and the prefix cache, when on)
    scores = np.empty(len(encoded))
    started = time.perf_counter()
    for batch in length_batches([len(e.ids) for e in encoded], batch_size, None):
        scores[batch] = guard.score([encoded[i] for i in batch])["guard_score"]
    return time.perf_counter() - started, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    loaded = load_model(ModelSpec(id="smollm2-135m-instruct"))
    spec = GuardSpec(safe_token=" safe", unsafe_token=" unsafe")
    cached, full = HFGuard.create(loaded, spec), HFGuard.create(loaded, spec)
    full.prefix_cache = False
    encoded = [cached.renderer.encode(p) for p in realistic_prompts(args.n)]
    tokens = sum(len(e.ids) for e in encoded)
    print(f"{len(encoded)} prompts, {tokens} guard tokens ({tokens / len(encoded):.0f} per prompt), "
          f"shared prefix {len(cached.renderer.prefix)} tokens")
    full_s, full_scores = timed_scores(full, encoded, args.batch_size)
    cached_s, cached_scores = timed_scores(cached, encoded, args.batch_size)
    print(f"full sequence : {full_s:6.1f} s")
    print(f"prefix cached : {cached_s:6.1f} s")
    print(f"speed-up      : {full_s / cached_s:.2f}x; max |score difference| {np.abs(full_scores - cached_scores).max():.2e}")


if __name__ == "__main__":
    main()
