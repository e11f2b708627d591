"""A sharded model stage on a Ray Data actor pool: the machinery the responses and features stages share.

A stage (`ShardedStage`) names itself, the spec section whose `ActorPoolSpec` says how it runs, and the actor
class (a Ray Data UDF) that turns one row-range shard of an input `dataset.parquet` into
`parts/part-<start>-<end>.parquet` (plus `errors/errors-<start>-<end>.parquet`). `run_sharded` then does the rest,
the same for every such stage:

- resume: leftover temporaries are removed, leftover parts are verified against the input in Ray tasks (those
  that do not hold exactly their range are deleted and redone), and only the missing ranges are planned;
- run: the missing shards stream through `map_batches(actor, ActorPoolStrategy)`; each actor reads its own rows
  and writes its own parts, so the driver only sees one small summary per shard (never prompts);
- error budget: past `max_error_fraction` failed prompts the stage stops and never commits;
- numerics: every part records what it was computed with (device, dtype, attention); a directory never mixes;
- finish: every part is verified again, the ranges must tile the input (every id lands exactly once in
  parts ∪ errors), and the errors are merged into `errors.parquet`.

`ShardActor` is the actor side of that contract (device check, numerics claim, atomic part writes, one summary
per shard); a stage subclasses it with `load` and `compute`.
"""
from __future__ import annotations

import abc

import json
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Hashable, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from guardray.errors import StageError
from guardray.isolation import CrashMemory, DeviceFailure
from guardray.columns import ERRORS_SCHEMA, ID, PARTS_DIR, REASON, SOURCE
from guardray.shards import (ERRORS_DIR, NUMERICS_KEY, PartCheck, RangeReader, Shard,
                             as_descriptors, dataset_rows, finished_shards, overlap_problem, part_schema, plan_shards,
                             tiling_problem, verify_all)
from guardray.jobspec import ActorPoolSpec, JobSpec, spec_for_worker
from guardray.storage import Location, file_mode_of, resolve

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ShardedStage:
    """What tells one sharded stage from another: its name (in messages and `--force`), the spec section it
    runs under (`extract`, `generate`) and its actor class, constructed with `ShardActor`'s arguments."""

    name: str
    section: str
    actor: type
    #: How the missing shards run: `run_actor_pool` over `actor` by default; a backend that brings its own
    #: batch layer (ray.data.llm for vLLM) passes a function with the same signature.
    run_pool: Callable[..., "RunTally"] | None = None

    def pool(self, spec: JobSpec) -> ActorPoolSpec:
        return getattr(spec, self.section)


# ------------------------------------------------------------------------------------------------ numerics
#: The numerics the first actor of a fresh run computed with; later actors (GPU nodes of another kind joining
#: an autoscaling pool) refuse to differ, instead of the mix being found only when the stage ends.
NUMERICS_FILE = "numerics.json"
#: Per shard, the rows in flight when an actor's device failed (`isolation.CrashMemory`); gone once it is done.
CRASHES_DIR = "crashes"


def claim_numerics(claim: Location, mine: str) -> str:
    """The stage's numerics: what an earlier actor claimed, or `mine`, claimed now. Best effort: two actors
    starting at the same instant may both claim; the end-of-stage check still refuses any mix."""
    if claim.exists():
        return claim.read_text()
    claim.write_text(mine)
    return mine


class NumericsMismatch(RuntimeError):
    """An actor would compute with other numerics (device, dtype, attention) than the parts already kept."""


def one_numerics(stage: str, checks: list[PartCheck], out: Location) -> str:
    """The numerics every part was computed with; parts computed differently must never sit side by side."""
    counts: dict[str, int] = {}
    for check in checks:
        counts[check.numerics] = counts.get(check.numerics, 0) + 1
    if "" in counts:  # not written by this code: nothing says what it was computed with
        raise StageError(f"{stage}: {counts['']} parts in {out.uri} have no numerics record "
                         f"({NUMERICS_KEY.decode()} metadata); rerun with --force {stage}")
    if len(counts) > 1:
        found = "; ".join(f"{n} parts with {numerics or 'unrecorded numerics'}" for numerics, n in counts.items())
        raise StageError(f"{stage}: the parts in {out.uri} were computed with different numerics ({found}); "
                         f"pin model.dtype and model.device (or the accelerator) and rerun with --force {stage}")
    return next(iter(counts))


