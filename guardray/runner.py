"""How a job runs: the stages (`guardray.stages`) in order, each skipped when its cached output is complete.

The runner knows no stage by name: it plans each enabled stage's directory (the hash of its key, format and
inputs' directories), runs the missing ones, in a Ray task when they are offloaded, and records what finished in
`<output>/latest.json`. Ray is started only when a stage that needs it actually runs.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from guardray.cache import LATEST_FILE, StageDir
from guardray.errors import InputError, ray_get
from guardray.jobspec import JobSpec
from guardray.stages import STAGES, Stage
from guardray.stages.base import StageFn
from guardray.storage import Location, output_location
from guardray.telemetry import peak_rss_mb

log = logging.getLogger(__name__)


def plan(spec: JobSpec) -> dict[str, StageDir]:
    """The directory of every stage for this spec (hashes chain through the inputs)."""
    output = output_location(spec)
    dirs: dict[str, StageDir] = {}
    for stage in active_stages(spec):
        upstream = {name: dirs[name].name for name in stage.inputs_for(spec)}
        dirs[stage.name] = StageDir.for_stage(output, stage.name, stage.key(spec), upstream, stage.format)
    return dirs


def active_stages(spec: JobSpec) -> list[Stage]:
    """The stages this job has, in pipeline order."""
    return [stage for stage in STAGES.values() if stage.enabled(spec)]


def _closure(spec: JobSpec, selected: list[str]) -> list[str]:
    """The selected stages plus everything they read, in pipeline order."""
    needed: set[str] = set()

    def visit(name: str) -> None:
        if name not in needed:
            needed.add(name)
            for dep in STAGES[name].inputs_for(spec):
                visit(dep)

    for name in selected:
        visit(name)
    return [name for name in STAGES if name in needed]


def run_job(spec: JobSpec, stages: list[str] | None = None, force: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the requested stages (default: all), skipping complete ones unless forced. Returns the summary."""
    active = [stage.name for stage in active_stages(spec)]
    for name in [*(stages or []), *force]:
        if name not in STAGES:
            raise InputError(f"unknown stage '{name}'; stages are: {', '.join(STAGES)}")
        if name not in active:
            raise InputError(f"stage '{name}' is disabled by this spec (its stages: {', '.join(active)})")
    dirs = plan(spec)
    order = _closure(spec, stages or active)
    to_run = [name for name in order if name in force or not dirs[name].done]
    results: dict[str, Any] = {}
    finished: dict[str, str] = {}  # the stages this run found or made complete, for latest.json
    try:
        _run_stages(spec, dirs, order, to_run, force, results, finished)
    except BaseException:  # a failed run records what it did finish, never narrowing what is recorded
        if finished:
            try:
                record_latest(output_location(spec), spec.name, finished)
            except Exception as e:  # noqa: BLE001 - the stage's own error is the one to report
                log.warning("could not update %s: %s", LATEST_FILE, e)
        raise
    record_latest(output_location(spec), spec.name, finished)
    return results


def _run_stages(spec: JobSpec, dirs: dict[str, StageDir], order: list[str], to_run: list[str],
                force: tuple[str, ...], results: dict[str, Any], finished: dict[str, str]) -> None:
    """Run (or reuse) each stage of `order`; `results` and `finished` ({stage: directory}) fill as they go."""
    uses_ray = any(STAGES[name].needs_ray for name in to_run)
    for name in order:
        stage, stage_dir = STAGES[name], dirs[name]
        if name not in to_run:
            log.info("stage %s: done, reusing %s", name, stage_dir.location.uri)
            results[name] = {"status": "cached", "dir": stage_dir.location.uri, **stage_dir.summary()}
            finished[name] = stage_dir.location.uri
            continue
        remote = stage.offload and uses_ray
        if stage.needs_ray or remote:
            from guardray.cluster import init_ray

            init_ray(spec.ray)
        log.info("stage %s: running into %s%s", name, stage_dir.location.uri, " (in a Ray task)" if remote else "")
        resume = stage.resumable and name not in force and stage_dir.state == "incomplete"
        stage_dir.begin(fresh=not resume)
        started = time.perf_counter()
        inputs = {dep: dirs[dep].location for dep in stage.inputs_for(spec)}
        if remote:
            summary = _run_remote(stage, spec, inputs, stage_dir.location)
        else:
            summary = stage.function()(spec, inputs, stage_dir.location)
        summary["wall_s"] = round(time.perf_counter() - started, 2)
        stage_dir.commit(summary)
        results[name] = {"status": "ran", "dir": stage_dir.location.uri, **summary}
        finished[name] = stage_dir.location.uri


def record_latest(output: Location, job: str, finished: dict[str, str]) -> None:
    """Merge `finished` ({stage: directory}) into `<output>/latest.json`: a run that ran only some stages (or
    failed) updates those and keeps the others' entries, so `report` and `serve` still find them."""
    latest = output.join(LATEST_FILE)
    stages: dict[str, str] = {}
    if latest.exists():
        try:
            stages = dict(latest.read_json().get("stages") or {})
        except (ValueError, AttributeError):
            log.warning("%s is not valid JSON; writing it anew", latest.uri)
    stages.update(finished)
    ordered = {name: stages[name] for name in [*STAGES, *stages] if name in stages}  # pipeline order
    latest.write_json({"job": job, "stages": ordered})


def _with_peak_rss(run: StageFn, spec: JobSpec, inputs: dict[str, Location], out: Location) -> dict[str, Any]:
    """Run a stage and add the worker's peak RSS to its summary (a worker may have run tasks before: an upper bound)."""
    summary = run(spec, inputs, out)
    summary["peak_rss_mb"] = peak_rss_mb()
    return summary


def uses_local_paths(spec: JobSpec) -> bool:
    """Whether the job reads or writes paths on the driver's own disk (output, file sources, HF mirrors)."""
    paths = [spec.output, *(getattr(s, "path", None) or getattr(s, "mirror", None) for s in spec.dataset.sources)]
    return any(p is not None and not p.startswith(("gs://", "hf://")) for p in paths)


def _run_remote(stage: Stage, spec: JobSpec, inputs: dict[str, Location], out: Location) -> dict[str, Any]:
    """Run a stage function in a Ray task; its one-line errors (bad input, failed stage) reach the CLI as such."""
    import ray

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # Local source paths or a local output directory mean files on the driver's node: run there. With
    # everything on gs:// (or packaged in the image) any node with a free CPU will do.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    options = {"scheduling_strategy": here} if uses_local_paths(spec) else {}
    task = ray.remote(num_cpus=1, max_retries=0, **options)(_with_peak_rss)
    return ray_get(task.remote(stage.function(), spec, inputs, out))


def stage_states(spec: JobSpec) -> list[tuple[str, str, str]]:
    """(stage, done|incomplete|missing, directory) for `guardray status`."""
    return [(name, d.state, d.location.uri) for name, d in plan(spec).items()]


def status_lines(spec: JobSpec) -> list[str]:
    """`guardray status`: one line per stage; an incomplete directory says what it holds (a failed run's
    directory with only spec.json is not a result, and the next run redoes it)."""
    lines = []
    for name, stage_dir in plan(spec).items():
        state, detail = stage_dir.state, stage_dir.detail
        lines.append(f"{name:10} {state + (f' ({detail})' if detail else ''):11} {stage_dir.location.uri}")
    return lines
