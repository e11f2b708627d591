"""Streaming clients at once against `guardray serve`: streams batched into one `generate` call, against the
same server with batches of one (each stream waits for the ones before it: how the server streamed before).

One process, the artifact of a finished run (e.g. `make run`'s), its held-out prompts, greedy decoding of
`--max-tokens` new tokens, guard 'probe'. The two settings run one after the other, each in its own Serve
deployment on 127.0.0.1, with a warm-up each. Per stream: the time to its guard event (the probe's verdict,
sent before any token), to its first text, and to its end. Prints p50/p95 of each and streams per second.

    python benchmarks/serve_streaming.py runs/local-smoke [--streams 64] [--concurrency 8] [--max-tokens 16]
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
from serve_latency import holdout_prompts  # benchmarks/ is the script's directory, so on sys.path


def one_stream(url: str, prompt: str, max_tokens: int) -> dict[str, float] | None:
    """Seconds from the request to the guard event, the first text and the end; None if it failed."""
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "stream": True, "guard": "probe", "policy": "flag"}).encode()
    started = time.perf_counter()
    marks: dict[str, float] = {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, {"Content-Type": "application/json"}),
                                    timeout=600) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    marks["end"] = time.perf_counter() - started
                    break
                event = json.loads(line.removeprefix("data: "))
                if "error" in event:
                    return None
                if "guard" in event:
                    marks.setdefault("guard", time.perf_counter() - started)
                if event["choices"][0]["delta"].get("content"):
                    marks.setdefault("first_text", time.perf_counter() - started)
    except OSError:
        return None
    return marks if {"guard", "first_text", "end"} <= set(marks) else None


def measure(run: Path, prompts: list[str], batch_size: int, concurrency: int, max_tokens: int) -> dict[str, float]:
    from ray import serve

    from guardray.serve.api import ServeSettings
    from guardray.serve.deploy import start

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServeSettings(artifact=str(run), max_batch_size=batch_size, max_tokens=max_tokens)
    url = start(settings, "127.0.0.1", port) + "/v1/chat/completions"
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda p: one_stream(url, p, max_tokens), prompts[:concurrency]))  # warm-up
            started = time.perf_counter()
            results = list(pool.map(lambda p: one_stream(url, p, max_tokens), prompts))
            wall = time.perf_counter() - started
    finally:
        serve.shutdown()
    done = [r for r in results if r is not None]
    if not done:
        raise SystemExit(f"every one of {len(results)} streams failed (batches of {batch_size})")
    figures = {f"{mark}_{q}": 1e3 * float(np.percentile([r[mark] for r in done], q))
               for mark in ("guard", "first_text", "end") for q in (50, 95)}
    return {**figures, "streams_per_s": len(done) / wall, "failed": len(results) - len(done), "n": len(results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a finished job's output directory (with latest.json)")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    prompts = holdout_prompts(args.run, args.streams)
    print(f"{args.streams} streams, {args.concurrency} at a time, {args.max_tokens} new tokens, greedy, guard probe")
    print("| streams batched | guard event p50 / p95 ms | first text p50 / p95 ms | end p50 / p95 ms | streams/s | failed |")
    print("|---|---|---|---|---|---|")
    for batch_size in (1, args.concurrency):
        f = measure(args.run, prompts, batch_size, args.concurrency, args.max_tokens)
        label = "no (batches of 1: the baseline)" if batch_size == 1 else f"yes (up to {batch_size})"
        print(f"| {label} | {f['guard_50']:.0f} / {f['guard_95']:.0f} | {f['first_text_50']:.0f} / "
              f"{f['first_text_95']:.0f} | {f['end_50']:.0f} / {f['end_95']:.0f} | {f['streams_per_s']:.2f} | "
              f"{f['failed']}/{f['n']} |", flush=True)


if __name__ == "__main__":
    main()
