"""The column contract between the features stage and the stages after it, and the one way to read it.

The features stage writes `parts/part-*.parquet` with the columns in `META_COLUMNS`, the label columns, the guard
scores and one `act_<pooling>_L<layer>` column per activation (a fixed-size list of float16 or float32). A
target's label is a column read as is or an expression over the guard scores (`guardray/targets.py`): either
way it is projected and filtered in the scan. The
probes and report stages never load that table whole: each worker reads ONE feature column (column projection),
of one split (a pushed-down filter), straight into a preallocated float32 matrix, so a process holds one
column's matrix whatever the number of columns or the size of the stage.

This module imports no torch, so probe trials and report tasks never load the GPU stack.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from guardray.errors import InputError
from guardray.shards import PARTS_DIR
from guardray.storage import Location
from guardray.targets import Target

#: A target as resolved (`targets.resolve`), or the name of a label column read as is.
TargetLike = Target | str

META_COLUMNS = ["id", "harmful", "source", "split"]
FEATURE_PREFIX = "act_"
_FEATURE = re.compile(r"^act_(?P<pooling>.+)_L(?P<layer>\d+)$")
#: Rows per batch when streaming a column into its matrix: bounds the Arrow-side copy to a few MB.
READ_BATCH_ROWS = 4096


def feature_column(pooling: str, layer: int) -> str:
    """Public column name of an activation: act_<pooling>_L<layer> with the resolved (non-negative) layer."""
    return f"{FEATURE_PREFIX}{pooling}_L{layer}"


@dataclass(frozen=True)
class FeatureName:
    """The structured identity of a feature column (the inverse of `feature_column`)."""

    pooling: str
    layer: int

    @classmethod
    def parse(cls, column: str) -> "FeatureName":
        m = _FEATURE.match(column)
        if not m:
            raise InputError(f"'{column}' is not a feature column (act_<pooling>_L<layer>)")
        return cls(m.group("pooling"), int(m.group("layer")))


def matrix(table: pa.Table, column: str) -> np.ndarray:
    """A fixed-size-list column as a float32 [rows, dim] array."""
    col = table.column(column).combine_chunks()
    dim = col.type.list_size
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)


def parts_dataset(stage: Location) -> pads.Dataset:
    """The features stage's parts as a lazy Arrow dataset (file order = range order, so row order is fixed)."""
    parts = stage.join(PARTS_DIR)
    parts.refresh()
    return pads.dataset(parts.path, filesystem=parts.fs, format="parquet")


def feature_schema(stage: Location) -> pa.Schema:
    """The parts' schema, from a footer: no rows are read."""
    return parts_dataset(stage).schema


def feature_dims(schema: pa.Schema) -> dict[str, int]:
    """{feature column: width} from the schema."""
    return {f.name: f.type.list_size for f in schema if f.name.startswith(FEATURE_PREFIX)}


@dataclass
class ColumnData:
    """One feature column of some rows as a float32 matrix, with labels and whatever extra columns were asked."""

    x: np.ndarray
    y: np.ndarray
    extra: dict[str, pa.ChunkedArray] = field(default_factory=dict)
    columns_read: tuple[str, ...] = ()


def as_target(target: TargetLike) -> Target:
    return target if isinstance(target, Target) else Target.column(target)


def split_filter(target: TargetLike, split: str | None) -> pc.Expression:
    """Rows with a known `target` label, of `split` when given."""
    known = as_target(target).valid()
    return known if split is None else known & (pc.field("split") == split)


@dataclass(frozen=True)
class _Scan:
    where: pc.Expression
    projection: dict[str, pc.Expression]  # output name → expression: the label is computed in the scan
    dim: int
    filtered_on: tuple[str, ...]


def _scan(dataset: pads.Dataset, column: str | None, target: Target, split: str | None,
          extra: Sequence[str]) -> _Scan:
    if column is not None and column not in dataset.schema.names:
        raise InputError(f"feature column '{column}' not in the features stage")
    projection = {c: pc.field(c) for c in (column, *extra) if c is not None}
    projection = {**({column: projection.pop(column)} if column else {}), target.name: target.expression,
                  **projection}
    dim = dataset.schema.field(column).type.list_size if column else 0
    filtered_on = (*target.needs, *(() if split is None else ("split",)))
    return _Scan(split_filter(target, split), projection, dim, filtered_on)


