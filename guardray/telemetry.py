"""Telemetry: custom metrics exported through Ray's metrics agent (dashboard, Prometheus/Grafana), and the
peak RSS a task reports. Not the evaluation metrics of a score (ROC AUC and the like: `guardray.evaluate`).

Names are prefixed `guardray_`; tags say which model and which actor, so per-replica throughput is visible.
"""
from __future__ import annotations

import os


class ActorMetrics:
    """Counters of prompts and tokens and a tokens/s gauge for one feature actor."""

    def __init__(self, model: str, stage: str = "features"):
        from ray.util import metrics

        tag_keys = ("model", "actor", "stage")
        self.tags = {"model": model, "actor": f"{os.uname().nodename}:{os.getpid()}", "stage": stage}
        self.prompts = metrics.Counter("guardray_prompts", "Prompts processed", tag_keys=tag_keys)
        self.tokens = metrics.Counter("guardray_tokens", "Prompt tokens processed (chat model)", tag_keys=tag_keys)
        self.throughput = metrics.Gauge("guardray_tokens_per_second", "Tokens/s of the last shard", tag_keys=tag_keys)

    def record(self, prompts: int, tokens: int, seconds: float) -> None:
        self.prompts.inc(prompts, tags=self.tags)
        if tokens:
            self.tokens.inc(tokens, tags=self.tags)
        if seconds > 0:
            self.throughput.set(tokens / seconds, tags=self.tags)


class StageProgress:
    """Driver-side gauges of a stage's progress (work units done out of total), for a dashboard panel."""

    def __init__(self, stage: str, total: int, done: int = 0):
        from ray.util import metrics

        self.tags = {"stage": stage}
        self.done_units = done
        self.done = metrics.Gauge("guardray_stage_done", "Work units (shards) finished", tag_keys=("stage",))
        self.total = metrics.Gauge("guardray_stage_total", "Work units (shards) in the stage", tag_keys=("stage",))
        self.total.set(total, tags=self.tags)
        self.done.set(done, tags=self.tags)

    def advance(self, units: int = 1) -> None:
        self.done_units += units
        self.done.set(self.done_units, tags=self.tags)


def peak_rss_mb() -> int | None:
    """Peak RSS of this process's address space (Linux VmHWM; `ru_maxrss` would include a parent's RSS at fork)."""
    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
        return round(int(line.split()[1]) / 1024)
    except (OSError, StopIteration):
        return None
