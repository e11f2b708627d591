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
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from starlette.concurrency import iterate_in_threadpool

from guardray.errors import one_line
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
        self.arrived = asyncio.Event()
        self.loop_task: asyncio.Task | None = None
        self.batches = 0  # generate calls made, and the requests they answered: /health's mean batch size
        self.batched_requests = 0

    async def complete(self, request: ChatRequest, encoded: Any) -> Completion:
        """The request's Completion, answered in a batch."""
        waiting = _Waiting(request, encoded, False, future=asyncio.get_running_loop().create_future())
        self._enqueue(waiting)
        return await waiting.future

    async def stream(self, request: ChatRequest, encoded: Any, cancel: threading.Event) -> AsyncIterator[Any]:
        """The request's stream items (Verdict, text pieces, Completion, or an Exception), answered in a batch.
        Setting `cancel` drops it if its batch has not started, or ends its row at the next decoding step."""
        waiting = _Waiting(request, encoded, True, items=asyncio.Queue(), cancel=cancel)
        self._enqueue(waiting)
        while (item := await waiting.items.get()) is not _END:
            yield item

    def _enqueue(self, waiting: _Waiting) -> None:
        if self.loop_task is None or self.loop_task.done():
            self.loop_task = asyncio.get_running_loop().create_task(self._run_forever())
        self.waiting.append(waiting)
        self.arrived.set()

    async def _run_forever(self) -> None:
        idle = True
        while True:
            if not self.waiting:
                self.arrived.clear()
                await self.arrived.wait()
                idle = True
            if idle and self.wait_s > 0 and len(self.waiting) < self.max_batch_size:
                await asyncio.sleep(self.wait_s)  # an idle model waits briefly for company
            batch = self._take()
            idle = False
            if batch:
                self.batches += 1
                self.batched_requests += len(batch)
                await (self._stream_batch(batch) if batch[0].streamed else self._complete_batch(batch))

    def _take(self) -> list[_Waiting]:
        """The oldest waiting request's kind and group, up to max_batch_size of them; the gone are dropped."""
        for gone in [w for w in self.waiting if w.gone]:
            self.waiting.remove(gone)
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
                                                      [w.encoded for w in batch])
        except Exception as e:  # noqa: BLE001 - each request of the batch gets it
            log.exception("generate failed for %d requests: %s", len(batch), one_line(e))
            done = [e] * len(batch)
        for waiting, result in zip(batch, done):
            if not waiting.future.done():
                (waiting.future.set_exception if isinstance(result, Exception) else waiting.future.set_result)(result)

    async def _stream_batch(self, batch: list[_Waiting]) -> None:
        try:
            stream = self.engine.stream_many([w.request for w in batch], [w.encoded for w in batch],
                                             [w.cancel for w in batch])
            async for per_row in iterate_in_threadpool(stream):
                for waiting, items in zip(batch, per_row):
                    for item in items:
                        waiting.items.put_nowait(item)
        except Exception as e:  # noqa: BLE001 - each stream of the batch gets it as its last item
            log.exception("streamed generate failed for %d requests: %s", len(batch), one_line(e))
            for waiting in batch:
                waiting.items.put_nowait(e)
        finally:
            for waiting in batch:
                waiting.items.put_nowait(_END)
