"""Row-range shards: planning around finished parts, the tiling check, ranged reads across row groups, the error
budget and which errors count as a broken device."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from guardray.sharded import DeviceFailure, ErrorBudget, raise_device_failure
from guardray.shards import RangeReader, Shard, gaps, overlap_problem, plan_shards, tiling_problem
from guardray.storage import resolve


def test_plan_cuts_only_the_gaps_between_finished_ranges() -> None:
    done = [Shard(0, 4), Shard(8, 12)]
    assert gaps(done, 15) == [Shard(4, 8), Shard(12, 15)]
    assert plan_shards(done, 15, 3) == [Shard(4, 6), Shard(6, 8), Shard(12, 15)]  # cut on the grid 3, 6, 9...
    assert plan_shards([], 5, 10) == [Shard(0, 5)] and plan_shards([Shard(0, 5)], 5, 2) == []


def test_tiling_and_overlap_problems() -> None:
    assert tiling_problem([Shard(0, 4), Shard(4, 9)], 9) is None
    assert "gap at row 4" in tiling_problem([Shard(0, 4), Shard(5, 9)], 9)
    assert "overlap" in tiling_problem([Shard(0, 4), Shard(3, 9)], 9)
    assert "dataset has 10 rows" in tiling_problem([Shard(0, 4), Shard(4, 9)], 10)
    assert overlap_problem([Shard(0, 4), Shard(6, 9)]) is None  # a gap is what a resume still runs
    assert overlap_problem([Shard(0, 4), Shard(3, 9)]) is not None
    assert Shard.from_part_name(Shard(12, 40).part_name) == Shard(12, 40)
    assert Shard.from_part_name("part-00003.parquet") is None  # the old naming is never trusted


def test_range_reads_span_row_groups(tmp_path: Path) -> None:
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(100)], "x": list(range(100))}), path, row_group_size=7)
    reader = RangeReader(resolve(str(path)))
    for start, end in [(0, 1), (0, 7), (5, 9), (6, 22), (13, 100), (99, 100), (49, 50)]:
        table = reader.read(Shard(start, end), ["id"])
        assert table.column_names == ["id"]
        assert table.column("id").to_pylist() == [f"r{i}" for i in range(start, end)]


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
