"""The spec's probe, feedback and evaluate sections, and `JobSpec`, the whole job.

Probe types and their parameters are names in guardray.probes' registry, a layer above the schema: they are
checked by `validate.validate_job`, not here.
"""
from __future__ import annotations

import os
import re
from typing import Any, ClassVar, Literal

from pydantic import Field, StrictBool, ValidationInfo, field_validator, model_validator

from guardray.jobspec.dataset import DatasetSpec
from guardray.jobspec.schema import (CHECKED_ON_DRIVER, ExtractSpec, GenerateSpec, GuardSpec, ModelSpec, RaySpec,
                                     Section, already_checked, device_class, paths_elsewhere)


#: Most hyper-parameter combinations one grid entry may expand to.
MAX_GRID_POINTS = 10_000


class ProbeGridEntry(Section):
    """One probe type with hyper-parameter lists that expand to a grid."""

    type: str = Field(description="Registered probe type, e.g. logistic_regression.")
    preprocessing: Literal["none", "standardize", "normalize"] = "standardize"
    params: dict[str, Any] = Field(default_factory=dict, description="Lists expand to a grid: {C: [0.01, 0.1]}.")

    @field_validator("params")
    @classmethod
    def _grid_size(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Every grid point is built at validate and fitted per fold: a grid past MAX_GRID_POINTS is a typo or
        an attack (five lists of 100 are 10^10 points), refused before anything is expanded."""
        points = 1
        for item in value.values():
            points *= len(item) if isinstance(item, list) else 1
            if points > MAX_GRID_POINTS:
                raise ValueError(f"the lists expand to more than {MAX_GRID_POINTS:,} grid points")
        return value


class CVSpec(Section):
    folds: int = Field(5, ge=2)
    seed: int = 0
    metric: Literal["roc_auc", "average_precision", "recall_at_fpr"] = "roc_auc"
    max_fpr: float = Field(0.01, gt=0, lt=1, description="FPR for the recall_at_fpr metric.")


class TorchProbeSpec(Section):
    """Logistic regression in torch, trained with Ray Train's TorchTrainer for very large feature sets."""

    enabled: StrictBool = False
    workers: int = Field(2, ge=1)
    epochs: int = Field(20, ge=1)
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(256, ge=1)
    use_gpu: StrictBool | Literal["auto"] = Field(
        "auto", description="'auto' = GPUs when the cluster has or declares GPU nodes (as extract.accelerator).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per training worker.")
    feature: str | None = Field(None, description="Feature column to train on (default: the best CV feature).")
    runtime_fields: ClassVar[frozenset[str]] = frozenset({"cpus_per_worker"})


class FeedbackSpec(Section):
    """Output-feedback labels, derived from the guard's scores (log-odds of unsafe; 0 is P(unsafe) = 0.5)."""

    response_threshold: float = Field(
        0.0, description="`response_unsafe` = guard_response_score > this: the response guard flags the response.")
    input_threshold: float = Field(
        0.0, description="The input guard passes a prompt when guard_score <= this; `slipped_through` = passed "
        "and response_unsafe.")


class ProbesSpec(Section):
    target: str = Field("harmful", description="Label column to predict (when `targets` is empty).")
    targets: tuple[str, ...] = Field(
        (), description="Several label columns, each with its own CV grid in the same Tune run: dataset labels "
        "(harmful, cat_<name>, extra_labels) or feedback labels (response_unsafe, slipped_through).")
    features: tuple[str, ...] = Field((), description="Feature columns (act_<pooling>_L<layer>); empty = all.")
    grid: tuple[ProbeGridEntry, ...] = Field(default_factory=lambda: (
        ProbeGridEntry(type="logistic_regression", params={"C": [0.01, 0.1, 1.0]}),))
    cv: CVSpec = CVSpec()
    max_concurrent_trials: int | None = Field(None, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0)
    torch_probe: TorchProbeSpec = TorchProbeSpec()
    runtime_fields: ClassVar[frozenset[str]] = frozenset({"max_concurrent_trials", "cpus_per_trial"})

    @property
    def all_targets(self) -> tuple[str, ...]:
        """The targets probed, in order: `targets`, or the single `target`."""
        return self.targets or (self.target,)

    @field_validator("targets")
    @classmethod
    def _unique_targets(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"repeated targets in {list(value)}")
        return value


# ---------------------------------------------------------------------------------------- evaluate
class EvaluateSpec(Section):
    probe_threshold: float = 0.0
    guard_threshold: float = 0.0
    recalls: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)
    fprs: tuple[float, ...] = (0.001, 0.01, 0.05)
    sweep: tuple[float, ...] = (-10, -5, -1, -0.5, 0, 0.5, 1, 5, 10)
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples for confidence intervals (0 = off).")
    bootstrap_max_rows: int = Field(
        100_000, ge=100, description="Bootstrap on a label-stratified sample of at most this many test rows "
        "(wider, conservative intervals on larger sets; keeps 2.5M-row reports to seconds).")
    seed: int = 0
    plots: StrictBool = True
    guard_for: dict[str, str] = Field(
        default_factory=dict, description="Target → the guard score column it is compared with (defaults: "
        "guard_score; cat_<name> → its mapped guard_cat_<code> when guard.categories is on; see README).")
    leave_one_source_out: StrictBool | tuple[str, ...] = Field(
        False, description="Per named source S (true: every source not held out), the probes stage also fits each "
        "target's headline probe configuration on the train rows of the other sources, and the report grades it "
        "on S's test rows at thresholds fixed on the other sources' test rows, beside the in-distribution probe "
        "and the guard. Costs one more fit and one more scoring pass per source and target.")

    def cache_payload(self) -> dict[str, Any]:
        """`leave_one_source_out` enters the key only when set: reports written before it keep their hashes."""
        payload = super().cache_payload()
        if not self.leave_one_source_out:
            payload.pop("leave_one_source_out")
        return payload


