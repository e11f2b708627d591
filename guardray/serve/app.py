"""The Ray Serve application: a FastAPI ingress over `GuardedChatModel`, with batching, bounded queueing and
Prometheus metrics.

Endpoints: `POST /v1/chat/completions` (OpenAI-compatible, `stream: true` as server-sent events; every response
carries `guard`), `POST /v1/score` (probe scores of a batch of prompts, no generation), `GET /health`.

Concurrent requests are batched by `guardray.serve.batching.DrainingBatcher`: each time the model is free, the
requests that waited (up to `max_batch_size`, of one kind, streamed or not, and one set of decoding settings)
share one `generate` call; an idle model waits `batch_wait_timeout_s` for company. Streams get each decoding
step's new text. (Not `@serve.batch`: it closes batches on a timer while the model is still busy; see there.)
Every request first passes `guardray.serve.gate.Gate` (the bearer token, the body size, UTF-8, and the
replica's bounded queue: beyond `max_ongoing_requests + max_queued_requests` held requests, 503 with
Retry-After). A request the app cannot parse, or whose prompt does not fit, gets 400; every refusal is one line
of JSON, `{"error": {"message", "type"}}`. A prompt is measured in characters before it is tokenised: one
longer than `max_length` times the tokenizer's longest token cannot fit and is refused without tokenising.

A client that disconnects cancels its request (Serve cancels the handler's task): it leaves the queue if its
batch has not started, else its row stops producing tokens at the next decoding step; the generate call ends
when its last live row does.

Metrics (Ray's Prometheus export, the dashboard's Metrics tab): `guardray_serve_requests{endpoint,decision}`
(decision: allow, flag, block), `guardray_serve_probe_score_sigmoid`, `guardray_serve_latency_ms{phase}` (phase: total,
prefill, probe, guard_model), `guardray_serve_cancelled_streams`.
"""
# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations to parse request bodies.

import asyncio
import logging
import math
import threading
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from guardray.errors import InputError, one_line
from guardray.serve.api import (ChatCompletionRequest, ScoreRequest, ServeSettings, chunk, completion_body,
                                score_body, sse, usage)
from guardray.serve.batching import DrainingBatcher
from guardray.serve.engine import ChatRequest, Verdict
from guardray.serve.gate import Gate, Gatekeeper, error_body, prompt_char_limit

log = logging.getLogger(__name__)
api = FastAPI(title="guardray", description="A trained probe in front of its chat model.")
api.add_middleware(Gate)

