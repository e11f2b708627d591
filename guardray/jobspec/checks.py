"""Checks on spec values that can attack the machine that reads them: devices, model ids and paths, and vLLM
engine arguments. Pure functions and annotated types, no pydantic models: the lowest layer of the spec package."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator


# ------------------------------------------------------------------------------------- devices, models
def _check_device(value: str) -> str:
    """A device string reaches torch.device in every actor: refuse anything else at validate, not 40 s later."""
    if not _DEVICE.fullmatch(value):
        raise ValueError(f"{value!r} is not a device: use auto, cpu, cuda or cuda:N")
    return value


_DEVICE = re.compile(r"auto|cpu|cuda(?::[0-9]{1,3})?")
#: A torch device a model may be placed on (the spec's `model.device`, serve's `--device`).
DeviceName = Annotated[str, AfterValidator(_check_device)]


def check_hub_id(value: str, what: str) -> None:
    """Raise ValueError unless `value` is a Hugging Face repo id ('name' or 'org/name', no '..' or '--')."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        raise ValueError(f"{value!r} is not a Hugging Face {what} ('org/name')") from None


def check_relative(value: str) -> None:
    """Raise ValueError when a path inside a repo is absolute or steps out of it ('..')."""
    parts = value.replace("\\", "/").split("/")
    if value.startswith(("/", "\\", "~")) or ".." in parts or re.match(r"^[A-Za-z]:", value):
        raise ValueError(f"{value!r} must stay inside the dataset repo (no absolute path, no '..')")


def check_model_id(value: str, on_this_machine: bool = True) -> None:
    """A model id is a hub id, an offline alias (a valid hub name too), a .gguf file or a model directory.

    transformers takes an existing directory as a local model and anything else as a hub id, so `/etc` or
    `../../etc/passwd` would reach it and fail deep inside with its own message: refuse them here, one line."""
    path = Path(value)
    looks_like_path = value.endswith(".gguf") or value.startswith(("/", "./", "../", "~")) \
        or value.count("/") > 1 or "\\" in value
    if not on_this_machine and looks_like_path:
        if ".." in path.parts:
            raise ValueError(f"model path {value!r} climbs out of its directory ('..')")
        return  # a path on the machine the job runs on: checked there
    if value.endswith(".gguf"):
        if not path.is_file():
            raise ValueError(f"GGUF file not found: {value}")
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{value!r} is a directory without config.json, not a model directory")
    elif path.exists():
        raise ValueError(f"{value!r} is a file, not a model directory (nor a .gguf file)")
    elif looks_like_path:
        raise ValueError(f"model directory not found: {value}")
    else:
        try:
            check_hub_id(value, "model id")
        except ValueError:
            raise ValueError(f"{value!r} is neither a Hugging Face model id ('org/name') nor a model directory") \
                from None


# ------------------------------------------------------------------------------------ engine arguments
#: vLLM engine arguments refused in `generate.vllm_engine_args` and `guard.vllm_engine_args`, and why. Those
#: maps are merged last into the engine's keyword arguments (guard/vllm.py, responses/vllm.py), so anything here
#: would override what the spec's own fields decide. Read from vLLM's `EngineArgs` (vllm/engine/arg_utils.py):
#: the arguments that run code, pick which model/tokenizer/files are loaded, read or write other paths, carry a
#: secret or open network endpoints. Speed and numerics settings (gpu_memory_utilization, quantization, ...)
#: stay allowed.
SAFETY_ENGINE_ARGS: dict[str, str] = {
    **dict.fromkeys(("trust_remote_code", "code_revision"), "runs Python from the model repo: set "
                    "model.trust_remote_code (and model.revision) instead"),
    **dict.fromkeys(("model", "tokenizer", "hf_config_path", "model_weights", "revision", "tokenizer_revision"),
                    "picks which model or tokenizer is loaded: set model.id / model.revision (or guard.model) instead"),
    **dict.fromkeys(("hf_overrides", "model_impl", "tokenizer_mode", "config_format"),
                    "changes which model or tokenizer class (and code) is loaded"),
    **dict.fromkeys(("worker_cls", "worker_extension_cls", "scheduler_cls", "logits_processors",
                     "logits_processor_pattern", "io_processor_plugin", "reasoning_parser_plugin",
                     "tool_parser_plugin", "inductor_passes", "kv_transfer_config", "kv_events_config",
                     "ec_transfer_config"), "imports code named by a string"),
    # load_format picks the weight loader: 'pt' unpickles .bin/.pt files, tensorizer/runai_streamer read URIs,
    # 'dummy' loads random weights; a speculative draft model, LoRA or generation config is another download
    **dict.fromkeys(("load_format", "model_loader_extra_config", "speculative_config", "generation_config",
                     "default_mm_loras", "download_dir"), "loads weights or files other than the model's"),
    **dict.fromkeys(("allowed_local_media_path", "allowed_media_domains"), "lets requests read local files or URLs"),
    "hf_token": "a secret in the spec (it is hashed and written to spec.json): set HF_TOKEN in the environment",
    **dict.fromkeys(("otlp_traces_endpoint", "master_addr", "data_parallel_address"), "opens a network endpoint"),
}
#: Key fragments refused at any depth (nested configs such as compilation_config have their own cache
#: directories and module paths): '*_dir', '*_path', '*_cls', '*_module', '*download*', '*plugin*', ...
_UNSAFE_KEY = re.compile(r"(_dir|_path|_cls|_module|_uri|_url|_endpoint|_token|_passes)$|download|plugin|remote_code")
#: `distributed_executor_backend` may also name an executor class to import: only vLLM's own are allowed.
EXECUTOR_BACKENDS = ("ray", "mp", "uni", "external_launcher")


def check_engine_args(value: dict[str, Any]) -> dict[str, Any]:
    """Refuse the engine arguments above (and unsafe keys nested in config maps), all named in one line."""
    problems = [f"{key}: {why}" for key, why in _unsafe_engine_keys(value)]
    backend = value.get("distributed_executor_backend")
    if backend is not None and backend not in EXECUTOR_BACKENDS:
        problems.append(f"distributed_executor_backend: {backend!r} is not one of {', '.join(EXECUTOR_BACKENDS)}")
    if problems:
        raise ValueError(f"refused ({'; '.join(problems)})")
    return value


def _unsafe_engine_keys(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, why) for each refused key: SAFETY_ENGINE_ARGS at the top, _UNSAFE_KEY at any depth."""
    if isinstance(value, list):
        return [hit for i, item in enumerate(value) for hit in _unsafe_engine_keys(item, f"{prefix}{i}.")]
    if not isinstance(value, dict):
        return []
    found: list[tuple[str, str]] = []
    for key, item in value.items():
        name = f"{prefix}{key}"
        why = None if prefix else SAFETY_ENGINE_ARGS.get(key)
        if why is None and _UNSAFE_KEY.search(str(key)):
            why = "names code, a path or a secret"
        if why:
            found.append((name, why))
        else:
            found += _unsafe_engine_keys(item, f"{name}.")
    return found


#: The `vllm_engine_args` maps, checked against SAFETY_ENGINE_ARGS.
EngineArgs = Annotated[dict[str, Any], AfterValidator(check_engine_args)]
