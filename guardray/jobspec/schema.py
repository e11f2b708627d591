"""The job spec's schema, section by section: what a guardray job *is*, validated and frozen.

This module holds the base of every section and the sections about models and how they run (ray, model, extract,
generate, guard); `dataset.py` and `job.py` hold the rest. The schema imports nothing above it: the checks that
need the stages' registries (probe types and parameters, affix regexes) run after it, in `validate.py`, and the
dataset rules it uses are handed to it (`links.py`).

Every model forbids unknown keys, so a typo fails loudly with a "did you mean" hint. A spec may come from someone
else, so it is read as untrusted: booleans are real booleans; devices, model ids, dataset repos and engine
arguments that would load code or files from elsewhere are refused (`checks.py`).

Each stage's cache key is computed from the section it depends on (`Section.cache_payload`), leaving out the
fields that only change *how* it runs (actors, batch sizes), so tuning those never invalidates results.
"""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator, model_validator

from guardray.columns import POOLING_CONSTANTS, PROMPT_POOLINGS
from guardray.jobspec.checks import DeviceName, EngineArgs, check_model_id


class Section(BaseModel):
    """Base of every spec model: frozen, unknown keys forbidden."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Fields that change how a stage runs but not what it produces; left out of the cache key.
    runtime_fields: ClassVar[frozenset[str]] = frozenset()

    def cache_payload(self) -> dict[str, Any]:
        """The JSON-able content this section contributes to a stage hash."""
        return self.model_dump(mode="json", exclude=set(self.runtime_fields))


#: Validation context for a spec the driver has already validated (`spec_for_worker`, the built-in defaults):
#: checks that import libraries or look at the driver's files are skipped.
CHECKED_ON_DRIVER = {"checked_on_driver": True}


def already_checked(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("checked_on_driver"))


#: Validation context for a spec that runs on another machine (`guardray submit`): paths name that machine's
#: files, so only their form is checked here (no `..`), and the job's own validate there checks they exist.
PATHS_ELSEWHERE = {"paths_elsewhere": True}


def paths_elsewhere(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("paths_elsewhere"))


# --------------------------------------------------------------------------------------------- ray
class RaySpec(Section):
    """Where Ray runs. `local` starts an embedded single-node Ray; `auto` or an address attaches to a cluster."""

    address: str = Field("local", description="'local' (embedded), 'auto', 'ray://host:10001' or 'host:6379'.")
    dashboard: StrictBool = Field(False, description="Start the dashboard with embedded Ray (bound to 127.0.0.1).")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for embedded Ray (default: all).")
    num_gpus: int | None = Field(None, ge=0, description="GPUs for embedded Ray (default: all visible).")


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
        if not already_checked(info):
            check_model_id(value, on_this_machine=not paths_elsewhere(info))
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
    batch_size: int | None = Field(  # type: ignore[assignment]
        None, ge=1, description="Prompts per forward pass at most (default: 512 on a GPU, 16 on a CPU); the token "
        "budget usually decides.")
    max_tokens_per_batch: int | None = Field(
        None, ge=1, description="Padded-token budget per forward pass (default: 16384 on a GPU, 4096 on a CPU). "
        "Batches are cut from length-sorted rows, so a batch pads to its own longest row, not to the budget.")
    packing: Literal["auto", "on", "off"] = Field(
        "auto", description="Run a batch as one unpadded sequence (per-row positions) instead of padded rows. "
        "'auto': with flash-attention (varlen kernels), where it removes the padding's compute; 'on': with any "
        "attention, after a load-time check that packed and padded rows agree (with SDPA or eager the "
        "block-diagonal mask costs more than the padding it saves: for tests and measurements); 'off': padded.")
    runtime_fields: ClassVar[frozenset[str]] = ActorPoolSpec.runtime_fields | {"max_tokens_per_batch", "packing"}

    def cache_payload(self) -> dict[str, Any]:
        """The fields, plus the constants of the poolings extracted that have some (`columns.POOLING_CONSTANTS`:
        the `ema` half-life), so changing one recomputes the features; a job without such a pooling keeps its key."""
        payload = super().cache_payload()
        constants = {p: POOLING_CONSTANTS[p] for p in self.poolings if p in POOLING_CONSTANTS}
        if constants:
            payload["pooling_constants"] = constants
        return payload

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
    batch_size: int | None = Field(  # type: ignore[assignment]
        None, ge=1, description="Prompts per generation batch (default: 128 for vLLM on a GPU, whose scheduler "
        "keeps that many sequences decoding at once; else 16).")
    vllm_engine_args: EngineArgs = Field(
        default_factory=dict, description="Extra keyword arguments for the vLLM engine (e.g. gpu_memory_utilization); "
        "settings that load code or files, or pick the model, are refused (see SAFETY_ENGINE_ARGS).")

    def rows_per_batch(self, accelerator: str) -> int:
        """`batch_size`, or its default for this backend on this accelerator ('gpu' or 'cpu')."""
        return self.batch_size or (128 if self.backend == "vllm" and accelerator == "gpu" else 16)

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