# ------------------------------------------------------------------------------------------------- budget
@dataclass
class ErrorBudget:
    """At most `fraction` of all prompts may fail; past that the stage stops and never commits."""

    total: int
    fraction: float
    stage: str = "features"
    section: str = "extract"
    failed: int = 0
    reasons: list[str] = field(default_factory=list)

    @property
    def allowed(self) -> int:
        return int(self.total * self.fraction)

    def add(self, failed: int, reasons: list[str]) -> None:
        self.failed += failed
        self.reasons.extend(r for r in reasons if r and len(self.reasons) < 3)

    @property
    def exceeded(self) -> bool:
        return self.failed > self.allowed

    def message(self) -> str:
        first = "; ".join(dict.fromkeys(self.reasons)) or "-"
        return (f"{self.stage}: {self.failed} of {self.total} prompts failed, over the error budget of "
                f"{self.allowed} ({self.section}.max_error_fraction={self.fraction:g}); first reasons: {first}")


@dataclass
class RunTally:
    """What the driver keeps of a run: sums and a node histogram, never per-prompt data."""

    shards: int = 0
    processed: int = 0
    tokens: int = 0
    nodes: dict[str, int] = field(default_factory=dict)
    devices: dict[str, int] = field(default_factory=dict)

    def add(self, summary: dict[str, Any]) -> None:
        self.shards += 1
        self.processed += int(summary["rows"]) + int(summary["errors"])
        self.tokens += int(summary["tokens"])
        node = f"{summary['node_id']}" + (f" gpu:{summary['gpu_ids']}" if summary["gpu_ids"] else "")
        self.nodes[node] = self.nodes.get(node, 0) + 1
        self.devices[summary["device"]] = self.devices.get(summary["device"], 0) + 1


# ---------------------------------------------------------------------------------------------- the actor
def error_table(rows: pa.Table, errors: dict[int, str]) -> pa.Table:
    """The errors file of a shard: id, source and reason of every row index in `errors`."""
    failed = sorted(errors)
    take = pa.array(failed, pa.int64())
    return pa.table({ID: rows.column(ID).take(take), SOURCE: rows.column(SOURCE).take(take),
                     REASON: pa.array([errors[i] for i in failed], pa.string())}).cast(ERRORS_SCHEMA)


def write_shard(out: Location, shard: Shard, part: pa.Table, errors: pa.Table, numerics: str) -> None:
    """Errors first, part last (each atomic): an existing part file means the whole shard is done."""
    part = part.replace_schema_metadata({**(part.schema.metadata or {}), NUMERICS_KEY: numerics})
    out.join(ERRORS_DIR, shard.errors_name).write_table(errors)
    out.join(PARTS_DIR, shard.part_name).write_table(part)


