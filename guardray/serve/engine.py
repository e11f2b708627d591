"""The chat model with a trained probe on its residual stream, scored in the prefill pass generation runs anyway.

A forward hook on decoder block `layer` fires during `generate`'s first forward (the prefill, over the whole
prompt), pools that block's output exactly as the features stage does (`guardray.activations.pool`) and scores
the probe (`guardray.probes.artifact`). No second model and no second pass: the probe adds one pooling and one
dot product per prompt. Where every row of the batch is to be blocked, the hook ends the prefill right there,
so a blocked prompt never reaches the upper blocks, the LM head or a decoding step; in a batch that mixes
blocked and allowed rows, the blocked rows are forced to end at their first step and their output is dropped.

Guard modes (`GUARD_MODES`): 'none' (the model alone, the benchmark's baseline), 'probe', 'model' (a separate
guard-model call before generation: the LlamaGuard-style scoring of the features stage), 'both' (the probe
decides; the guard model's score rides along for a side-by-side comparison, shadow mode).

This module knows nothing of HTTP or Ray: `guardray.serve.app` wraps it in a Ray Serve deployment.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from transformers.generation.streamers import BaseStreamer

from guardray.activations import Batch, decoder_layers, pool
from guardray.chats import request_chat
from guardray.columns import GUARD_SCORE
from guardray.decoding import generation_config, split_stop, stop_ids
from guardray.errors import InputError
from guardray.models import LoadedModel
from guardray.rendering import Encoded, chat_renderer

log = logging.getLogger(__name__)

POLICIES = ("block", "flag")
GUARD_MODES = ("none", "probe", "model", "both")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Sampling:
    """How one request decodes: greedy at temperature 0, else nucleus sampling (seeded when `seed` is set)."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class ChatRequest:
    """One conversation to answer: OpenAI-style messages whose last one is the user's."""

    messages: tuple[tuple[str, str], ...]  # (role, content)
    sampling: Sampling = Sampling()
    policy: str = "flag"
    guard: str = "probe"

    def group(self) -> tuple[Any, ...]:
        """Requests that can share one `generate` call: the same guard mode and decoding (greedy ignores top_p
        and seed), and `max_new_tokens` in the same power-of-two bucket. The call runs to the largest and ends
        each row at its own (`_EndRows`), but answers when the call ends: a row waits at most for twice its own
        length."""
        sampling = self.sampling
        decoding = (0.0, None, None) if sampling.temperature == 0 else (sampling.temperature, sampling.top_p,
                                                                         sampling.seed)
        return (*decoding, 1 << (sampling.max_new_tokens - 1).bit_length(), self.guard)


@dataclass
class Verdict:
    """The guard result a response carries. `decision`: 'allow', 'flag' (over the threshold, answered and
    marked) or 'block' (over the threshold, refused). Latencies in milliseconds: `prefill_ms` is the whole
    prefill forward the probe rode on, `probe_ms` the probe's own pooling and scoring inside it."""

    probe: str
    threshold: float
    score: float | None = None
    decision: str = "allow"
    prefill_ms: float | None = None
    probe_ms: float | None = None
    guard_model_score: float | None = None
    guard_model_threshold: float | None = None
    guard_model_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Completion:
    text: str
    finish_reason: str  # 'stop', 'length', 'content_filter' (blocked: the refusal), 'cancelled' (client gone)
    prompt_tokens: int
    completion_tokens: int
    verdict: Verdict


@dataclass
class _Prefill:
    """What the hook saw during one `generate` call's prefill."""

    batch: Batch
    scores: np.ndarray | None = None
    blocked: list[bool] = field(default_factory=list)
    cancelled: set[int] = field(default_factory=set)  # rows ended because their client went away
    probe_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    prefill_s: float | None = None


class _AllBlocked(Exception):
    """Raised by the probe hook to end a prefill whose every row is blocked."""