#: Labels derived from the guard's scores by `feedback`, rather than read from the dataset.
FEEDBACK_TARGETS = ("response_unsafe", "slipped_through")


# --------------------------------------------------------------------------------------------- job
class JobSpec(Section):
    """A whole guardray job."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    output: str = Field(description="Local directory or gs://bucket/prefix for all stage outputs.")
    file_mode: str = Field(
        "0600", description="Permission bits (octal, e.g. '0600', '0640', '0644') of the "
        "files written to a local `output`: prompts, responses and activations are private to the job's user by "
        "default. How the job runs, not what it computes: it enters no stage hash. Ignored for gs://.")
    ray: RaySpec = RaySpec()
    dataset: DatasetSpec
    model: ModelSpec = Field(default_factory=lambda: ModelSpec.model_validate({}, context=CHECKED_ON_DRIVER))
    generate: GenerateSpec = GenerateSpec()
    extract: ExtractSpec = ExtractSpec()
    guard: GuardSpec = GuardSpec()
    feedback: FeedbackSpec = FeedbackSpec()
    probes: ProbesSpec = ProbesSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    # How the job runs, not what it computes; the stage keys are built from the sections (guardray.stages), and
    # these top-level fields enter none of them.
    runtime_fields: ClassVar[frozenset[str]] = frozenset({"output", "ray", "file_mode"})

    @property
    def file_mode_bits(self) -> int:
        """`file_mode` as an int for os.chmod / os.open, e.g. '0600' → 0o600."""
        return int(self.file_mode, 8)

    @field_validator("file_mode", mode="before")
    @classmethod
    def _file_mode_quoted(cls, v: Any) -> Any:
        """YAML reads an unquoted 0600 as the number 384: ask for the quoted form rather than guess."""
        if isinstance(v, int) and not isinstance(v, bool):
            raise ValueError(f"got the number {v}: write the mode as a quoted octal string, e.g. '0600'")
        return v

    @field_validator("file_mode")
    @classmethod
    def _file_mode_octal(cls, v: str) -> str:
        """Permission bits only (no setuid/sticky); the job reads back what it wrote (resume, later stages), so
        the owner keeps read and write."""
        if not re.fullmatch(r"0?[0-7]{3}", v):
            raise ValueError(f"{v!r} is not a file mode: give octal permission digits such as '0600' or '0644'")
        if int(v, 8) & 0o600 != 0o600:
            raise ValueError(f"{v!r} takes read/write from the owner; the owner digit must be 6 or 7 (e.g. '0600')")
        return v

    @field_validator("output")
    @classmethod
    def _output_scheme(cls, v: str, info: ValidationInfo) -> str:
        if "://" in v and not v.startswith("gs://"):
            raise ValueError(f"unsupported scheme in {v!r}: use a local path or gs://bucket/prefix")
        if "://" not in v and not already_checked(info) and not paths_elsewhere(info) \
                and os.path.lexists(v) and not os.path.isdir(v):
            raise ValueError(f"{v!r} exists and is not a directory")  # a file, or a dangling/looping symlink
        return v.rstrip("/") if v not in ("/",) else v

    @model_validator(mode="after")
    def _responses_needed(self) -> "JobSpec":
        """Whatever reads responses needs the responses stage; feedback labels also need the guard to judge them."""
        feedback = [t for t in self.probes.all_targets if t in FEEDBACK_TARGETS]
        if self.has_responses:
            if feedback and not self.judges_responses:
                raise ValueError(f"probes.targets: {', '.join(feedback)} are read from the response guard's "
                                 "scores: set guard.enabled: true and guard.response: auto or true")
            return self
        wants = [("extract.on", "response" in self.extract.on), ("guard.response", self.guard.response is True)]
        wants += [(f"probes.targets: {t}", True) for t in feedback]
        needing = [field for field, wanted in wants if wanted]
        if needing:
            raise ValueError(f"{'; '.join(needing)} need responses: set generate.enabled: true, or read given "
                             "replies (a source's response_column, or a corpus with replies)")
        return self

    @model_validator(mode="after")
    def _conversations_need_a_template(self) -> "JobSpec":
        """A conversation (history, persona) has turns only a chat template can lay out: raw text cannot."""
        if not self.model.chat_template and self.dataset.conversational:
            names = ", ".join(s.source_name for s in self.dataset.sources if s.conversational)
            raise ValueError(f"model.chat_template: false renders raw text, but source {names} gives conversation "
                             "rows (messages, a persona): they need the model's chat template")
        return self

    @model_validator(mode="after")
    def _given_or_generated(self) -> "JobSpec":
        """A row has one reply to judge: a source that gives it and `generate.enabled` would make two."""
        if self.generate.enabled and self.dataset.gives_responses:
            names = ", ".join(s.source_name for s in self.dataset.sources if s.gives_responses)
            raise ValueError(f"generate.enabled: source {names} gives the replies to judge (response_column or a "
                             "corpus with replies); drop the `generate:` section or that source")
        return self

    @model_validator(mode="after")
    def _sources_to_leave_out(self) -> "JobSpec":
        """`evaluate.leave_one_source_out` names sources that are trained on, and leaves at least one other."""
        value = self.evaluate.leave_one_source_out
        names = [s.source_name for s in self.dataset.sources]
        held = {s.source_name for s in self.dataset.sources if s.held_out}
        if isinstance(value, tuple):
            unknown = [n for n in value if n not in names]
            if unknown:
                raise ValueError(f"evaluate.leave_one_source_out: {', '.join(unknown)} is not a source of this "
                                 f"dataset; its sources: {', '.join(names)}")
            never_trained = [n for n in value if n in held]
            if never_trained:
                raise ValueError(f"evaluate.leave_one_source_out: {', '.join(never_trained)} has `split: test`: "
                                 "the probes never train on it already (the held-out table grades it)")
        if value and len(set(names) - held) < 2:
            raise ValueError("evaluate.leave_one_source_out needs at least two sources the probes train on")
        return self

    @property
    def sources_left_out(self) -> tuple[str, ...]:
        """The sources `evaluate.leave_one_source_out` grades probes on that never saw them (spec order)."""
        value = self.evaluate.leave_one_source_out
        if not value:
            return ()
        if value is True:
            return tuple(s.source_name for s in self.dataset.sources if not s.held_out)
        return tuple(dict.fromkeys(value))

    @property
    def has_responses(self) -> bool:
        """Whether rows have replies: generated (`generate:`) or given by a source."""
        return self.generate.enabled or self.dataset.gives_responses

    @property
    def judges_responses(self) -> bool:
        """Whether the guard scores the (prompt, response) pairs too."""
        return self.guard.enabled and self.has_responses and self.guard.response is not False

    @property
    def guard_model(self) -> ModelSpec:
        return self.guard.model or self.model

    @property
    def device_class(self) -> str:
        """The device class the chat model computes on: `model.device` when it names one, else what
        `extract.accelerator` asks for ('auto' is resolved per actor and recorded in every part)."""
        declared = device_class(self.model.device)
        if declared != "auto":
            return declared
        return {"gpu": "cuda", "cpu": "cpu"}.get(self.extract.accelerator, "auto")

    @property
    def guard_is_chat(self) -> bool:
        """The guard is the chat model itself, so one loaded copy serves both."""
        return self.guard.model is None or self.guard.model == self.model
