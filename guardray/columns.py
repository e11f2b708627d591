"""The column contract between the stages, and the one way to read the features stage's parts.

Every column name and prefix a stage writes or reads is defined here, once: the dataset's meta columns, the
responses stage's columns, the features stage's activation (`act_<pooling>_L<layer>`), guard (`guard_*`) and
flag columns, the label columns (`harmful`, `cat_<name>`), and the error files' columns. So is the pooling table
(name → what it reads and which positions it pools), which drives the activation capture
(`guardray.activations`), the spec's choices (`extract.poolings`) and what a server may run.

An activation column carries its layer and pooling in its parquet *field metadata* (`feature_field`), written by
the features stage; readers take them from there (`feature_info`), never from the name. Each stage checks the
columns it needs at its input with `require`, which names the missing ones in one line.

The features stage writes `parts/part-*.parquet` with the columns in `META_COLUMNS`, the label columns, the
guard scores and one activation column per (pooling, layer) (a fixed-size list of float16 or float32). A
target's label (`Target`) is a column read as is or an expression over the guard scores (`guardray/targets.py`
derives those): either way it is projected and filtered in the scan. The probes and report stages never load
that table whole: each worker reads ONE feature column (column projection), of one split (a pushed-down
filter), straight into a preallocated float32 matrix, so a process holds one column's matrix whatever the
number of columns or the size of the stage.

This module imports nothing of guardray but `errors` (the spec imports its pooling names: a leaf, with no way
back to the spec, targets or probes), and no torch, so probe trials and report tasks never load the GPU stack.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from guardray.errors import InputError

if TYPE_CHECKING:  # annotations only: the spec imports this module, so it stays light
    import pyarrow.dataset as pads

    from guardray.storage import Location

# ------------------------------------------------------------------------------------------ column names
#: The dataset stage's columns, carried by every stage after it (the features parts drop the prompt).
ID, PROMPT, HARMFUL, SOURCE, SPLIT = "id", "prompt", "harmful", "source", "split"
DATASET_COLUMNS = [ID, PROMPT, HARMFUL, SOURCE, SPLIT]
META_COLUMNS = [ID, HARMFUL, SOURCE, SPLIT]
#: A conversation source's dataset columns: the whole chat, and the label of a given reply (`RESPONSE`).
MESSAGES, RESPONSE_HARMFUL = "messages", "response_harmful"
#: The responses stage's columns (added to the dataset's).
RESPONSE, RESPONSE_TOKENS, FINISH_REASON = "response", "response_tokens", "finish_reason"
#: The features stage's per-row flags: tokens rendered, and whether the prompt was cut at `max_length`.
N_TOKENS, TRUNCATED = "n_tokens", "truncated"
#: How many of a conversation row's oldest turns the features stage left out to fit `max_length` (parts of a
#: dataset with conversations only).
DROPPED_TURNS = "dropped_turns"
#: A conversation row's context as given (parts of a dataset with conversations only): the turns before its last
#: user turn, and whether it has a persona (a system turn of its own). The report reads results by them.
HISTORY_TURNS, PERSONA = "history_turns", "persona"
#: Boolean columns of the parts that are flags, not labels.
NOT_LABELS = frozenset({TRUNCATED, PERSONA})
#: A stage's `errors/` files and `errors.parquet`: the row that failed and why.
REASON = "reason"
ERRORS_SCHEMA = pa.schema([(ID, pa.string()), (SOURCE, pa.string()), (REASON, pa.string())])
#: Where a sharded stage's parts (its rows, in this contract) live under the stage directory.
PARTS_DIR = "parts"

#: Activation columns: `act_<pooling>_L<layer>`, layer and pooling also in the field's metadata.
FEATURE_PREFIX = "act_"
#: Label columns of a harm category: `cat_<name>`.
CATEGORY_PREFIX = "cat_"
#: Guard columns: what the guard judged → the prefix its columns carry (`guard_score`, `guard_response_score`).
GUARD_PREFIX = "guard_"
GUARD_PREFIXES = {"prompt": GUARD_PREFIX, "response": "guard_response_"}
GUARD_LOGIT_SAFE, GUARD_LOGIT_UNSAFE = "guard_logit_safe", "guard_logit_unsafe"
GUARD_SCORE, GUARD_P_UNSAFE = "guard_score", "guard_p_unsafe"
#: The four verdict columns of a guard judging prompts, in the order it writes them.
GUARD_COLUMNS = (GUARD_LOGIT_SAFE, GUARD_LOGIT_UNSAFE, GUARD_SCORE, GUARD_P_UNSAFE)
#: Per-category guard scores: `guard_cat_<code>`.
GUARD_CATEGORY_PREFIX = "guard_cat_"


def judged_column(name: str, judge: str) -> str:
    """A `guard_*` column's name for what the guard judged: `guard_score` → `guard_response_score`."""
    return GUARD_PREFIXES[judge] + name.removeprefix(GUARD_PREFIX)