class GuardedChatModel:
    """A loaded chat model, its probe (layer, pooling, scorer) and the policy around them. Thread-safe: one
    model call at a time (`lock`), since the hooks belong to the shared model."""

    def __init__(self, loaded: LoadedModel, probe: Any, meta: dict[str, Any], threshold: float,
                 refusal: str, guard: Any = None, guard_threshold: float = 0.0):
        self.loaded, self.probe, self.meta = loaded, probe, meta
        self.name, self.layer, self.pooling = meta["name"], int(meta["layer"]), meta["pooling"]
        self.threshold, self.refusal = threshold, refusal
        self.guard, self.guard_threshold = guard, guard_threshold
        self.renderer = chat_renderer(loaded.tokenizer, loaded.spec)  # the features stage's own rendering
        self.max_length, self.system_prompt = loaded.spec.max_length, loaded.spec.system_prompt
        self.block = decoder_layers(loaded.model)[self.layer]
        self.stops = stop_ids(loaded.tokenizer, loaded.model.generation_config)
        self.pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else self.stops[0]
        self.lock = threading.Lock()
        self.steps = 0  # forward passes of the whole model (prefill and decoding), for tests and metrics
        self.largest_batch = 0  # the most rows one of those passes ran
        self.cancelled_streams = 0  # rows whose client went away, ended before their max_tokens (streamed or not)
        self.numerics: dict[str, Any] = {}  # training against serving numerics (`loading.compare_numerics`)
        loaded.model.register_forward_hook(self._count_step)

    # ------------------------------------------------------------------------------------------ rendering
    def encode(self, messages: Sequence[tuple[str, str]]) -> Encoded:
        """The conversation's ids exactly as the features stage renders the same conversation row (one renderer,
        `chat_renderer`): the spec's system prompt unless the request has its own, the history, the user's last
        message. Over `max_length` → InputError (the server does not cut a live prompt or drop its turns, as
        the features stage does for training)."""
        chat = request_chat(messages)
        if chat.system == self.system_prompt:  # the spec's own: a lone prompt renders as in the features stage
            chat = dataclasses.replace(chat, system=None)
        encoded = self.renderer.encode_many([chat])[0]
        if isinstance(encoded, InputError):
            raise encoded
        if isinstance(encoded, Exception):  # a template refusing these messages (roles, order) is bad input
            raise InputError(f"messages: the chat template refuses them: {type(encoded).__name__}: {encoded}")
        if encoded.dropped_turns:
            raise InputError(f"messages: the conversation renders to more than {self.max_length} tokens; this "
                             f"server's max_length is {self.max_length}")
        if encoded.truncated:
            raise InputError(f"messages: the prompt renders to {encoded.n_tokens} tokens; this server's max_length "
                             f"is {self.max_length}")
        return encoded

    # ------------------------------------------------------------------------------------------- scoring
    @torch.inference_mode()
    def score(self, prompts: Sequence[str]) -> list[Verdict]:
        """Probe scores without generating: the forward stops after the probe's block (as in the features
        stage), so this costs a partial prefill."""
        from guardray.activations import capture

        encoded = [self.encode((("user", p),)) for p in prompts]
        batch = Batch.build(encoded, self.pad_id, self.loaded.device)
        with self.lock:
            started = time.perf_counter()
            pooled = capture(self.loaded.model, batch, [self.layer], [self.pooling])[(self.pooling, self.layer)]
            forward = time.perf_counter() - started
            scores = self.probe.score(pooled.cpu().numpy())
            probe_s = time.perf_counter() - started - forward
        return [self._verdict(float(s), "flag", forward, probe_s / len(prompts)) for s in scores]

    def _verdict(self, score: float, policy: str, prefill_s: float | None, probe_s: float) -> Verdict:
        over = _over(score, self.threshold)
        return Verdict(self.name, self.threshold, score, ("block" if policy == "block" else "flag") if over else "allow",
                       None if prefill_s is None else prefill_s * 1e3, probe_s * 1e3)

    # ---------------------------------------------------------------------------------------- generation
    def complete(self, requests: Sequence[ChatRequest], encoded: Sequence[Encoded] | None = None,
                 cancels: Sequence[threading.Event | None] | None = None) -> list[Completion]:
        """Answer requests that share a group (`ChatRequest.group`) in one `generate` call (`encoded`: their
        `encode`, when the caller has it already; `cancels`: set when a caller went away, which ends its row)."""
        encoded = encoded or [self.encode(r.messages) for r in requests]
        with self.lock:
            return self._complete(requests, encoded, cancels=cancels)

    def stream_many(self, requests: Sequence[ChatRequest], encoded: Sequence[Encoded],
                    cancels: Sequence[threading.Event | None] | None = None,
                    ) -> Iterator[list[list[Verdict | str | Completion]]]:
        """Streams of requests that share a group, answered by one `generate` call. Yields, step by step, each
        request's new items: its Verdict as soon as the prefill has it (before any token), then text pieces, then
        its finished Completion. Setting a request's `cancel` event (its client went away) ends that row at the
        next decoding step; the others go on."""
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        streamer = _RowStreamer(self.loaded.tokenizer, self.stops, len(requests), events)

        def run() -> None:
            try:
                with self.lock:
                    events.put(("done", self._complete(requests, encoded, streamer,
                                                       lambda verdicts: events.put(("verdicts", list(verdicts))),
                                                       cancels)))
            except Exception as e:  # noqa: BLE001 - re-raised in the consumer below
                events.put(("error", e))
            except BaseException as e:  # noqa: BLE001 - as an Exception, so callers that catch those see it
                events.put(("error", RuntimeError(f"generate ended by {type(e).__name__}: {e}")))

        thread = threading.Thread(target=run, name="guardray-stream", daemon=True)
        thread.start()
        while True:
            kind, value = events.get()
            if kind == "error":
                thread.join()
                raise value
            if kind == "verdicts":
                yield [[verdict] for verdict in value]
            elif kind == "text":
                yield [[value[row]] if row in value else [] for row in range(len(requests))]
            else:  # done: what a held-back multi-byte character kept from the pieces, then the Completions
                yield [[*streamer.rest(row, completion), completion] for row, completion in enumerate(value)]
                thread.join()
                return

    def _complete(self, requests: Sequence[ChatRequest], encoded: Sequence[Encoded], streamer: Any = None,
                  on_verdict: Callable[[list[Verdict]], None] | None = None,
                  cancels: Sequence[threading.Event | None] | None = None) -> list[Completion]:
        sampling, mode = requests[0].sampling, requests[0].guard
        batch = Batch.build(encoded, self.pad_id, self.loaded.device, left=True)  # rows end where generation starts
        width = batch.input_ids.shape[1]
        verdicts = [Verdict(self.name, self.threshold) for _ in requests]
        model_blocked = self._guard_model(requests, encoded, verdicts) if mode in ("model", "both") else []
        state = _Prefill(batch, blocked=model_blocked or [False] * len(requests))
        policies = [r.policy for r in requests]

        def publish() -> None:  # streaming: the consumers get their verdicts before any token
            if on_verdict is not None:
                on_verdict(verdicts)

        limits = [r.sampling.max_new_tokens for r in requests]
        config = generation_config(self.stops, self.pad_id, max(limits), sampling.temperature, sampling.top_p)
        if sampling.temperature > 0 and sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        hooks = []
        try:
            if mode in ("probe", "both"):
                hooks.append(self.block.register_forward_hook(self._probe_hook(state, policies, verdicts, publish)))
            hooks.append(self.loaded.model.register_forward_hook(self._prefill_end(state)))
            if mode not in ("probe", "both"):
                publish()
            if all(state.blocked):
                raise _AllBlocked
            with torch.inference_mode():
                out = self.loaded.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                                 generation_config=config, streamer=streamer,
                                                 logits_processor=[_EndRows(state, self.stops, cancels, limits)])
            generated = out[:, width:].tolist()
        except _AllBlocked:
            generated = [[] for _ in requests]
        finally:
            for hook in hooks:
                hook.remove()
        completions = []
        for row, (request, verdict) in enumerate(zip(requests, verdicts)):
            if verdict.prefill_ms is None and state.prefill_s is not None:
                verdict.prefill_ms = state.prefill_s * 1e3
            if state.blocked[row]:
                completions.append(Completion(self.refusal, "content_filter", len(encoded[row].ids), 0, verdict))
                continue
            generation = split_stop(generated[row], self.stops, limits[row])
            text = self.loaded.tokenizer.decode(generation.tokens, skip_special_tokens=True)
            finish = generation.finish_reason
            if row in state.cancelled:  # ended by `_EndRows` for a client that went away, not by the model
                finish = "cancelled"
                self.cancelled_streams += 1
            completions.append(Completion(text, finish, len(encoded[row].ids), len(generation.tokens), verdict))
        return completions

    def _probe_hook(self, state: _Prefill, policies: list[str], verdicts: list[Verdict],
                    publish: Callable[[], None]) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            if state.scores is not None:  # a decoding step: the probe read the prefill already
                return
            self._synchronize()  # on a GPU, the blocks below have finished: probe_ms is the probe's own
            started = time.perf_counter()
            hidden = output[0] if isinstance(output, tuple) else output
            scores = self.probe.score(pool(hidden, state.batch, self.pooling).cpu().numpy())
            state.scores, state.probe_s = scores, time.perf_counter() - started
            for row, score in enumerate(scores):
                judged = self._verdict(float(score), policies[row], None, state.probe_s / len(scores))
                verdicts[row].score, verdicts[row].decision = judged.score, judged.decision
                verdicts[row].probe_ms = judged.probe_ms
                state.blocked[row] = state.blocked[row] or judged.decision == "block"
            if all(state.blocked):  # the prefill ends here, at the probe's block
                state.prefill_s = time.perf_counter() - state.started
                publish()
                raise _AllBlocked
            publish()

        return hook

    def _prefill_end(self, state: _Prefill) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            if state.prefill_s is None:
                self._synchronize()
                state.prefill_s = time.perf_counter() - state.started

        return hook

    def _synchronize(self) -> None:
        if self.loaded.device.type == "cuda":
            torch.cuda.synchronize(self.loaded.device)

    def _count_step(self, module: Any, args: Any, output: Any) -> None:
        self.steps += 1
        self.largest_batch = max(self.largest_batch, output.logits.shape[0] if hasattr(output, "logits") else 0)

    def check(self, request: ChatRequest) -> None:
        """What can fail before a request is queued (a 400 for this request alone): the guard model's
        presence and its rendering of the prompt."""
        if request.guard in ("model", "both"):
            if self.guard is None:
                raise InputError(f"guard: {request.guard!r} needs the guard model, and this server runs without one")
            failed = self.guard.renderer.encode_many([request_chat(request.messages)])[0]
            if isinstance(failed, Exception):
                raise InputError(f"messages: the guard model cannot render this prompt: {failed}")

    def _guard_model(self, requests: Sequence[ChatRequest], encoded: Sequence[Encoded],
                     verdicts: list[Verdict]) -> list[bool]:
        """The separate guard-model call ('model', 'both'): the moderation prompt over each user text. In
        'model' mode its score decides; in 'both' it is reported beside the probe's."""
        if self.guard is None:
            raise InputError("guard: this server has no guard model (the probe's run had none, or it was not loaded)")
        started = time.perf_counter()
        encoded = self.guard.renderer.encode_many([request_chat(r.messages) for r in requests])
        failed = next((e for e in encoded if isinstance(e, Exception)), None)
        if failed is not None:
            raise InputError(f"messages: the guard model cannot render this prompt: {failed}")
        columns = self.guard.score(encoded)
        spent = (time.perf_counter() - started) * 1e3 / len(requests)
        blocked = []
        for row, (request, verdict) in enumerate(zip(requests, verdicts)):
            score = float(columns[GUARD_SCORE][row])
            verdict.guard_model_score, verdict.guard_model_threshold = score, self.guard_threshold
            verdict.guard_model_ms = spent
            over = _over(score, self.guard_threshold)
            if request.guard == "model":
                verdict.decision = ("block" if request.policy == "block" else "flag") if over else "allow"
            blocked.append(request.guard == "model" and over and request.policy == "block")
        return blocked


