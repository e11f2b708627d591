"""Builds a replica's `GuardedChatModel` from `ServeSettings`: the artifact, its chat model, and (for guard
modes 'model' and 'both') the guard model the probe's run compared against, shared with the chat model when the
run's guard was the chat model itself.

The artifact names the models (id, revision, rendering); the server decides what may run: `trust_remote_code`
and the device come from `ServeSettings` only (`serving_spec`), and each model is logged, with where it is read
from, before it is loaded."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from guardray.errors import InputError
from guardray.models import OFFLINE_MODELS, load_model, numerics
from guardray.serve.api import ServeSettings
from guardray.serve.artifact import find_probe, untrusted_model
from guardray.serve.engine import GuardedChatModel
from guardray.jobspec import GuardSpec, ModelSpec

log = logging.getLogger(__name__)


def load_guarded_model(settings: ServeSettings, device: str | None = None) -> GuardedChatModel:
    """`device`: the one the replica was given (`check_actor_device`: cpu with `num_gpus: 0`, even on a GPU node),
    which `device: auto` resolves to for the chat and guard models; None outside a replica."""
    served = find_probe(settings.artifact, settings.probe, allow_pickle=settings.allow_pickle)
    model_spec = serving_spec(served.model_spec, settings)
    log.info("loading chat model %s", describe_model(model_spec))
    loaded = load_model(model_spec, device)
    guard, guard_threshold = None, 0.0
    recorded = served.meta.get("guard")
    if settings.guard in ("model", "both"):
        if not recorded:
            raise InputError(f"guard: {settings.guard!r} needs the guard model of the probe's run, and "
                             f"{served.uri} records none (its run had guard.enabled: false)")
        guard, guard_threshold = _guard(recorded, loaded, settings, device), float(recorded["threshold"])
    threshold = settings.threshold if settings.threshold is not None else float(served.meta.get("threshold", 0.0))
    engine = GuardedChatModel(loaded, served.probe, served.meta, threshold, settings.refusal, guard, guard_threshold)
    engine.numerics = compare_numerics(served.meta.get("numerics"), numerics(loaded), served.uri)
    return engine


def serving_spec(spec: ModelSpec, settings: ServeSettings) -> ModelSpec:
    """A model the artifact names, as this server runs it: `trust_remote_code` from the server's settings only
    (never the artifact's), `--device` over the recorded device."""
    update: dict[str, Any] = {"trust_remote_code": settings.trust_remote_code}
    if settings.device:
        update["device"] = settings.device
    return spec.model_copy(update=update)


def describe_model(spec: ModelSpec) -> str:
    """Which model, which revision, read from where (a built-in alias, a local path, the Hugging Face hub), and
    whether its own code may run: said before loading, so an operator sees what an artifact points at."""
    if spec.id in OFFLINE_MODELS:
        source = f"built-in offline alias (package {OFFLINE_MODELS[spec.id][0]})"
    elif spec.id.endswith(".gguf") or Path(spec.id).exists():
        source = f"local path {Path(spec.id).resolve()}"
    else:
        source = "Hugging Face hub (or its local cache)"
    return (f"{spec.id!r} revision {spec.revision or 'default'} from {source}, trust_remote_code="
            f"{'on' if spec.trust_remote_code else 'off'}")


def compare_numerics(trained: dict[str, str] | None, served: dict[str, str], uri: str) -> dict[str, Any]:
    """The numerics the probe's training activations were computed with against this replica's. A different
    dtype (a probe trained on CPU float32 activations, served on a GPU in bfloat16) or device shifts every score
    by more than the float tolerance the tests hold: served anyway, with a warning, and `/health` says so."""
    match = None if trained is None else all(trained.get(k) == served.get(k) for k in ("device", "dtype"))
    if match is False:
        log.warning("%s: the probe was trained on activations computed with %s, this replica computes with %s; its "
                    "scores will differ from the report's (pin model.dtype/model.device, or --device)",
                    uri, trained, served)
    return {"trained": trained, "served": served, "match": match}


def _guard(recorded: dict, chat, settings: ServeSettings, device: str | None = None):
    from guardray.guard.hf import HFGuard

    # the server runs the guard in its own process (hf: no engine arguments), and reads its verdict only (no
    # category pass)
    spec = GuardSpec(**{**recorded["spec"], "backend": "hf", "categories": False, "vllm_engine_args": {}})
    if recorded["is_chat_model"]:
        return HFGuard.create(chat, spec)
    model = serving_spec(untrusted_model(recorded["model"], settings.artifact), settings)
    log.info("loading guard model %s", describe_model(model))
    return HFGuard.create(load_model(model, device), spec)
