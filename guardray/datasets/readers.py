"""Reading one data file (parquet, JSON lines, a JSON array, CSV) into the Arrow columns a source uses.

Split from `tables.py` (which turns those columns into the prompt table) along the read/interpret seam: this
module knows file formats and nothing about labels or prompts. A bad value never fails the file: invalid UTF-8
in a CSV cell is left for `tables.decode_text`, and a JSON line that does not parse (e.g. a lone surrogate
escape) becomes a problem on that row only (`RawTable.problems`), so the assembly accounts for every row.
"""
from __future__ import annotations

import json
import posixpath
import re
from typing import Any, Callable, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from guardray.errors import InputError, one_line
from guardray.storage import Location

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "json", ".csv": "csv"}
#: First try at the CSV/JSON reader's block size; a row larger than a block is retried with one block.
_BLOCK_BYTES = 16 << 20
_MAX_BLOCK_BYTES = (1 << 31) - 1



class RawTable(NamedTuple):
    """The columns a source uses, as read, plus why rows could not be read at all (null where they could).

    `kinds`: for a JSON column whose values have more than one type (strings in some rows, a number, a list
    or an object in others), read as text, each row's original type where it was not a string (null where it
    was, or was null), so a prompt that was `42` is rejected as a number rather than kept as the text "42".
    """

    table: pa.Table
    problems: pa.Array | None = None
    kinds: dict[str, pa.Array] | None = None



# ---------------------------------------------------------------------------------------------- reading


def read_table(location: Location, fmt: str, wanted: dict[str, str]) -> RawTable:
    """Read the `wanted` columns of one parquet / jsonl / json / csv file (CSV columns come back as binary)."""
    fmt = fmt if fmt != "auto" else FORMATS.get(posixpath.splitext(location.path)[1].lower(), "")
    if not fmt:
        raise InputError(f"{location.uri}: cannot tell the format from the extension; set `format:`")
    try:
        with location.fs.open_input_file(location.path) as f:
            if fmt == "parquet":
                _check_columns(pq.ParquetFile(f).schema_arrow.names, wanted, location.uri)
                return RawTable(pq.read_table(f, columns=_unique(wanted.values())))
            data = f.read()
        if fmt == "csv":
            return _read_csv(data, wanted, location.uri)
        raw = _read_json(data) if fmt == "json" else _read_json_lines(data)
        _check_columns(raw.table.column_names, wanted, location.uri)
        return raw._replace(table=raw.table.select(_unique(wanted.values())))
    except FileNotFoundError:
        raise InputError(f"{location.uri}: file not found") from None
    except (pa.ArrowException, OSError, ValueError) as e:
        raise InputError(f"{location.uri}: cannot read as {fmt}: {one_line(e, 200)}") from None


def _check_columns(names: list[str], wanted: dict[str, str], origin: str) -> None:
    for field, column in wanted.items():
        if column not in names:
            raise InputError(f"{origin}: {field} '{column}' not found; columns are: {', '.join(names)}")


def _unique(columns: Any) -> list[str]:
    return list(dict.fromkeys(columns))


def _with_block_size(read: Callable[[int], pa.Table], size: int) -> pa.Table:
    """Run `read(block_size)`; if a row straddles blocks (a row over 16 MB), retry with the file as one block."""
    try:
        return read(_BLOCK_BYTES)
    except pa.ArrowInvalid as e:
        if "straddl" not in str(e) or size < _BLOCK_BYTES:
            raise
        return read(min(size + 1, _MAX_BLOCK_BYTES))


def _read_csv(data: bytes, wanted: dict[str, str], origin: str) -> RawTable:
    """Read the wanted columns as binary: pyarrow fails a whole file on invalid UTF-8 in a string column,
    so decoding (and rejecting the bad cells only) happens afterwards, in `decode_text`."""
    parse = pacsv.ParseOptions(newlines_in_values=True)  # prompts are often multi-line (quoted) text
    header = _with_block_size(
        lambda block: pacsv.open_csv(pa.BufferReader(data), read_options=pacsv.ReadOptions(block_size=block),
                                     parse_options=parse).schema,
        len(data),
    )
    _check_columns(header.names, wanted, origin)
    columns = _unique(wanted.values())
    convert = pacsv.ConvertOptions(include_columns=columns, column_types={c: pa.binary() for c in columns})
    table = _with_block_size(
        lambda block: pacsv.read_csv(pa.BufferReader(data), read_options=pacsv.ReadOptions(block_size=block),
                                     parse_options=parse, convert_options=convert),
        len(data),
    )
    return RawTable(table)


def _read_json(data: bytes) -> RawTable:
    """A `.json` file: an array of records, an object holding one such array, or (fallback) JSON lines.

    A JSON document has to be parsed whole, so this path goes through Python objects; the records are written
    back as JSON lines and read by the same columnar reader as `.jsonl`, which gives the same types and
    per-row rejects (a lone surrogate, re-escaped by `json.dumps`, rejects that record only).
    """
    text = data.decode("utf-8", "surrogateescape").lstrip()  # invalid bytes become lone surrogates: rejected
    if not text.startswith(("[", "{")):
        raise ValueError("not JSON")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:  # several objects, one per line
        return _read_json_lines(data)
    if isinstance(value, dict):
        arrays = [v for v in value.values() if isinstance(v, list)]
        value = arrays[0] if len(arrays) == 1 else [value]
    if not all(isinstance(record, dict) for record in value):
        raise ValueError("expected an array of objects")
    return _read_json_lines("\n".join(json.dumps(record) for record in value).encode())


