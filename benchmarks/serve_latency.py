"""Latency of `guardray serve`: generation alone, with the probe in its prefill, and behind a separate guard-model call.

One server (Ray Serve on 127.0.0.1, the artifact of a finished run, e.g. `make run`'s), one process, the same
fixed prompts (the run's held-out split, untruncated), greedy decoding of `--max-tokens` new tokens. Each
request names its guard mode, so the three paths share the model, the batching and the machine:
  (a) none   generation with no guard (the baseline)
  (b) probe  generation with the probe scored in its prefill (what `guardray serve` runs)
  (c) model  the guard model's LlamaGuard-style scoring of the prompt (as the features stage runs it), then
             generation
  (a2) none  with `--control`: (a) again, an A/A control whose difference from (a) is the run's noise floor
Requests run in rounds that rotate the order of the modes, so drift in the machine's speed hits all alike.
Prints p50/p95 latency and throughput per mode and concurrency, each mode's p50 overhead over (a), and the
failed requests.

    python benchmarks/serve_latency.py runs/local-smoke [--requests 200] [--concurrency 1 8] [--max-tokens 16]
                                       [--control]
"""
from __future__ import annotations

import argparse
import json
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads

MODES = {"a": "none", "b": "probe", "c": "model"}


def holdout_prompts(run: Path, n: int) -> list[str]:
    """The run's test-split prompts that its features stage did not truncate (a server refuses those)."""
    stages = json.loads((run / "latest.json").read_text())["stages"]
    dataset = pads.dataset(Path(stages["dataset"]) / "dataset.parquet").to_table(columns=["id", "prompt", "split"])
    parts = pads.dataset(Path(stages["features"]) / "parts").to_table(columns=["id", "truncated"])
    whole = {i for i, t in zip(parts.column("id").to_pylist(), parts.column("truncated").to_pylist()) if not t}
    prompts = [p for i, p, s in zip(*(dataset.column(c).to_pylist() for c in ("id", "prompt", "split")))
               if s == "test" and i in whole]
    return [prompts[k % len(prompts)] for k in range(n)]


def request(url: str, prompt: str, mode: str, max_tokens: int) -> tuple[float, bool]:
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "guard": mode, "policy": "flag"}).encode()
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, {"Content-Type": "application/json"}),
                                    timeout=600) as response:
            ok = response.status == 200 and "choices" in json.loads(response.read())
    except OSError:
        ok = False
    return time.perf_counter() - started, ok


def measure(url: str, prompts: list[str], concurrency: int, max_tokens: int, rounds: int,
            modes: dict[str, str] = MODES) -> dict[str, dict]:
    """Per mode: latencies, failures and throughput over the same prompts, in rotating rounds."""
    latencies = {m: [] for m in modes}
    failed, busy = {m: 0 for m in modes}, {m: 0.0 for m in modes}
    chunks = np.array_split(np.arange(len(prompts)), rounds)
    with ThreadPoolExecutor(concurrency) as pool:
        for number, chunk in enumerate(chunks):
            order = list(modes)[number % len(modes):] + list(modes)[:number % len(modes)]
            for mode in order:
                started = time.perf_counter()
                results = list(pool.map(lambda i: request(url, prompts[i], modes[mode], max_tokens), chunk))
                busy[mode] += time.perf_counter() - started
                latencies[mode] += [seconds for seconds, _ in results]
                failed[mode] += sum(not ok for _, ok in results)
    return {m: {"p50_ms": 1e3 * float(np.percentile(latencies[m], 50)),
                "p95_ms": 1e3 * float(np.percentile(latencies[m], 95)),
                "req_per_s": len(latencies[m]) / busy[m], "failed": failed[m], "n": len(latencies[m])}
            for m in modes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a finished job's output directory (with latest.json)")
    parser.add_argument("--requests", type=int, default=200, help="per mode and concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--control", action="store_true", help="also (a2): (a) again, the A/A noise floor")
    args = parser.parse_args()
    modes = {**MODES, "a2": "none"} if args.control else MODES

    from ray import serve

    from guardray.serve.api import ServeSettings
    from guardray.serve.deploy import start

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServeSettings(artifact=str(args.run), guard="both", max_batch_size=8, max_tokens=args.max_tokens,
                             allow_request_overrides=True)  # each request names its mode
    url = start(settings, "127.0.0.1", port) + "/v1/chat/completions"
    health = json.loads(urllib.request.urlopen(url.replace("/v1/chat/completions", "/health")).read())
    prompts = holdout_prompts(args.run, args.requests)
    print(f"probe {health['probe']} on {health['model']}; {args.requests} requests per mode, "
          f"{args.max_tokens} new tokens, greedy")
    measure(url, prompts[:8], 2, args.max_tokens, 1)  # warm-up
    print("| concurrency | path | p50 ms | p95 ms | req/s | p50 overhead vs (a) | failed |")
    print("|---|---|---|---|---|---|---|")
    for concurrency in args.concurrency:
        figures = measure(url, prompts, concurrency, args.max_tokens, args.rounds, modes)
        base = figures["a"]["p50_ms"]
        for mode, f in figures.items():
            overhead = "baseline" if mode == "a" else f"{100 * (f['p50_ms'] / base - 1):+.1f}%"
            print(f"| {concurrency} | ({mode}) {modes[mode]} | {f['p50_ms']:.0f} | {f['p95_ms']:.0f} | "
                  f"{f['req_per_s']:.2f} | {overhead} | {f['failed']}/{f['n']} |", flush=True)
    serve.shutdown()


if __name__ == "__main__":
    main()