class ShardActor(abc.ABC):
    """Ray Data UDF base: one actor per model replica; each call gets shard descriptors and writes their parts.

    Subclasses implement `load(spec)` (build the model; returns the numerics JSON it computes with) and
    `compute(rows) -> (part, errors, tokens)`. The actor reads its own rows from the input parquet (prompts
    never pass through the driver), checks that a GPU it was given is usable, and returns one small summary
    per shard (node, device, counts, timings).
    """

    stage = "sharded"

    def __init__(self, spec_json: dict[str, Any], dataset_uri: str, out_uri: str, threads: int,
                 expected_numerics: str | None = None):
        import ray
        import torch

        from guardray.accelerators import check_actor_device
        from guardray.telemetry import ActorMetrics

        torch.set_num_threads(max(1, threads))
        #: rows that broke the device on an earlier attempt at the current shard: `load` hands it to the batch loop
        self.crashes = CrashMemory()
        self.device = check_actor_device()  # `model.device: auto` then picks cuda exactly when this says so
        spec = spec_for_worker(spec_json)
        self.numerics = self.load(spec)
        self.reader = RangeReader(resolve(dataset_uri))
        self.out = resolve(out_uri, file_mode_of(spec))  # parts and errors get the job's file mode
        self.node_id = ray.get_runtime_context().get_node_id()
        if expected_numerics is None:  # a fresh run: the first actor's numerics become the stage's
            expected_numerics = claim_numerics(self.out.join(NUMERICS_FILE), self.numerics)
        if self.numerics != expected_numerics:
            raise NumericsMismatch(
                f"node {self.node_id[:12]} computes with {self.numerics}, but the parts already in {out_uri} were "
                f"(or are being) computed with {expected_numerics}: pin model.dtype and model.device (or the "
                f"accelerator, or the GPU type) to match them, or rerun with --force {self.stage}")
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        self.metrics = ActorMetrics(model=spec.model.id, stage=self.stage)

    @abc.abstractmethod
    def load(self, spec: JobSpec) -> str:
        """Build the model(s) this actor runs; return the numerics JSON they compute with."""

    @abc.abstractmethod
    def compute(self, rows: pa.Table) -> tuple[pa.Table, dict[int, str], int]:
        """One shard's rows → (the part, {row index: error reason}, tokens processed)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        shards = [Shard(int(s), int(e)) for s, e in zip(batch["start"], batch["end"])]
        summaries = pipelined(shards, self.reader.read, self.run_shard, self.finish_shard)
        return {key: [s[key] for s in summaries] for key in summaries[0]}

    def run_shard(self, shard: Shard, rows: pa.Table) -> "ComputedShard":
        memory = self.out.join(CRASHES_DIR, f"{shard.part_name}.json")
        self.crashes.load(memory)
        try:
            computed = self.compute_shard(shard, rows)
        except DeviceFailure as e:
            # The CUDA context is poisoned for every later batch: die, so Ray restarts the actor (a fresh
            # context) and retries this shard, instead of recording every remaining prompt as an error. The rows
            # in flight are remembered, so a row that breaks the device becomes an error row, not a restart loop.
            log.error("shard %s: device failure on rows %s, restarting the actor: %s", shard.part_name,
                      self.crashes.running, e)
            try:
                self.crashes.save(memory, str(e))
            except Exception as lost:  # noqa: BLE001 - the restart matters more than the memory of the rows
                log.error("shard %s: could not record the rows in flight: %s", shard.part_name, lost)
            os._exit(1)
        return replace(computed, crash_memory=memory if self.crashes.suspects or self.crashes.alone else None)

    def compute_shard(self, shard: Shard, rows: pa.Table) -> "ComputedShard":
        started = time.perf_counter()
        part, errors, tokens = self.compute(rows)
        return ComputedShard(shard, part, error_table(rows, errors), tokens, time.perf_counter() - started,
                             errors[min(errors)] if errors else "")

    def finish_shard(self, computed: "ComputedShard") -> dict[str, Any]:
        """Write the shard's part (on the I/O thread, while the next shard computes) and summarise it."""
        started = time.perf_counter()
        write_shard(self.out, computed.shard, computed.part, computed.errors, self.numerics)
        if computed.crash_memory is not None:  # the rows that broke the device are accounted for now
            computed.crash_memory.delete_file()
        shard, seconds = computed.shard, computed.seconds + time.perf_counter() - started
        self.metrics.record(shard.rows, computed.tokens, seconds)
        return {"start": shard.start, "end": shard.end, "rows": computed.part.num_rows,
                "errors": computed.errors.num_rows, "tokens": computed.tokens, "seconds": seconds,
                "node_id": self.node_id, "device": self.device, "gpu_ids": ",".join(self.gpu_ids),
                "first_error": computed.first_error}


@dataclass(frozen=True)
class ComputedShard:
    """A shard's output before it is written."""

    shard: Shard
    part: pa.Table
    errors: pa.Table
    tokens: int
    seconds: float
    first_error: str
    crash_memory: Location | None = None


K = TypeVar("K", bound=Hashable)
R = TypeVar("R")
C = TypeVar("C")
S = TypeVar("S")


def pipelined(items: list[K], read: Callable[[K], R], compute: Callable[[K, R], C],
              finish: Callable[[C], S]) -> list[S]:
    """`finish(compute(item, read(item)))` for each item, with the reads running one item ahead and the finishes
    (writes, uploads) one behind on a single I/O thread, so the model (the caller's thread) waits for neither.
    Every finish is done when this returns, and the first error of any step is raised here."""
    from concurrent.futures import ThreadPoolExecutor

    results: list[S] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-io") as io:
        reading = io.submit(read, items[0]) if items else None
        finishing = None
        for position, item in enumerate(items):
            data = reading.result()
            if position + 1 < len(items):
                reading = io.submit(read, items[position + 1])
            computed = compute(item, data)
            if finishing is not None:
                results.append(finishing.result())
            finishing = io.submit(finish, computed)
        if finishing is not None:
            results.append(finishing.result())
    return results


# ---------------------------------------------------------------------------------------------- the stage
#: Shards an actor call takes: on a GPU two, so one shard's part is written (and the next one's rows read) while
#: the other computes (`pipelined`); on a CPU one, whose cores the write would only take from the model.
SHARDS_PER_CALL = {"gpu": 2, "cpu": 1}