def _over(score: float, threshold: float) -> bool:
    """At or over the threshold, as the report counts a positive (`evaluate.at_threshold`); a score that is not
    a number (a broken forward) counts as over, so it is never waved through."""
    return not score < threshold


class _EndRows:
    """A logits processor that ends rows at their next step: blocked rows (their output is replaced by the
    refusal), rows at their own `limits` (max_new_tokens; the call runs to the largest) and rows whose client
    went away (`cancels`), recorded in `state.cancelled` if still generating."""

    def __init__(self, state: _Prefill, stops: Sequence[int], cancels: Sequence[threading.Event | None] | None,
                 limits: Sequence[int] | None = None):
        self.state, self.stops, self.cancels = state, list(stops), list(cancels or [])
        self.limits = list(limits or [])
        self.width = state.batch.input_ids.shape[1]
        self.forced: set[int] = set()  # cancelled rows already ended

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids.shape[1] - self.width
        rows = [row for row, blocked in enumerate(self.state.blocked) if blocked]
        rows += [row for row, limit in enumerate(self.limits) if generated >= limit and row not in rows]
        for row, cancel in enumerate(self.cancels):
            if cancel is None or not cancel.is_set() or self.state.blocked[row] or \
                    (self.limits and generated >= self.limits[row]):  # blocked or at its end anyway
                continue
            if row not in self.forced:  # decided once, when first seen: had the row ended by itself?
                self.forced.add(row)
                if not set(input_ids[row, self.width:].tolist()) & set(self.stops):
                    self.state.cancelled.add(row)
            rows.append(row)
        if rows:
            scores[rows] = float("-inf")
            scores[rows, self.stops[0]] = 0.0
        return scores