def column_batches(stage: Location, column: str | None, target: TargetLike, split: str | None = "train",
                   extra: Sequence[str] = ()) -> Iterator[ColumnData]:
    """Stream one column's labelled rows (of `split`, when given) as record batches of `READ_BATCH_ROWS`:
    a scorer keeps its scores and drops the features batch by batch. `x` keeps the stored dtype (float16)."""
    dataset, target = parts_dataset(stage), as_target(target)
    scan = _scan(dataset, column, target, split, extra)
    # little read-ahead: the default (16 batches x 4 files) decodes far more than one batch at a time
    for batch in dataset.to_batches(columns=scan.projection, filter=scan.where, batch_size=READ_BATCH_ROWS,
                                    batch_readahead=2, fragment_readahead=1):
        if batch.num_rows:
            yield _as_data(batch, column, target, scan.dim, extra, scan.filtered_on)


def _as_data(batch: pa.RecordBatch, column: str | None, target: Target, dim: int, extra: Sequence[str],
             filtered_on: tuple[str, ...]) -> ColumnData:
    n = batch.num_rows
    # what the scan returned (a derived label stands for the columns it reads), and what it filtered on
    returned = [c for name in batch.schema.names for c in (target.needs if name == target.name else (name,))]
    touched = tuple(dict.fromkeys([*returned, *filtered_on]))
    x = (batch.column(column).flatten().to_numpy(zero_copy_only=False).reshape(n, dim) if column
         else np.empty((n, 0), np.float32))
    y = batch.column(target.name).to_numpy(zero_copy_only=False).astype(bool)
    return ColumnData(x, y, {c: pa.chunked_array([batch.column(c)]) for c in extra}, touched)


def read_column(stage: Location, column: str | None, target: TargetLike, split: str | None = "train",
                extra: Sequence[str] = ()) -> ColumnData:
    """One column's labelled rows (of `split`, when given) in a preallocated float32 matrix.

    Memory: the matrix plus one record batch. `column=None` reads labels and `extra` only (the guard score).
    `columns_read` lists every column the scan touched (projection and filter), for tests and logs.
    """
    dataset, target = parts_dataset(stage), as_target(target)
    scan = _scan(dataset, column, target, split, extra)
    touched: tuple[str, ...] = ()
    rows = dataset.count_rows(filter=scan.where)
    x = np.empty((rows, scan.dim), dtype=np.float32)
    y = np.empty(rows, dtype=bool)
    extras: dict[str, list[pa.Array]] = {c: [] for c in extra}
    at = 0
    for part in column_batches(stage, column, target, split, extra):
        n, touched = len(part.y), part.columns_read
        x[at:at + n], y[at:at + n] = part.x, part.y
        for c in extra:
            extras[c].extend(part.extra[c].chunks)
        at += n
    if at != rows:
        raise InputError(f"{stage.uri}: the parts changed while being read ({rows} rows counted, {at} read)")
    return ColumnData(x, y, {c: pa.chunked_array(v, type=dataset.schema.field(c).type) for c, v in extras.items()},
                      touched)


def label_counts(stage: Location, target: TargetLike, split: str | None = "train") -> tuple[int, int]:
    """(true, false) counts of `target` in `split`, reading only the label and split columns."""
    data = read_column(stage, None, target, split)
    return int(data.y.sum()), int((~data.y).sum())


def scan_batches(stage: Location, projection: dict[str, pc.Expression],
                 where: pc.Expression | None = None) -> Iterator[pa.RecordBatch]:
    """Every row (matching `where`) of the parts as record batches of `projection` (name → expression, so a
    derived label is computed in the scan), in part order, with the same small read-ahead as `column_batches`."""
    dataset = parts_dataset(stage)
    for batch in dataset.to_batches(columns=projection, filter=where, batch_size=READ_BATCH_ROWS,
                                    batch_readahead=2, fragment_readahead=1):
        if batch.num_rows:
            yield batch


def batch_matrix(batch: pa.RecordBatch, column: str) -> np.ndarray:
    """A fixed-size-list column of one record batch as a [rows, dim] array (stored dtype)."""
    dim = batch.schema.field(column).type.list_size
    return batch.column(column).flatten().to_numpy(zero_copy_only=False).reshape(batch.num_rows, dim)