def run_sharded(stage: ShardedStage, spec: JobSpec, dataset: Location, out: Location) -> dict[str, Any]:
    """Verify what an earlier run left, run the missing row ranges of `dataset`, check exactly-once.

    The driver holds shard descriptors and per-shard summaries only; rows are read by the actors and the
    exactly-once check runs in Ray tasks (`shards.verify_all`).
    """
    pool = stage.pool(spec)
    total = dataset_rows(dataset)
    for directory in (PARTS_DIR, ERRORS_DIR):  # what writers killed mid-write left (never a finished file)
        out.join(directory).remove_temporaries()
    kept = keep_valid_parts(stage.name, dataset, out, finished_shards(out))
    done = [c.shard for c in kept]
    todo = plan_shards(done, total, pool.rows_per_shard)
    log.info("%s: %d prompts, %d rows already done in %d parts, %d shards to run",
             stage.name, total, sum(s.rows for s in done), len(done), len(todo))
    budget = ErrorBudget(total, pool.max_error_fraction, stage.name, stage.section)
    budget.add(sum(c.errors for c in kept), [r for c in kept for r in c.first_reasons])  # failures of earlier runs
    if budget.exceeded:
        raise StageError(budget.message())
    started = time.perf_counter()
    expected = one_numerics(stage.name, kept, out) if kept else None
    if not kept:  # nothing computed yet: the actors of this run claim afresh
        out.join(NUMERICS_FILE).delete_file()
    run_pool = stage.run_pool or run_actor_pool
    run = run_pool(stage, spec, dataset, out, todo, budget, len(done), expected) if todo else RunTally()
    wall = time.perf_counter() - started
    return finish(stage.name, dataset, out, total, run, len(done), wall, budget)


def keep_valid_parts(stage: str, dataset: Location, out: Location, found: list[Shard]) -> list[PartCheck]:
    """Parts an earlier run left that hold exactly their range; the others are deleted and redone."""
    if not found:
        return []
    valid = []
    for check in (check for checks, _ in verify_all(dataset, out, found) for check in checks):
        if check.problem is None:
            valid.append(check)
        else:
            log.warning("%s: redoing %s: %s", stage, check.shard.part_name, check.problem)
            out.join(PARTS_DIR, check.shard.part_name).delete_file()
    valid.sort(key=lambda c: c.shard)
    problem = overlap_problem([c.shard for c in valid])
    if problem:  # overlapping parts cannot come from this code; refuse to guess which one is right
        raise StageError(f"{stage}: the parts in {out.uri} overlap ({problem}); rerun with --force {stage}")
    return valid


def actor_resources(spec: ActorPoolSpec, accelerator: str) -> dict[str, float]:
    """What each actor asks Ray for. GPUs are requested even when none are up, so the autoscaler adds them."""
    if accelerator == "gpu":
        return {"num_gpus": spec.num_gpus_per_actor, "num_cpus": spec.num_cpus_per_actor}
    return {"num_cpus": spec.num_cpus_per_actor}


def pool_size(spec: ActorPoolSpec, accelerator: str, shards: int, section: str = "extract") -> tuple[int, int]:
    """(min, max) actors. 'auto' grows from 1 to `max_actors`, else to the GPUs the cluster has or declares."""
    if spec.actors != "auto":
        fixed = max(1, min(spec.actors, shards))
        return fixed, fixed
    from guardray.accelerators import gpu_capacity

    most = spec.max_actors or (int(gpu_capacity() / spec.num_gpus_per_actor) if accelerator == "gpu" else 1)
    if accelerator == "gpu" and not spec.max_actors and most < 2:
        log.warning("%s.actors: auto found at most one GPU to grow into (up or declared by the autoscaler): the "
                    "pool stays at 1 actor; set %s.max_actors", section, section)
    return 1, max(1, min(most, shards))


def run_actor_pool(stage: ShardedStage, spec: JobSpec, dataset: Location, out: Location, todo: list[Shard],
                   budget: ErrorBudget, done: int, expected_numerics: str | None) -> RunTally:
    """Stream the shards through the actor pool; stop as soon as the error budget is spent."""
    import ray

    from guardray.accelerators import resolve_accelerator

    pool = stage.pool(spec)
    accelerator = resolve_accelerator(pool.accelerator, stage.name)
    smallest, largest = pool_size(pool, accelerator, len(todo), stage.section)
    threads = int(pool.num_cpus_per_actor) if accelerator == "cpu" else 1
    ds = ray.data.from_items(as_descriptors(todo), override_num_blocks=len(todo))
    with warnings.catch_warnings():  # restarts/retries are only accepted as plain remote args (Ray 2.60)
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        ds = ds.map_batches(
            stage.actor,
            fn_constructor_kwargs={"spec_json": spec.model_dump(mode="json"), "dataset_uri": dataset.uri,
                                   "out_uri": out.uri, "threads": threads, "expected_numerics": expected_numerics},
            batch_size=SHARDS_PER_CALL[accelerator],
            compute=ray.data.ActorPoolStrategy(min_size=smallest, max_size=largest),
            max_restarts=pool.max_actor_restarts,
            max_task_retries=pool.max_task_retries,
            **actor_resources(pool, accelerator),
        )
    log.info("%s: %d-%d actors, each %s", stage.name, smallest, largest, actor_resources(pool, accelerator))
    return drain(stage.name, ds.iter_rows(), budget, todo, done)


