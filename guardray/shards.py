"""Row-range shards of the dataset: the unit of work, of output and of resume for the features stage.

A shard is a half-open row range `[start, end)` of the dataset stage's `dataset.parquet`, whose row order is
fixed by the dataset stage's hash. Its output is named after the range (`part-<start>-<end>.parquet`, plus
`errors-<start>-<end>.parquet` for the prompts that failed), so what a file holds never depends on a setting
outside the stage hash: a resume with another `rows_per_shard` keeps the finished ranges and cuts only the gaps.

Workers read their own rows (`RangeReader`: only the row groups that cover the range, only the columns asked
for), so prompts never pass through the driver. `verify_parts` is the exactly-once check, run in Ray tasks
(not on the driver): for every part it checks that the ids in the part and its errors file are exactly the dataset's ids
of that range, once each. The driver then only checks that the verified ranges tile `[0, rows)`.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from guardray.columns import ERRORS_SCHEMA, ID, PARTS_DIR, REASON
from guardray.errors import one_line
from guardray.storage import Location, resolve

ERRORS_DIR = "errors"
_PART = re.compile(r"^part-(\d{12})-(\d{12})\.parquet$")
#: Verification tasks each take this many parts (a few MB of ids), so a 10M-row stage is ~100 small tasks.
PARTS_PER_CHECK = 512


@dataclass(frozen=True, order=True)
class Shard:
    """Rows `[start, end)` of the dataset."""

    start: int
    end: int

    @property
    def rows(self) -> int:
        return self.end - self.start

    @property
    def part_name(self) -> str:
        return f"part-{self.start:012d}-{self.end:012d}.parquet"

    @property
    def errors_name(self) -> str:
        return f"errors-{self.start:012d}-{self.end:012d}.parquet"

    @classmethod
    def from_part_name(cls, name: str) -> "Shard | None":
        m = _PART.match(name)
        return cls(int(m.group(1)), int(m.group(2))) if m else None


def footer(location: Location) -> pq.FileMetaData:
    """A parquet file's footer (row count, row groups, schema) without reading its rows."""
    location.refresh()
    with location.fs.open_input_file(location.path) as f:
        return pq.ParquetFile(f).metadata


def dataset_rows(dataset: Location) -> int:
    """Row count from the parquet footer: the driver never reads the rows themselves."""
    return footer(dataset).num_rows


def finished_shards(out: Location) -> list[Shard]:
    """Ranges whose part file exists (not yet verified), sorted; stray names are ignored."""
    shards = [Shard.from_part_name(n) for n in out.join(PARTS_DIR).list(".parquet")]
    return sorted(s for s in shards if s is not None)


def gaps(done: Sequence[Shard], total: int) -> list[Shard]:
    """The ranges of `[0, total)` not covered by `done` (sorted, non-overlapping)."""
    missing, cursor = [], 0
    for shard in done:
        if shard.start > cursor:
            missing.append(Shard(cursor, shard.start))
        cursor = max(cursor, shard.end)
    if cursor < total:
        missing.append(Shard(cursor, total))
    return missing