def _read_json_lines(data: bytes) -> RawTable:
    """JSON lines, columnar; only when the fast path fails, bisect the file to find and reject the bad lines."""
    try:
        return RawTable(_parse_json(pa.py_buffer(data)))
    except pa.ArrowInvalid as first_error:
        pieces: list[pa.Table | str] = []
        _parse_span(data, 0, len(data), pieces, first_error)
        if not any(isinstance(p, pa.Table) and p.num_rows for p in pieces):
            raise first_error  # not a JSON lines file at all
        return _assemble_pieces(pieces)


def _parse_json(buffer: pa.Buffer) -> pa.Table:
    return _with_block_size(
        lambda block: pajson.read_json(pa.BufferReader(buffer), read_options=pajson.ReadOptions(block_size=block)),
        buffer.size,
    )


def _parse_span(
    data: bytes, start: int, end: int, pieces: list[pa.Table | str], error: pa.ArrowInvalid | None = None
) -> None:
    """Parse data[start:end] (whole lines; `error` if that already failed); a span that fails is halved at a
    line break until one line is left, which becomes a problem string in `pieces` (blank ones are skipped,
    as the JSON reader does). Cost: about one more parse of the file per bad line's log2(lines) levels."""
    if error is None:
        try:
            pieces.append(_parse_json(pa.py_buffer(data)[start:end]))
            return
        except pa.ArrowInvalid as e:
            error = e
    cut = _line_break_near_middle(data, start, end)
    if cut is None:
        if data[start:end].strip():
            pieces.append(f"invalid JSON line: {_json_message(error)}")
        return
    _parse_span(data, start, cut, pieces)
    _parse_span(data, cut, end, pieces)


def _line_break_near_middle(data: bytes, start: int, end: int) -> int | None:
    """A position just after a newline, strictly inside (start, end), or None for a single line."""
    middle = (start + end) // 2
    after = data.find(b"\n", middle, end - 1)
    if after != -1:
        return after + 1
    before = data.rfind(b"\n", start, middle)
    return before + 1 if before != -1 else None


def _json_message(error: Exception) -> str:
    text = " ".join(str(error).split()).removeprefix("JSON parse error: ")
    return re.sub(r"\s*in row \d+$", "", text)[:200]


def _assemble_pieces(pieces: list[pa.Table | str]) -> RawTable:
    """Good spans and bad lines (one all-null row each), in file order, under one promoted schema.

    A column whose spans cannot be merged (strings in one, numbers, lists or objects in another: the reason
    the fast path failed) is merged as text, and `kinds` keeps each row's original type; labels and splits are
    then parsed from that text, and a prompt that was not a string is rejected (`source_table`).
    """
    tables = [p for p in pieces if isinstance(p, pa.Table)]
    mixed = _mixed_columns(tables)
    texts = [p if isinstance(p, str) else _mixed_as_text(p, mixed) for p in pieces]
    schema = pa.concat_tables([t[0] for t in texts if not isinstance(t, str)], promote_options="permissive").schema
    parts, problems, kinds = [], [], {c: [] for c in mixed}
    for piece in texts:
        if isinstance(piece, str):
            rows, problem, row_kinds = pa.table([pa.nulls(1, f.type) for f in schema], schema=schema), piece, {}
        else:
            (rows, row_kinds), problem = piece, None
        parts.append(rows)
        problems.append(pa.array([problem] * rows.num_rows, pa.string()))
        for column in mixed:
            kinds[column].append(row_kinds.get(column, pa.nulls(rows.num_rows, pa.string())))
    table = pa.concat_tables(parts, promote_options="permissive")
    return RawTable(table, pa.concat_arrays(problems), {c: pa.concat_arrays(k) for c, k in kinds.items()} or None)


def _mixed_columns(tables: list[pa.Table]) -> list[str]:
    """The columns whose types differ between spans in a way Arrow cannot promote (int64 and double can be)."""
    mixed = []
    for name in dict.fromkeys(n for t in tables for n in t.column_names):
        types = {t.schema.field(name).type for t in tables if name in t.column_names}
        try:
            pa.unify_schemas([pa.schema([pa.field(name, t)]) for t in types], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            mixed.append(name)
    return mixed


def _mixed_as_text(table: pa.Table, mixed: list[str]) -> tuple[pa.Table, dict[str, pa.Array]]:
    """The `mixed` columns of one span as text (numbers and booleans as their JSON spelling, lists and
    objects as JSON), and per such column the original type of each non-null value that was not a string."""
    kinds = {}
    for name in (c for c in mixed if c in table.column_names):
        values = table[name].combine_chunks()
        if is_text(values.type):
            continue
        if pa.types.is_nested(values.type):
            text = pa.array([None if v is None else json.dumps(v) for v in values.to_pylist()], pa.string())
        else:
            text = values.cast(pa.string())
        table = table.set_column(table.column_names.index(name), name, text)
        kinds[name] = pc.if_else(pc.is_valid(values), pa.scalar(_json_kind(values.type)), _NO_TEXT)
    return table, kinds


_NO_TEXT = pa.scalar(None, pa.string())


def _json_kind(t: pa.DataType) -> str:
    """What a JSON value that Arrow read as `t` was, in JSON's words."""
    if pa.types.is_boolean(t):
        return "a boolean"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "a number"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return "an array"
    return "an object" if pa.types.is_struct(t) else str(t)



_TEXT_TYPES = tuple(
    getattr(pa.types, name) for name in
    ("is_string", "is_large_string", "is_string_view", "is_binary", "is_large_binary", "is_binary_view", "is_null")
    if hasattr(pa.types, name)  # the *_view types exist from pyarrow 16
)


def is_text(t: pa.DataType) -> bool:
    """Whether a column holds text (string or binary of any width, or only nulls)."""
    if pa.types.is_dictionary(t):  # e.g. a pandas categorical written to parquet
        t = t.value_type
    return any(check(t) for check in _TEXT_TYPES)