#: Ray histograms take positive boundaries: the score is recorded through a sigmoid (for a logistic probe, its
#: probability of unsafe; for any linear probe, a monotone squash of the score).
SCORE_BOUNDARIES = [0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
LATENCY_BOUNDARIES_MS = [0.1, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]


def _bad_request(message: str) -> JSONResponse:
    return JSONResponse(error_body(message, "invalid_request_error"), status_code=400)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    """One line naming the field (FastAPI's default is a 422 with a list)."""
    first = error.errors()[0]
    if first.get("type") == "json_invalid":  # its location is a character offset, not a field
        return _bad_request(f"body: invalid JSON ({first.get('ctx', {}).get('error', 'cannot parse')})")
    where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "body"
    return _bad_request(f"{where}: {first.get('msg', 'invalid')}")


@api.exception_handler(InputError)
async def _input_error(request: Request, error: InputError) -> JSONResponse:
    return _bad_request(one_line(error))


@api.exception_handler(HTTPException)
async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    """FastAPI's and Starlette's own refusals (an unknown path, a wrong method, a body it cannot read) in the
    same shape as the rest (their default is `{"detail": ...}`)."""
    kind = "invalid_request_error" if 400 <= error.status_code < 500 else "server_error"
    return JSONResponse(error_body(f"{request.url.path}: {one_line(str(error.detail))}", kind),
                        status_code=error.status_code, headers=getattr(error, "headers", None))


class ServeMetrics:
    def __init__(self, probe: str):
        from ray.util import metrics

        self.tags = {"probe": probe}
        self.requests = metrics.Counter("guardray_serve_requests", "Requests by endpoint and guard decision",
                                        tag_keys=("probe", "endpoint", "decision"))
        self.score = metrics.Histogram("guardray_serve_probe_score_sigmoid", "sigmoid(probe score) of served prompts",
                                       boundaries=SCORE_BOUNDARIES, tag_keys=("probe",))
        self.latency = metrics.Histogram("guardray_serve_latency_ms", "Latency by phase (ms)",
                                         boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("probe", "phase"))
        self.cancelled = metrics.Counter("guardray_serve_cancelled_streams", "Streams whose client disconnected",
                                         tag_keys=("probe",))

    def record(self, endpoint: str, verdict: Verdict, total_ms: float | None = None) -> None:
        self.requests.inc(tags={**self.tags, "endpoint": endpoint, "decision": verdict.decision})
        if verdict.score is not None:
            self.score.observe(1.0 / (1.0 + math.exp(-max(min(verdict.score, 50.0), -50.0))), tags=self.tags)
        for phase, value in (("total", total_ms), ("prefill", verdict.prefill_ms), ("probe", verdict.probe_ms),
                             ("guard_model", verdict.guard_model_ms)):
            if value is not None:
                self.latency.observe(value, tags={**self.tags, "phase": phase})


@serve.deployment(name="guardray")
@serve.ingress(api)
class GuardrayServer:
    """One replica: the chat model with its probe (and the guard model for 'model'/'both')."""

    def __init__(self, settings: dict[str, Any]):
        from guardray.accelerators import check_actor_device
        from guardray.serve.loading import load_guarded_model

        self.settings = ServeSettings(**settings)
        self.gatekeeper = Gatekeeper.from_settings(self.settings)  # the key first: a missing one fails at once
        self.engine = load_guarded_model(self.settings, check_actor_device())  # never a GPU Ray did not give
        self.model_name = self.engine.loaded.spec.id
        self.max_prompt_chars = prompt_char_limit(self.engine.loaded.tokenizer, self.engine.max_length)
        self.metrics = ServeMetrics(self.engine.name)
        self.batcher = DrainingBatcher(self.engine, self.settings.max_batch_size, self.settings.batch_wait_timeout_s)

    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        engine = self.engine
        return {"status": "ok", "model": self.model_name, "probe": engine.name, "layer": engine.layer,
                "pooling": engine.pooling, "threshold": engine.threshold, "policy": self.settings.policy,
                "guard": self.settings.guard, "guard_model": engine.guard is not None, "steps": engine.steps,
                "largest_batch": engine.largest_batch, "cancelled_streams": engine.cancelled_streams,
                "batches": self.batcher.batches, "batched_requests": self.batcher.batched_requests,
                "dropped_waiting": self.batcher.dropped, "held": self.gatekeeper.held,
                "refused_busy": self.gatekeeper.refused_busy, "numerics": engine.numerics}

    def _fits(self, texts: list[str], field: str) -> None:
        """A 400 for text that cannot fit max_length whatever it says, before it is tokenised."""
        size = sum(map(len, texts))
        if size > self.max_prompt_chars:
            raise InputError(f"{field}: {size} characters cannot fit this server's max_length of "
                             f"{self.engine.max_length} tokens (at most {self.max_prompt_chars} characters)")

    @api.post("/v1/score")
    async def score(self, body: ScoreRequest) -> dict[str, Any]:
        for i, prompt in enumerate(body.prompts):
            self._fits([prompt], f"prompts.{i}")
        verdicts = await asyncio.to_thread(self.engine.score, body.prompts)
        for verdict in verdicts:
            self.metrics.record("score", verdict)
        return score_body(verdicts)

    @api.post("/v1/chat/completions")
    async def chat(self, body: ChatCompletionRequest) -> Any:
        started = asyncio.get_running_loop().time()
        self._fits([m.content for m in body.messages], "messages")
        request = body.to_request(self.settings)
        encoded = await asyncio.to_thread(self.engine.encode, request.messages)  # 400 before queueing
        await asyncio.to_thread(self.engine.check, request)
        if body.stream:
            return StreamingResponse(self._events(request, encoded), media_type="text/event-stream")
        completion = await self.batcher.complete(request, encoded)
        self.metrics.record("chat", completion.verdict, (asyncio.get_running_loop().time() - started) * 1e3)
        return completion_body(completion, self.model_name)

    async def _events(self, request: ChatRequest, encoded: Any) -> AsyncIterator[str]:
        """Server-sent events: the guard result first (before any token), text deltas, then the finish."""
        stream_id, model = f"chatcmpl-{uuid.uuid4().hex}", self.model_name
        started = asyncio.get_running_loop().time()
        cancel, finished, from_batch = threading.Event(), False, False
        # however the response ends (a disconnect may cancel it while this generator is parked at a yield, and
        # then only garbage collection would close it), its row must stop: set `cancel` when its task ends
        asyncio.current_task().add_done_callback(lambda _: cancel.set())
        try:
            async for item in self.batcher.stream(request, encoded, cancel):
                if isinstance(item, Exception):
                    from_batch = True  # the batcher logged it
                    raise item
                if isinstance(item, Verdict):
                    yield sse(chunk(stream_id, model, {"role": "assistant", "content": ""}, guard=item.to_dict()))
                elif isinstance(item, str):
                    yield sse(chunk(stream_id, model, {"content": item}))
                else:
                    finished = True
                    if item.finish_reason == "content_filter":
                        yield sse(chunk(stream_id, model, {"content": item.text}))
                    self.metrics.record("chat", item.verdict, (asyncio.get_running_loop().time() - started) * 1e3)
                    yield sse(chunk(stream_id, model, {}, item.finish_reason, guard=item.verdict.to_dict(),
                                     usage=usage(item)))
        except Exception as e:  # noqa: BLE001 - the status line is sent: the error goes in the stream
            log.log(logging.DEBUG if from_batch else logging.ERROR, "stream failed: %s", one_line(e),
                    exc_info=not from_batch)
            kind = "invalid_request_error" if isinstance(e, InputError) else "server_error"
            yield sse({"error": {"message": one_line(e), "type": kind}})
        except (asyncio.CancelledError, GeneratorExit):  # the client went away (Serve cancels the request)
            cancel.set()
            if not finished:
                self.metrics.cancelled.inc(tags=self.metrics.tags)
            raise
        yield "data: [DONE]\n\n"


def build_app(settings: ServeSettings) -> serve.Application:
    """The application `guardray serve` runs and a Serve config's `import_path` names (`app_builder`)."""
    actor_options = {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus}
    # The replica's own queue (the Gate) answers 503 in JSON at `held`. Serve's limits sit well beyond it: a
    # replica may be sent twice `held`, and the proxy may keep 4x `held` waiting for assignment (a flood arrives
    # faster than the router hears back from a busy replica); Serve's own plain-text 503 is only for a flood
    # that outruns even that. Each request waiting at the proxy is at most `max_body_bytes`.
    held = settings.max_ongoing_requests + settings.max_queued_requests
    return GuardrayServer.options(
        num_replicas=settings.num_replicas, ray_actor_options=actor_options,
        max_ongoing_requests=2 * held, max_queued_requests=4 * held,
        backpressure_config={"retry_after_s": float(settings.retry_after_s)},
    ).bind(settings.model_dump())


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For `serve run guardray.serve.app:app_builder artifact=...` and `serve deploy cluster/serve.yaml`."""
    return build_app(ServeSettings(**args))