GUARD_RESPONSE_SCORE = judged_column(GUARD_SCORE, "response")


def guard_category_column(code: str) -> str:
    """The guard's score of one policy code: S1 → guard_cat_S1."""
    return GUARD_CATEGORY_PREFIX + code


def category_column(name: str) -> str:
    """The label column a category's name stands for: 'Political persuasion' → cat_political_persuasion."""
    return CATEGORY_PREFIX + re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# ------------------------------------------------------------------------------------------ pooling table
@dataclass(frozen=True)
class Pooling:
    """How an activation column pools one block's output over a row's positions.

    `reads`: which rendering the forward pass runs on: 'prompt' (the chat up to the generation prompt) or
    'response' (the prompt and its response as one chat, whose user span is the response). `positions`: which
    positions are pooled, the key of its function in `guardray.activations.POOL_FUNCTIONS` ('last': the last
    non-pad token; 'span': the mean over the user span; 'span_end': the span's last token; 'span_max': the
    per-dimension max over the user span; 'span_ema': the mean over the user span weighted by
    `EMA_HALF_LIFE_TOKENS` back from its last token; 'all': the mean over every non-pad token)."""

    reads: Literal["prompt", "response"]
    positions: Literal["last", "span", "span_end", "span_max", "span_ema", "all"]


#: Every pooling: name → what it reads and which positions. Adding one is one entry here and, for new
#: positions, one function in `guardray.activations.POOL_FUNCTIONS`.
POOLINGS: dict[str, Pooling] = {
    "last": Pooling("prompt", "last"),
    "mean": Pooling("prompt", "span"),
    "mean_all": Pooling("prompt", "all"),
    "max": Pooling("prompt", "span_max"),
    "ema": Pooling("prompt", "span_ema"),
    "resp_last": Pooling("response", "span_end"),
    "resp_mean": Pooling("response", "span"),
}
#: The `ema` pooling's half-life in tokens: a user-span token k tokens before the span's last one weighs 2^(-k/16)
#: of it (before the weights are normalised to sum to 1). 16 tokens is about a sentence: the last sentence or two
#: of a turn (where a request is usually stated) carry most of the weight, and tokens 64 back still weigh 1/16.
#: One fixed number, not a spec field: a probe on `act_ema_L*` is only valid with the half-life it was trained on.
EMA_HALF_LIFE_TOKENS = 16.0
#: Constants a pooling's numbers depend on beyond its name and positions: the features stage's cache key adds
#: those of the poolings a job extracts (`ExtractSpec.cache_payload`), so changing one recomputes just them.
POOLING_CONSTANTS: dict[str, dict[str, float]] = {"ema": {"half_life_tokens": EMA_HALF_LIFE_TOKENS}}
#: Poolings over the prompt (`extract.poolings`, and all a server can run before any token is generated).
PROMPT_POOLINGS = tuple(name for name, p in POOLINGS.items() if p.reads == "prompt")
#: Poolings over the response (`extract.on: [response]`): its last token and the mean over its tokens.
RESPONSE_POOLINGS = tuple(name for name, p in POOLINGS.items() if p.reads == "response")


# ------------------------------------------------------------------------------------ activation columns
#: Field metadata keys of an activation column.
LAYER_KEY, POOLING_KEY = b"guardray.layer", b"guardray.pooling"


def feature_column(pooling: str, layer: int) -> str:
    """Public column name of an activation: act_<pooling>_L<layer> with the resolved (non-negative) layer."""
    return f"{FEATURE_PREFIX}{pooling}_L{layer}"


def feature_metadata(pooling: str, layer: int) -> dict[bytes, bytes]:
    """The field metadata of an activation column."""
    return {LAYER_KEY: str(layer).encode(), POOLING_KEY: pooling.encode()}