def plan_shards(done: Sequence[Shard], total: int, rows_per_shard: int) -> list[Shard]:
    """The shards still to run: every gap cut on the grid of multiples of `rows_per_shard`, so shards line up
    with the dataset's row groups (1,024 rows) when one size divides the other."""
    todo = []
    for gap in gaps(done, total):
        first_cut = (gap.start // rows_per_shard + 1) * rows_per_shard
        cuts = [gap.start, *range(first_cut, gap.end, rows_per_shard), gap.end]
        todo.extend(Shard(a, b) for a, b in zip(cuts, cuts[1:]))
    return todo


def tiling_problem(shards: Sequence[Shard], total: int) -> str | None:
    """Why sorted `shards` do not cover `[0, total)` exactly once, or None when they do."""
    cursor = 0
    for shard in shards:
        if shard.start != cursor:
            kind = "overlap" if shard.start < cursor else "gap"
            return f"{kind} at row {min(cursor, shard.start)} (next part starts at {shard.start})"
        cursor = shard.end
    return None if cursor == total else f"parts end at row {cursor}, the dataset has {total} rows"


def overlap_problem(shards: Sequence[Shard]) -> str | None:
    """Why sorted `shards` overlap, or None (gaps are fine: they are what a resume still has to run)."""
    for before, after in zip(shards, shards[1:]):
        if after.start < before.end:
            return f"{before.part_name} and {after.part_name}"
    return None


class RangeReader:
    """Reads row ranges of one parquet file, decoding only the row groups that overlap each range."""

    def __init__(self, location: Location):
        location.refresh()
        self._file = pq.ParquetFile(location.fs.open_input_file(location.path))  # kept open for the actor's reads
        sizes = [self._file.metadata.row_group(i).num_rows for i in range(self._file.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()

    @property
    def schema(self) -> pa.Schema:
        return self._file.schema_arrow

    def read(self, shard: Shard, columns: list[str] | None = None) -> pa.Table:
        first = bisect.bisect_right(self._starts, shard.start) - 1
        last = bisect.bisect_left(self._starts, shard.end)
        table = self._file.read_row_groups(list(range(first, last)), columns=columns)
        return table.slice(shard.start - self._starts[first], shard.rows)


@dataclass(frozen=True)
class PartCheck:
    """What `verify_parts` found for one part: its counts, or why it cannot be trusted."""

    shard: Shard
    rows: int = 0
    errors: int = 0
    problem: str | None = None
    first_reasons: tuple[str, ...] = ()
    numerics: str = ""  # the part's NUMERICS_KEY metadata: what its activations were computed with


#: Parquet schema metadata key of every part: JSON of the device, dtype, attention and guard backend that
#: computed it, as resolved on the actor. A stage directory must not mix numerics across parts.
NUMERICS_KEY = b"guardray.numerics"


def verify_parts(dataset_uri: str, out_uri: str, shards: Sequence[Shard]) -> tuple[list[PartCheck], pa.Table]:
    """Check each shard's part + errors files against the dataset's ids of that range (runs in a Ray task).

    Also returns the good shards' error rows, so the driver can merge `errors.parquet` without reading every
    errors file itself (their size is bounded by the error budget)."""
    dataset, out = resolve(dataset_uri), resolve(out_uri)
    reader = RangeReader(dataset)
    checks, errors = [], []
    for shard in shards:
        check, error_rows = _check_one(reader, out, shard)
        checks.append(check)
        if error_rows is not None and error_rows.num_rows:
            errors.append(error_rows)
    return checks, pa.concat_tables(errors) if errors else ERRORS_SCHEMA.empty_table()


def _check_one(reader: RangeReader, out: Location, shard: Shard) -> tuple[PartCheck, pa.Table | None]:
    try:
        part = out.join(PARTS_DIR, shard.part_name).read_table(columns=[ID])
        errors = out.join(ERRORS_DIR, shard.errors_name).read_table().select(ERRORS_SCHEMA.names).cast(ERRORS_SCHEMA)
    except (FileNotFoundError, pa.ArrowInvalid) as e:  # truncated, half-written by an old run, or no errors file
        return PartCheck(shard, problem=f"unreadable: {type(e).__name__}: {one_line(e, 200)}"), None
    # Any other error (a network error from GCS) fails the task, which Ray retries: never delete a good part.
    written = np.concatenate([part.column(ID).to_numpy(zero_copy_only=False),
                              errors.column(ID).to_numpy(zero_copy_only=False)])
    expected = reader.read(shard, [ID]).column(ID).to_numpy(zero_copy_only=False)
    if len(written) != len(expected) or not np.array_equal(np.sort(written), np.sort(expected)):
        return PartCheck(shard, problem=f"holds {len(written)} ids that are not the range's {len(expected)}"), None
    reasons = tuple(errors.column(REASON).slice(0, 3).to_pylist())
    numerics = (part.schema.metadata or {}).get(NUMERICS_KEY, b"").decode()
    return PartCheck(shard, rows=part.num_rows, errors=errors.num_rows, first_reasons=reasons,
                     numerics=numerics), errors


def verify_all(dataset: Location, out: Location, shards: Sequence[Shard]) -> Iterator[tuple[list[PartCheck], pa.Table]]:
    """`verify_parts` over many shards as Ray tasks (one per PARTS_PER_CHECK parts), results as they finish."""
    import ray

    task = ray.remote(num_cpus=0.5, max_retries=3, retry_exceptions=True)(verify_parts)
    pending = [task.remote(dataset.uri, out.uri, list(shards[i : i + PARTS_PER_CHECK]))
               for i in range(0, len(shards), PARTS_PER_CHECK)]
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        yield ray.get(ready[0])


def part_schema(out: Location, shard: Shard) -> list[str]:
    return footer(out.join(PARTS_DIR, shard.part_name)).schema.to_arrow_schema().names


def as_descriptors(shards: Sequence[Shard]) -> list[dict[str, Any]]:
    return [{"start": s.start, "end": s.end} for s in shards]
