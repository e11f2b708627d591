"""Builds a replica's `GuardedChatModel` from `ServeSettings`: the artifact, its chat model, and (for guard
modes 'model' and 'both') the guard model the probe's run compared against, shared with the chat model when the
run's guard was the chat model itself."""
from __future__ import annotations

import logging
from typing import Any

from guardray.errors import InputError
from guardray.models import load_model, numerics
from guardray.serve.api import ServeSettings
from guardray.serve.artifact import find_probe
from guardray.serve.engine import GuardedChatModel
from guardray.spec import GuardSpec, ModelSpec

log = logging.getLogger(__name__)


def load_guarded_model(settings: ServeSettings) -> GuardedChatModel:
    served = find_probe(settings.artifact, settings.probe)
    model_spec = served.model_spec
    if settings.device:
        model_spec = model_spec.model_copy(update={"device": settings.device})
    loaded = load_model(model_spec)
    guard, guard_threshold = None, 0.0
    recorded = served.meta.get("guard")
    if settings.guard in ("model", "both"):
        if not recorded:
            raise InputError(f"guard: {settings.guard!r} needs the guard model of the probe's run, and "
                             f"{served.uri} records none (its run had guard.enabled: false)")
        guard, guard_threshold = _guard(recorded, loaded, settings), float(recorded["threshold"])
    threshold = settings.threshold if settings.threshold is not None else float(served.meta.get("threshold", 0.0))
    engine = GuardedChatModel(loaded, served.probe, served.meta, threshold, settings.refusal, guard, guard_threshold)
    engine.numerics = compare_numerics(served.meta.get("numerics"), numerics(loaded), served.uri)
    return engine


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


def _guard(recorded: dict, chat, settings: ServeSettings):
    from guardray.guard.hf import HFGuard

    # the server runs the guard in its own process, and reads its verdict only (no category pass)
    spec = GuardSpec(**{**recorded["spec"], "backend": "hf", "categories": False})
    if recorded["is_chat_model"]:
        return HFGuard.create(chat, spec)
    model = ModelSpec(**recorded["model"])
    return HFGuard.create(load_model(model.model_copy(update={"device": settings.device}) if settings.device
                                     else model), spec)