def feature_field(pooling: str, layer: int, width: int, dtype: pa.DataType) -> pa.Field:
    """An activation column's field: its name, a fixed-size list type, and its layer and pooling as metadata."""
    return pa.field(feature_column(pooling, layer), pa.list_(dtype, width), metadata=feature_metadata(pooling, layer))


@dataclass(frozen=True)
class FeatureInfo:
    """What an activation column is, as its field metadata records it."""

    column: str
    layer: int
    pooling: str
    width: int

    @property
    def on_prompt(self) -> bool:
        """Whether it reads the prompt alone (a server can compute it before generating)."""
        return self.pooling not in RESPONSE_POOLINGS


def is_feature(f: pa.Field) -> bool:
    return f.name.startswith(FEATURE_PREFIX)


def feature_info(f: pa.Field) -> FeatureInfo | None:
    """The layer and pooling an activation field carries, or None when it carries none (written before they
    were recorded)."""
    meta = f.metadata or {}
    if LAYER_KEY not in meta or POOLING_KEY not in meta:
        return None
    return FeatureInfo(f.name, int(meta[LAYER_KEY]), meta[POOLING_KEY].decode(), f.type.list_size)


def feature_infos(schema: pa.Schema, where: str) -> dict[str, FeatureInfo]:
    """{activation column: FeatureInfo} of a parts schema, in schema order; a one-line InputError when one
    lacks its metadata (features from before it was recorded: they must be extracted again)."""
    infos = {f.name: feature_info(f) for f in schema if is_feature(f)}
    old = [name for name, info in infos.items() if info is None]
    if old:
        raise InputError(f"{where}: feature column{'s' if len(old) > 1 else ''} {', '.join(old)} lack"
                         f"{'' if len(old) > 1 else 's'} the layer/pooling field metadata (written by an older "
                         f"guardray): redo the features stage: guardray run SPEC --force features")
    return {name: info for name, info in infos.items() if info is not None}


def with_feature_metadata(table: pa.Table, features: dict[str, tuple[str, int]]) -> pa.Table:
    """`table` whose activation columns (name → (pooling, layer)) carry their field metadata; types and data
    are kept as they are (no copy)."""
    if any(name != feature_column(*key) for name, key in features.items()):
        raise ValueError(f"activation columns named otherwise than act_<pooling>_L<layer>: {features}")
    fields = [f.with_metadata(feature_metadata(*features[f.name])) if f.name in features else f for f in table.schema]
    return pa.Table.from_arrays(table.columns, schema=pa.schema(fields, metadata=table.schema.metadata))


