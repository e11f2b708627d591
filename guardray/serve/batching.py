"""Batches chat requests for a model that answers a whole batch in one `generate` call and is busy for seconds.

Why not `@serve.batch`: Ray Serve closes a batch `batch_wait_timeout_s` after its first request whether or not
the previous batch is still running (Ray 2.60 `_BatchQueue._process_batches` forms batches and only then waits
for the concurrency permit). With generations that take seconds, requests that arrive during one are cut into
10 ms batches that then run one after another, so under steady load batches stay small. Here the waiting
requests are taken when the model is free: every request that arrived during a generate joins the next one
(up to `max_batch_size`), and only an idle model waits `wait_s` for company.

A batch holds requests of one kind (streamed or not) and one `ChatRequest.group` (the same decoding settings),
oldest first. A request whose caller went away before its batch started (a cancelled future, a set `cancel`
event) is dropped. Errors of a batch go to each of its requests; the loop goes on.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from starlette.concurrency import iterate_in_threadpool

from guardray.errors import InputError, one_line
from guardray.serve.engine import ChatRequest, Completion, GuardedChatModel

log = logging.getLogger(__name__)

_END = object()  # closes a stream's queue


@dataclass
class _Waiting:
    request: ChatRequest
    encoded: Any
    streamed: bool
    future: asyncio.Future | None = None  # a completion's answer
    items: asyncio.Queue | None = None  # a stream's items, then _END
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.streamed, self.request.group())

    @property
    def gone(self) -> bool:
        return self.cancel.is_set() or (self.future is not None and self.future.done())


class DrainingBatcher:
    """Collects requests while the engine is busy and hands it the waiting ones each time it is free."""

    def __init__(self, engine: GuardedChatModel, max_batch_size: int, wait_s: float):
        self.engine, self.max_batch_size, self.wait_s = engine, max_batch_size, wait_s
        self.waiting: list[_Waiting] = []
        self.arrived, self.full = asyncio.Event(), asyncio.Event()
        self.loop_task: asyncio.Task | None = None
        self.batches = 0  # generate calls made, and the requests they answered: /health's mean batch size
        self.batched_requests = 0
        self.dropped = 0  # requests whose caller went away before their batch started

    async def complete(self, request: ChatRequest, encoded: Any) -> Completion:
        """The request's Completion, answered in a batch. A caller that goes away (its task is cancelled)
        leaves the queue, or ends its row at the next decoding step."""
        waiting = _Waiting(request, encoded, False, future=asyncio.get_running_loop().create_future())
        self._enqueue(waiting)
        try:
            return await waiting.future
        except asyncio.CancelledError:
            waiting.cancel.set()
            self._discard(waiting)
            raise

    async def stream(self, request: ChatRequest, encoded: Any, cancel: threading.Event) -> AsyncIterator[Any]:
        """The request's stream items (Verdict, text pieces, Completion, or an Exception), answered in a batch.
        Setting `cancel` drops it if its batch has not started, or ends its row at the next decoding step."""
        waiting = _Waiting(request, encoded, True, items=asyncio.Queue(), cancel=cancel)
        self._enqueue(waiting)
        try:
            while (item := await waiting.items.get()) is not _END:
                yield item
        finally:
            self._discard(waiting)

    def _enqueue(self, waiting: _Waiting) -> None:
        if self.loop_task is None or self.loop_task.done():
            # a context of its own: the loop outlives the request that started it (Serve keeps per-request
            # context in contextvars, and a task copies the creator's)
            loop = asyncio.get_running_loop()
            self.loop_task = loop.create_task(self._run_forever(), context=contextvars.Context())
            self.loop_task.add_done_callback(self._loop_ended)
        self.waiting.append(waiting)
        self.arrived.set()
        if sum(w.key == self.waiting[0].key for w in self.waiting) >= self.max_batch_size:
            self.full.set()  # the next batch is full: an idle wait can end

    def _discard(self, waiting: _Waiting) -> None:
        """Forget a request whose caller went away before its batch took it."""
        if waiting in self.waiting:
            self.waiting.remove(waiting)
            self.dropped += 1

    async def _run_forever(self) -> None:
        idle = True
        while True:
            if not self.waiting:
                self.arrived.clear()
                await self.arrived.wait()
                idle = True
            if idle and self.wait_s > 0 and len(self.waiting) < self.max_batch_size:
                self.full.clear()
                with contextlib.suppress(asyncio.TimeoutError):  # an idle model waits briefly for company
                    await asyncio.wait_for(self.full.wait(), self.wait_s)
            batch = self._take()
            idle = False
            if not batch:
                continue
            self.batches += 1
            self.batched_requests += len(batch)
            try:
                await (self._stream_batch(batch) if batch[0].streamed else self._complete_batch(batch))
            except Exception:  # noqa: BLE001 - the batch's requests got it; the loop serves the next ones
                log.exception("batch of %d requests failed", len(batch))

    def _loop_ended(self, task: asyncio.Task) -> None:
        """The loop ends only when cancelled (the replica is shutting down) or on a bug: fail what still waits."""
        error = None if task.cancelled() else task.exception()
        if error is not None:
            log.error("the batching loop failed: %s", one_line(error))
        for waiting in self.waiting:
            _fail(waiting, RuntimeError(f"the batching loop ended: {one_line(error) if error else 'cancelled'}"))
        self.waiting.clear()

    def _take(self) -> list[_Waiting]:
        """The oldest waiting request's kind and group, up to max_batch_size of them; the gone are dropped."""
        for gone in [w for w in self.waiting if w.gone]:
            self._discard(gone)
            if gone.items is not None:
                gone.items.put_nowait(_END)
        if not self.waiting:
            return []
        key = self.waiting[0].key
        batch = [w for w in self.waiting if w.key == key][:self.max_batch_size]
        for taken in batch:
            self.waiting.remove(taken)
        return batch

    async def _complete_batch(self, batch: list[_Waiting]) -> None:
        try:
            done: list[Any] = await asyncio.to_thread(self.engine.complete, [w.request for w in batch],
                                                      [w.encoded for w in batch], [w.cancel for w in batch])
        except Exception as e:  # noqa: BLE001 - each request of the batch gets it
            _log_failure(e, len(batch))
            done = [e] * len(batch)
        except BaseException as e:  # the loop is cancelled (the replica stops): fail the batch, stop the loop
            for waiting in batch:
                _fail(waiting, RuntimeError(f"generate ended by {type(e).__name__}"))
            raise
        for waiting, result in zip(batch, done, strict=True):
            if isinstance(result, Exception):
                _fail(waiting, result)
            elif not waiting.future.done():
                waiting.future.set_result(result)

    async def _stream_batch(self, batch: list[_Waiting]) -> None:
        try:
            stream = self.engine.stream_many([w.request for w in batch], [w.encoded for w in batch],
                                             [w.cancel for w in batch])
            async for per_row in iterate_in_threadpool(stream):
                for waiting, items in zip(batch, per_row, strict=True):
                    for item in items:
                        waiting.items.put_nowait(item)
        except Exception as e:  # noqa: BLE001 - each stream of the batch gets it as its last item
            _log_failure(e, len(batch))
            for waiting in batch:
                waiting.items.put_nowait(e)
        finally:
            for waiting in batch:
                waiting.items.put_nowait(_END)


def _fail(waiting: _Waiting, error: Exception) -> None:
    if waiting.future is not None and not waiting.future.done():
        waiting.future.set_exception(error)
    if waiting.items is not None:
        waiting.items.put_nowait(error)
        waiting.items.put_nowait(_END)


def _log_failure(error: BaseException, size: int) -> None:
    """A request the engine refused (InputError: the client's 400) in one line; anything else with its trace."""
    if isinstance(error, InputError):
        log.info("a batch of %d requests was refused: %s", size, one_line(error))
    else:
        log.error("generate failed for %d requests: %s", size, one_line(error), exc_info=error)
