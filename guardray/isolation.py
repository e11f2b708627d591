"""Running a model over batches of rows so that one row's failure stays that row's: the one retry loop every
sharded worker (features: chat model and guard; responses: `generate`) runs its batches through.

Three kinds of failure, three answers:

- **out of memory** (`torch.OutOfMemoryError`, "CUDA out of memory", `CUBLAS_STATUS_ALLOC_FAILED`): the batch was
  too big, not wrong. Memory is freed (the failed try's tensors, then the allocator's cache) and the batch is
  split in halves, recursively, down to one row; only a row that cannot fit alone becomes an error row.
- **a row's own error** (a shape, an index): the batch's rows run one by one, so only the failing row is an error.
- **a broken device** (a CUDA error, a device-side assert): the CUDA context is unusable, so the actor must die
  and Ray retries the shard in a fresh one (`DeviceFailure`). The rows in flight are remembered (`CrashMemory`,
  a file beside the parts): on the retry they run one at a time, and a row that broke the device alone becomes
  an error row instead of crashing the actor again, so a bad row costs at most two restarts, never a loop.

Every retry runs outside the `except` block that caught the failure: an exception's traceback holds the frames,
and so the activations, of the failed try; they must be gone before the smaller try allocates.
"""
from __future__ import annotations

import gc
import json
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, TypeVar

from guardray.errors import one_line
from guardray.storage import Location

K = TypeVar("K", bound=Hashable)


class DeviceFailure(RuntimeError):
    """The accelerator itself failed (CUDA error, device-side assert): not the prompt's fault."""


#: Messages of errors after which a CUDA context is unusable for every later batch. Allocation failures are not
#: among them (`is_out_of_memory` is checked first): "CUDA error: out of memory" leaves the context usable.
DEVICE_FAILURE_MARKERS = ("CUDA error", "device-side assert", "NCCL error", "an illegal memory access",
                          "CUBLAS_STATUS_EXECUTION_FAILED", "CUBLAS_STATUS_INTERNAL_ERROR",
                          "CUBLAS_STATUS_NOT_INITIALIZED", "CUBLAS_STATUS_MAPPING_ERROR",
                          "CUDNN_STATUS_EXECUTION_FAILED", "CUDNN_STATUS_INTERNAL_ERROR", "CUDNN_STATUS_MAPPING_ERROR")

#: Messages of allocation failures: the work did not fit, the device is fine.
OUT_OF_MEMORY_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or any(m in str(error) for m in OUT_OF_MEMORY_MARKERS)


def is_device_failure(error: BaseException) -> bool:
    import torch

    if is_out_of_memory(error):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(error, accelerator_error) or any(m in str(error) for m in DEVICE_FAILURE_MARKERS)


def raise_device_failure(error: Exception) -> None:
    """Turn an accelerator failure into DeviceFailure; a bad prompt's error or an allocation failure passes."""
    if is_device_failure(error):
        raise DeviceFailure(f"{type(error).__name__}: {one_line(error)}") from error


def free_accelerator_memory() -> None:
    """Release what a failed try left: reference cycles first, then the CUDA allocator's cached blocks (which a
    smaller try of another shape could not reuse, and which vLLM or a second model beside us cannot see)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class CrashMemory:
    """Rows of the current shard that were running when the device failed, on this or an earlier attempt.

    `suspects` were in a batch that broke the device: they run one at a time. `alone` broke it on their own:
    they become error rows without running. `running` is what is in flight now, saved by the actor (`save`)
    before it dies, and read back (`load`) by whichever actor retries the shard."""

    suspects: set = field(default_factory=set)
    alone: dict = field(default_factory=dict)
    running: list = field(default_factory=list)

    def load(self, where: Location) -> None:
        """Replace the memory with what `where` holds (nothing when no attempt crashed)."""
        saved = json.loads(where.read_text()) if where.exists() else {}
        self.suspects = set(saved.get("suspects", []))
        self.alone = {row: reason for row, reason in saved.get("alone", [])}
        self.running = []

    def save(self, where: Location, reason: str) -> None:
        """Record the rows in flight at a device failure: a lone row is to blame, a batch's rows are suspects."""
        alone = dict(self.alone)
        if len(self.running) == 1:
            alone[self.running[0]] = reason
        suspects = (self.suspects | set(self.running)) - set(alone)
        where.write_text(json.dumps({"suspects": sorted(suspects), "alone": sorted(alone.items())}))


@dataclass
class _Failed:
    """What is kept of a failed try: its kind and reason, never the exception (its traceback pins tensors)."""

    out_of_memory: bool
    reason: str


def _attempt(run: Callable[[list[K]], None], rows: list[K]) -> _Failed | None:
    try:
        run(rows)
    except Exception as e:  # noqa: BLE001 - isolate the row that fails
        raise_device_failure(e)
        return _Failed(is_out_of_memory(e), f"{type(e).__name__}: {one_line(e)}")
    return None


def run_isolating(batches: Iterable[list[K]], run: Callable[[list[K]], None], errors: dict[K, str], what: str,
                  crashes: CrashMemory | None = None, free: Callable[[], None] = free_accelerator_memory) -> None:
    """`run` each batch of rows; a failing batch is split (halves on out of memory, single rows otherwise)
    until every row has run or is an error of its own ("<what>: <reason>" in `errors`). An accelerator failure
    is never a row's fault: it is raised as DeviceFailure, with the rows in flight in `crashes.running`."""
    crashes = crashes if crashes is not None else CrashMemory()
    for batch in batches:
        todo = [row for row in batch if row not in crashes.alone]
        for row in batch:
            if row in crashes.alone:
                errors[row] = f"{what}: skipped: it broke the device when run alone ({crashes.alone[row]})"
        # suspects of an earlier crash run one at a time, after their batch's other rows
        stack = [[row] for row in reversed(todo) if row in crashes.suspects]
        rest = [row for row in todo if row not in crashes.suspects]
        stack += [rest] if rest else []
        while stack:
            rows = stack.pop()
            crashes.running = rows
            failed = _attempt(run, rows)
            crashes.running = []
            if failed is None:
                continue
            free()  # outside the except block: the failed try's frames and tensors are gone by now
            if len(rows) == 1:
                reason = "out of memory even alone: " if failed.out_of_memory else ""
                errors[rows[0]] = f"{what}: {reason}{failed.reason}"
            elif failed.out_of_memory:
                half = len(rows) // 2
                stack += [rows[half:], rows[:half]]  # the first half runs first
            else:
                stack += [[row] for row in reversed(rows)]