# ------------------------------------------------------------------------------------- input checks
def require(schema: pa.Schema | Iterable[str], needed: Iterable[str], stage: str, where: str,
            written_by: str) -> None:
    """Fail in one line, naming every missing column, when `schema` (or the column names given) lacks one of
    `needed`: what each stage checks at its input before it reads a row."""
    names = set(schema.names) if isinstance(schema, pa.Schema) else set(schema)
    missing = [c for c in dict.fromkeys(needed) if c not in names]
    if missing:
        raise InputError(f"{stage}: {where} lacks column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                         f"(written by the {written_by} stage)")


# ----------------------------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    """A label: its name (the column it is projected as), the parts' columns it reads, and its expression
    (a nullable boolean; null = unknown, excluded). `guardray.targets` resolves names into targets."""

    name: str
    needs: tuple[str, ...]
    expression: pc.Expression
    derived: bool = False

    @classmethod
    def column(cls, name: str) -> "Target":
        """A label stored in the parts as a column (null = unknown)."""
        return cls(name, (name,), pc.field(name))

    def valid(self) -> pc.Expression:
        """Rows whose label is known."""
        return self.expression.is_valid()


#: A target as resolved (`targets.resolve`), or the name of a label column read as is.
TargetLike = Target | str
#: Rows per batch when streaming a column into its matrix: bounds the Arrow-side copy to a few MB.
READ_BATCH_ROWS = 4096


# --------------------------------------------------------------------------------------------- reading
def matrix(table: pa.Table, column: str) -> np.ndarray:
    """A fixed-size-list column as a float32 [rows, dim] array."""
    col = table.column(column).combine_chunks()
    dim = col.type.list_size
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)


def parts_dataset(stage: Location) -> pads.Dataset:
    """The features stage's parts as a lazy Arrow dataset (file order = range order, so row order is fixed).
    `pyarrow.dataset` (which imports pandas) is loaded here, not with the module: the spec imports this one."""
    import pyarrow.dataset as pads

    parts = stage.join(PARTS_DIR)
    parts.refresh()
    return pads.dataset(parts.path, filesystem=parts.fs, format="parquet")


def feature_schema(stage: Location) -> pa.Schema:
    """The parts' schema, from a footer: no rows are read."""
    return parts_dataset(stage).schema


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
    return known if split is None else known & (pc.field(SPLIT) == split)


@dataclass(frozen=True)
class _Scan:
    where: pc.Expression
    projection: dict[str, pc.Expression]  # output name → expression: the label is computed in the scan
    dim: int
    filtered_on: tuple[str, ...]


def _scan(stage: Location, dataset: pads.Dataset, column: str | None, target: Target, split: str | None,
          extra: Sequence[str], reader: str, without_source: str | None = None) -> _Scan:
    filtered_on = (*target.needs, *(() if split is None else (SPLIT,)),
                   *(() if without_source is None else (SOURCE,)))
    require(dataset.schema, [c for c in (column, *extra, *filtered_on) if c is not None], stage=reader,
            where=stage.uri, written_by="features")
    projection = {c: pc.field(c) for c in (column, *extra) if c is not None}
    projection = {**({column: projection.pop(column)} if column else {}), target.name: target.expression,
                  **projection}
    dim = dataset.schema.field(column).type.list_size if column else 0
    where = split_filter(target, split)
    if column:  # a response pooling is null on a row with no response (a prompt-only row beside given replies)
        where = where & pc.field(column).is_valid()
    if without_source is not None:
        where = where & (pc.field(SOURCE) != without_source)
    return _Scan(where, projection, dim, filtered_on)


def column_batches(stage: Location, column: str | None, target: TargetLike, split: str | None = "train",
                   extra: Sequence[str] = (), reader: str = "probes",
                   without_source: str | None = None) -> Iterator[ColumnData]:
    """Stream one column's labelled rows (of `split`, when given) as record batches of `READ_BATCH_ROWS`:
    a scorer keeps its scores and drops the features batch by batch. `x` keeps the stored dtype (float16)."""
    dataset, target = parts_dataset(stage), as_target(target)
    scan = _scan(stage, dataset, column, target, split, extra, reader, without_source)
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
                extra: Sequence[str] = (), reader: str = "probes", without_source: str | None = None) -> ColumnData:
    """One column's labelled rows (of `split`, when given) in a preallocated float32 matrix.

    Memory: the matrix plus one record batch. `column=None` reads labels and `extra` only (the guard score).
    `columns_read` lists every column the scan touched (projection and filter), for tests and logs.
    `without_source`: leave that source's rows out (a leave-one-source-out fit).
    """
    dataset, target = parts_dataset(stage), as_target(target)
    scan = _scan(stage, dataset, column, target, split, extra, reader, without_source)
    touched: tuple[str, ...] = ()
    rows = dataset.count_rows(filter=scan.where)
    x = np.empty((rows, scan.dim), dtype=np.float32)
    y = np.empty(rows, dtype=bool)
    extras: dict[str, list[pa.Array]] = {c: [] for c in extra}
    at = 0
    for part in column_batches(stage, column, target, split, extra, reader, without_source):
        n, touched = len(part.y), part.columns_read
        x[at:at + n], y[at:at + n] = part.x, part.y
        for c in extra:
            extras[c].extend(part.extra[c].chunks)
        at += n
    if at != rows:
        raise InputError(f"{stage.uri}: the parts changed while being read ({rows} rows counted, {at} read)")
    return ColumnData(x, y, {c: pa.chunked_array(v, type=dataset.schema.field(c).type) for c, v in extras.items()},
                      touched)


def label_counts(stage: Location, target: TargetLike, split: str | None = "train",
                 column: str | None = None) -> tuple[int, int]:
    """(true, false) counts of `target` in `split` (among the rows where `column` is not null, when given),
    reading only the label and split columns (and `column`'s validity)."""
    dataset, target = parts_dataset(stage), as_target(target)
    where = split_filter(target, split) & (pc.field(column).is_valid() if column else pc.scalar(True))
    known = dataset.count_rows(filter=where)
    true = dataset.count_rows(filter=where & target.expression)
    return true, known - true


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
