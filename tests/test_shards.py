"""Row-range shards: planning around finished parts, the tiling check, ranged reads across row groups (the error
budget and device failures: tests/test_sharded.py)."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

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
