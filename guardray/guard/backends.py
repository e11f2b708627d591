"""Guard backends by name (`guard.backend`), and the preflight check that runs before any model loads."""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Protocol, Sequence

import numpy as np

from guardray.errors import InputError
from guardray.guard.category_scores import CategoryContinuations
from guardray.guard.labels import resolve_label_tokens
from guardray.guard.prompt import JUDGES, Judge, guard_renderer
from guardray.models import LoadedModel, load_model, load_tokenizer, resolve_device
from guardray.rendering import ConversationRenderer, Encoded, PromptRenderer
from guardray.jobspec import JobSpec


class Guard(Protocol):
    """What the feature stage needs from a guard backend: `renderer.encode_many` takes prompts (judge="prompt")
    or (prompt, response) pairs (judge="response"); `score` takes its encodings."""

    renderer: PromptRenderer | ConversationRenderer
    #: True for an engine with its own scheduler (vLLM): the features stage hands it a whole shard at once
    #: instead of its own length-sorted batches, which would only starve the engine.
    schedules_itself: ClassVar[bool]

    def score(self, encoded: Sequence[Encoded]) -> dict[str, np.ndarray]: ...

    def numerics(self) -> dict[str, str]: ...

    def judging(self, renderer: PromptRenderer | ConversationRenderer) -> "Guard": ...


def build_guards(chat: LoadedModel, spec: JobSpec, judges: Sequence[Judge],
                 device: str | None = None) -> dict[str, Guard]:
    """One guard per judge, all sharing ONE loaded guard model or engine (a second judge only adds a renderer).
    `device`: the one the actor was given, as for the chat model (None outside an actor)."""
    if not judges:
        return {}
    first = GUARD_BACKENDS[spec.guard.backend](chat, spec, judges[0], device)
    tokenizer = first.renderer.tokenizer
    return {judge: first if judge == judges[0] else
            first.judging(guard_renderer(tokenizer, spec.guard_model, spec.guard, judge)) for judge in judges}


def _hf_guard(chat: LoadedModel, spec: JobSpec, judge: Judge = "prompt", device: str | None = None) -> Guard:
    from guardray.guard.hf import HFGuard

    return HFGuard.create(chat if spec.guard_is_chat else load_model(spec.guard_model, device), spec.guard, judge)


def _vllm_guard(chat: LoadedModel, spec: JobSpec, judge: Judge = "prompt", device: str | None = None) -> Guard:
    from guardray.guard.vllm import VLLMGuard  # the vllm package itself is imported only when an engine starts

    tokenizer = chat.tokenizer if spec.guard_is_chat else load_tokenizer(spec.guard_model)
    on = resolve_device(spec.guard_model.device, device).type
    return VLLMGuard.create(spec.guard_model, spec.guard, tokenizer, judge, on)


# Guard backends: name → factory(loaded chat model, job spec, judge, the actor's device). Each guard judges one
# thing; the features stage builds one per judge (prompt, and response when `JobSpec.guard_responses`). vLLM runs
# its own engine.
# What a backend cannot do (categories on vLLM) is refused when the spec is validated (`GuardSpec`).
GUARD_BACKENDS: dict[str, Callable[..., Guard]] = {"hf": _hf_guard, "vllm": _vllm_guard}


def preflight_guard(tokenizer: Any, spec: JobSpec, judges: Sequence[str] = ("prompt",)) -> None:
    """Everything about the guard that can fail without its weights: the backend, each judge's renderer
    (template, max_length), the label tokens and the category continuations."""
    if spec.guard.backend not in GUARD_BACKENDS:
        raise InputError(f"guard.backend {spec.guard.backend!r} is not one of {', '.join(GUARD_BACKENDS)}")
    for judge in judges:
        if judge not in JUDGES:
            raise InputError(f"guard judge {judge!r} is not one of {', '.join(JUDGES)}")
        guard_renderer(tokenizer, spec.guard_model, spec.guard, judge)  # type: ignore[arg-type]
    _, unsafe_id = resolve_label_tokens(tokenizer, spec.guard)
    if spec.guard.categories:
        CategoryContinuations.build(tokenizer, unsafe_id, spec.guard.category_codes)
