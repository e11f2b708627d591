"""What a stage is: its name, the stages it reads, the part of the spec its result depends on, the format of its
output, and the function that computes it. The runner only orders and runs these (`guardray.runner`).

`run` names its function as "module:function" and is imported only when the stage runs, so planning a job (its
directories, `guardray status`) never imports torch, Ray or the stage's own code.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any, Callable

from guardray.jobspec import JobSpec
from guardray.storage import Location

StageFn = Callable[[JobSpec, dict[str, Location], Location], dict[str, Any]]


def _always(spec: JobSpec) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    name: str
    #: The stages it reads: a tuple, or a function of the spec when that depends on what is enabled.
    inputs: tuple[str, ...] | Callable[[JobSpec], tuple[str, ...]]
    #: The spec's parts its result depends on (with its inputs' hashes and `format`, its directory's hash).
    key: Callable[[JobSpec], dict[str, Any]]
    #: "module:function" computing it: `(spec, {input stage: directory}, own directory) -> summary`.
    run: str
    #: Bumped when the stage's output format changes, so directories of the old format are not reused.
    format: int
    needs_ray: bool = False
    #: A resumable stage keeps what an interrupted run left in its directory; others start over.
    resumable: bool = False
    #: Runs in a Ray task (off the driver process) whenever this job uses Ray anyway, so the driver of a
    #: cluster job never holds the prompts; inline when the job runs only such stages (no Ray start-up).
    offload: bool = False
    #: Whether the job has this stage at all; a disabled stage is planned, run and listed nowhere.
    enabled: Callable[[JobSpec], bool] = _always

    def inputs_for(self, spec: JobSpec) -> tuple[str, ...]:
        return self.inputs(spec) if callable(self.inputs) else self.inputs

    def function(self) -> StageFn:
        module, name = self.run.split(":")
        return getattr(import_module(module), name)


def feedback_key(spec: JobSpec, reads_feedback: bool) -> dict[str, Any]:
    """The feedback thresholds, in the key of a stage whose labels they define (and only then: tuning them does
    not invalidate a job that never reads a feedback label)."""
    return {"feedback": spec.feedback.cache_payload()} if reads_feedback else {}
