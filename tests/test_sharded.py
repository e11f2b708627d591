"""The sharded machinery's driver side: the error budget, which errors count as a broken device, the retry that
isolates a failing row, and `drain` (the tally, the progress line, stopping once the budget is spent)."""
from __future__ import annotations

from typing import Any, Iterator

import pytest
import torch

from guardray.errors import StageError
from guardray.isolation import DeviceFailure, raise_device_failure, run_isolating
from guardray.sharded import ErrorBudget, drain
from guardray.shards import Shard


def test_error_budget_counts_and_names_the_first_reasons() -> None:
    budget = ErrorBudget(total=1000, fraction=0.01)
    budget.add(10, ["render: ValueError: bad", ""])
    assert budget.allowed == 10 and not budget.exceeded
    budget.add(1, ["activations: IndexError: index out of range", "x", "y"])
    assert budget.exceeded
    message = budget.message()
    assert "11 of 1000 prompts failed" in message and "budget of 10" in message
    assert "render: ValueError: bad; activations: IndexError" in message


def test_device_failures_are_not_bad_prompts() -> None:
    raise_device_failure(IndexError("index out of range in self"))  # a bad prompt: passes through
    raise_device_failure(ValueError("too long"))
    for message in ("CUDA error: device-side assert triggered", "CUDA error: an illegal memory access was encountered",
                    "CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"):
        with pytest.raises(DeviceFailure, match="RuntimeError"):
            raise_device_failure(RuntimeError(message))
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None:
        with pytest.raises(DeviceFailure):
            raise_device_failure(accelerator_error("an accelerator failed"))


def test_a_failing_row_is_isolated_and_its_neighbours_are_kept() -> None:
    done: list[int] = []
    errors: dict[int, str] = {}

    def run(rows: list[int]) -> None:
        if 3 in rows:
            raise ValueError(f"row 3 is bad (of {len(rows)})")
        done.extend(rows)

    run_isolating([[0, 1], [2, 3, 4], [5]], run, errors, "render")
    assert done == [0, 1, 2, 4, 5] and errors == {3: "render: ValueError: row 3 is bad (of 1)"}


def test_a_device_failure_is_never_a_rows_error() -> None:
    def run(rows: list[int]) -> None:
        raise RuntimeError("CUDA error: device-side assert triggered")

    errors: dict[int, str] = {}
    with pytest.raises(DeviceFailure):
        run_isolating([[0, 1]], run, errors, "activations")
    assert errors == {}


def _summary(start: int, end: int, errors: int = 0, tokens: int = 10) -> dict[str, Any]:
    return {"start": start, "end": end, "rows": end - start - errors, "errors": errors, "tokens": tokens,
            "seconds": 0.1, "node_id": "n1", "device": "cpu", "gpu_ids": "",
            "first_error": "render: ValueError: x" if errors else ""}


def test_drain_tallies_shards_and_prints_the_progress_line(ray_local: None, capsys: pytest.CaptureFixture[str]) -> None:
    todo = [Shard(8, 12), Shard(12, 16)]
    budget = ErrorBudget(total=16, fraction=0.5, stage="features")
    tally = drain("features", iter([_summary(8, 12, errors=1), _summary(12, 16)]), budget, todo, done=2)
    assert (tally.shards, tally.processed, tally.tokens) == (2, 8, 20) and tally.devices == {"cpu": 2}
    assert budget.failed == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("features  12/16 prompts  1 errors")  # 8 prompts of an earlier run, then 4
    assert lines[-1].startswith("features  16/16 prompts  1 errors") and " in " in lines[-1]


def test_drain_stops_once_the_budget_is_spent_and_closes_the_pool(ray_local: None) -> None:
    closed: list[bool] = []

    def shards() -> Iterator[dict[str, Any]]:
        try:
            yield _summary(0, 4, errors=3)
            yield _summary(4, 8)  # never reached: the run stops after the first shard
        finally:
            closed.append(True)

    budget = ErrorBudget(total=8, fraction=0.25, stage="responses", section="generate")
    with pytest.raises(StageError, match=r"responses: 3 of 8 prompts failed.*generate.max_error_fraction=0.25"):
        drain("responses", shards(), budget, [Shard(0, 4), Shard(4, 8)], done=0)
    assert closed == [True]


def test_an_actors_device_error_reaches_the_driver_as_one_line(ray_local: None) -> None:
    def shards() -> Iterator[dict[str, Any]]:
        raise RuntimeError("ActorDiedError: ... Traceback ...\nDeviceError: node n1: Ray assigned GPU [0] but torch "
                           "sees no CUDA device\n  more traceback")
        yield {}

    with pytest.raises(StageError) as error:
        drain("features", shards(), ErrorBudget(total=4, fraction=0.0), [Shard(0, 4)], done=0)
    assert str(error.value) == "features: node n1: Ray assigned GPU [0] but torch sees no CUDA device"


def test_pipelined_reads_ahead_and_writes_behind_the_compute_and_finishes_everything() -> None:
    """While item k computes, item k-1's finish (the part write) and item k+1's read run on the I/O thread: the
    compute of item 1 waits until item 0's finish and item 2's read have started, which a sequential loop never
    allows (it would time out). Results come back in order, all finished; an error in a finish is raised."""
    import threading

    from guardray.sharded import pipelined

    started = {name: threading.Event() for name in ("finish 0", "read 2")}
    log: list[str] = []

    def read(item: int) -> int:
        log.append(f"read {item}")
        if f"read {item}" in started:
            started[f"read {item}"].set()
        return item * 10

    def compute(item: int, data: int) -> int:
        if item == 1:
            assert started["finish 0"].wait(5) and started["read 2"].wait(5), "no overlap with the I/O thread"
        return data + 1

    def finish(value: int) -> str:
        if value == 1:
            started["finish 0"].set()
        log.append(f"finish {value}")
        return f"done {value}"

    assert pipelined([0, 1, 2], read, compute, finish) == ["done 1", "done 11", "done 21"]
    assert log.index("read 1") < log.index("finish 1")  # read-ahead of item 1 before item 0 is written
    assert pipelined([], read, compute, finish) == []

    def broken(value: int) -> str:
        raise OSError(f"disk full writing {value}")

    with pytest.raises(OSError, match="disk full writing 1"):
        pipelined([0, 1], read, compute, broken)