class _RowStreamer(BaseStreamer):
    """`generate`'s streamer for a whole batch (transformers' text streamers take one row): each decoding step's
    new text per row, as ("text", {row: piece}) on `events`. A row's text is decoded whole each step (as the
    final text is) and only its new tail is sent; a tail that ends inside a multi-byte character waits for a
    later step or for `rest`. A decode that rewrote text already sent (a normalising decoder) cannot be taken
    back: the new tail is sent, with a warning."""

    def __init__(self, tokenizer: Any, stops: Sequence[int], rows: int, events: "queue.Queue[tuple[str, Any]]"):
        self.tokenizer, self.stops, self.events = tokenizer, set(stops), events
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.shown = [""] * rows
        self.ended = [False] * rows
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate's first put is the prompt
            self.prompt_seen = True
            return
        pieces = {}
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.ended[row] or token in self.stops:
                self.ended[row] = True
                continue
            self.tokens[row].append(token)
            text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
            shown = self.shown[row]
            if text.endswith("\ufffd") or len(text) <= len(shown):
                continue
            if not text.startswith(shown):  # a normalising decoder rewrote sent text: it cannot be taken back
                log.warning("streamed text of row %d was rewritten by a longer decode; sending the new tail", row)
            pieces[row], self.shown[row] = text[len(shown):], text
        if pieces:
            self.events.put(("text", pieces))

    def end(self) -> None:
        pass

    def rest(self, row: int, completion: Completion) -> list[str]:
        """What the pieces have not shown of the final text (a tail held back); nothing for a refusal."""
        shown = self.shown[row]
        if completion.finish_reason == "content_filter" or len(completion.text) <= len(shown):
            return []
        return [completion.text[len(shown):]]