def drain(stage: str, summaries: Any, budget: ErrorBudget, todo: list[Shard], done: int) -> RunTally:
    """Tally per-shard summaries as shards finish (`todo`: the shards this run computes, after `done` finished
    ones); show the stage's progress line and gauges; stop as soon as the error budget is spent."""
    from guardray.progress import ProgressLine
    from guardray.telemetry import StageProgress

    gauges = StageProgress(stage, total=done + len(todo), done=done)
    line = ProgressLine(stage, total=budget.total, done=budget.total - sum(s.rows for s in todo))
    tally = RunTally()
    try:
        for summary in summaries:  # one row per finished shard, as they finish
            tally.add(summary)
            budget.add(int(summary["errors"]), [summary["first_error"]])
            gauges.advance()
            line.advance(int(summary["rows"]) + int(summary["errors"]), int(summary["errors"]), int(summary["tokens"]))
            if budget.exceeded:  # stop spending GPU time on a job that cannot commit
                raise StageError(budget.message())
    except StageError:
        raise
    except Exception as e:  # noqa: BLE001 - an actor's one-line device error, not Ray's wrapped traceback
        # A failed actor constructor reaches the driver as Ray's ActorDiedError holding the remote traceback as
        # text (no exception object to walk), so the DeviceError's own line is found in that text.
        device_error = re.search(r"(?:DeviceError|NumericsMismatch|InputError): (.+)", str(e))
        if device_error:
            raise StageError(f"{stage}: {device_error.group(1).strip()}") from None
        raise
    finally:
        line.close()
        getattr(summaries, "close", lambda: None)()  # shut the executor (and its GPU actors) down now, not at GC
    return tally


def finish(stage: str, dataset: Location, out: Location, total: int, run: RunTally, skipped: int, wall: float,
           budget: ErrorBudget) -> dict[str, Any]:
    """Verify every part against the dataset (in Ray tasks), check the ranges tile it, merge the errors."""
    for directory in (PARTS_DIR, ERRORS_DIR):  # a killed actor's half-written temporary, now that all are done
        out.join(directory).remove_temporaries()
    checks: list[PartCheck] = []

    def merge_errors(f: Any) -> None:  # errors.parquet streamed: one verify batch's error rows at a time
        with pq.ParquetWriter(f, ERRORS_SCHEMA) as writer:
            for batch, errors in verify_all(dataset, out, finished_shards(out)):
                checks.extend(batch)
                writer.write_table(errors)

    out.join("errors.parquet").write_with(merge_errors)  # no _SUCCESS yet: harmless if a check below fails
    checks.sort(key=lambda c: c.shard)
    bad = [c for c in checks if c.problem]
    problem = tiling_problem([c.shard for c in checks], total)
    if bad or problem:
        detail = f"{bad[0].shard.part_name}: {bad[0].problem}" if bad else problem
        raise StageError(f"{stage}: exactly-once check failed: {len(bad)} bad parts; {detail}")
    numerics = one_numerics(stage, checks, out) if checks else ""
    rows, errors = sum(c.rows for c in checks), sum(c.errors for c in checks)
    budget.failed, budget.reasons = errors, [r for c in checks for r in c.first_reasons][:3]
    if budget.exceeded:
        raise StageError(budget.message())
    return {
        "rows": rows,
        "errors": errors,
        "processed_this_run": run.processed,
        "shards_skipped": skipped,
        "shards_run": run.shards,
        "tokens": run.tokens,
        "prompts_per_s": round(run.processed / wall, 2) if wall and run.processed else None,
        "tokens_per_s": round(run.tokens / wall, 1) if wall and run.tokens else None,
        "nodes": run.nodes,
        "devices": run.devices,
        "numerics": json.loads(numerics) if numerics else None,
        "columns": part_schema(out, checks[0].shard) if checks else [],
    }
