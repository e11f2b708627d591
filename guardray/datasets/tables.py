"""Turning a data file (from a file source or a Hugging Face dataset) into a columnar prompt table.

Shared by the file and Hugging Face sources. Everything stays in Arrow columns (a million-row file never
becomes a million Python dicts): column lookup with a clear error naming the file and the columns that exist,
label parsing (bool, 0/1, strings, or a `label_map`), list-valued text columns, split values.

A bad value never fails the file and never takes its neighbours with it: invalid UTF-8 in a CSV cell, a JSON
line that does not parse (e.g. a lone surrogate escape), an unparseable label or split all become a `reject`
reason on that row only, so the assembly accounts for every row.
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

from guardray.columns import HARMFUL, PROMPT, SPLIT
from guardray.errors import InputError, one_line
from guardray.jobspec import LabelledColumns
from guardray.storage import Location

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "json", ".csv": "csv"}
_INDEXED = re.compile(r"^(?P<column>.+)\[(?P<index>-?\d+)\]$")
_TRUE = ["true", "1", "yes", "y", "t"]
_FALSE = ["false", "0", "no", "n", "f"]
SPLITS = ["train", "test"]
#: First try at the CSV/JSON reader's block size; a row larger than a block is retried with one block.
_BLOCK_BYTES = 16 << 20
_MAX_BLOCK_BYTES = (1 << 31) - 1
#: When a column fails UTF-8 validation, it is re-checked in slices this long before going cell by cell.
_UTF8_SLICE_ROWS = 1024

AnyArray = pa.Array | pa.ChunkedArray


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


def wanted_columns(spec: LabelledColumns) -> dict[str, str]:
    """Spec field → file column, for every column the source reads (so errors can name the field)."""
    text = _INDEXED.match(spec.text_column)
    wanted = {
        "text_column": text.group("column") if text else spec.text_column,
        "extra_text_column": spec.extra_text_column,
        "label_column": spec.label_column,
        "split_column": spec.split_column,
        **{f"extra_labels[{i}]": c for i, c in enumerate(spec.extra_labels)},
    }
    return {field: column for field, column in wanted.items() if column}


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
        if _is_text(values.type):
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


# --------------------------------------------------------------------------------------- the prompt table


def source_table(raw: RawTable, spec: LabelledColumns, origin: str) -> pa.Table:
    """Columns prompt, harmful, [extra labels], [split], reject from a raw table, per the source's column spec.

    `reject` holds why a row cannot be used (read problem, bad UTF-8, label or split value), else null; the
    prompt itself (missing, empty) is judged later, by the assembly, for every source alike.
    """
    table, problems = raw.table, [raw.problems]
    prompt, text_problems = _text_column(table, spec, raw.kinds or {})
    problems += text_problems
    columns: dict[str, AnyArray] = {PROMPT: prompt}
    if spec.label_column:
        columns[HARMFUL] = _label_column(table, spec.label_column, spec.label_map, problems)
    else:
        columns[HARMFUL] = _constant_label(spec.harmful, table.num_rows)
    for name in spec.extra_labels:
        columns[name] = _label_column(table, name, spec.label_map, problems)
    if spec.split_column:
        values, problem = decode_text(table[spec.split_column], spec.split_column)
        columns[SPLIT], split_problem = parse_splits(values)
        problems += [problem, _prefixed(spec.split_column, split_problem)]
    columns["reject"] = join_problems(problems, table.num_rows)
    return pa.table(columns)


def _text_column(table: pa.Table, spec: LabelledColumns,
                 kinds: dict[str, pa.Array]) -> tuple[AnyArray, list[AnyArray | None]]:
    """The prompt column as strings (+ problems): a list item for 'col[i]', joined with extra_text_column.
    A row whose value was not a string in a column of mixed types (`kinds`) is rejected, naming its type."""
    m = _INDEXED.match(spec.text_column)
    column = m.group("column") if m else spec.text_column
    values = table[column]
    if m and not (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)):
        problem = f"{spec.text_column}: column '{column}' is {values.type}, not a list"
        return pa.nulls(len(values), pa.string()), [pa.repeat(pa.scalar(problem), len(values))]
    if m:
        values = list_item(values, int(m.group("index")))
    if not _is_text(values.type):  # every row is rejected; its value, as text, goes to rejects.parquet
        problem = pa.repeat(pa.scalar(f"{spec.text_column}: prompt is {values.type}, not a string"), len(values))
        try:
            return values.cast(pa.string()), [problem]
        except pa.ArrowException:
            return pa.nulls(len(values), pa.string()), [problem]
    text, problem = decode_text(values, spec.text_column)
    not_text = _not_a_string(kinds.get(column) if not m else None, spec.text_column, "prompt")
    if not spec.extra_text_column:
        return text, [problem, not_text]
    extra, extra_problem = decode_text(table[spec.extra_text_column], spec.extra_text_column)
    extra_not_text = _not_a_string(kinds.get(spec.extra_text_column), spec.extra_text_column, "extra text")
    return join_extra_text(text, extra), [problem, not_text, extra_problem, extra_not_text]


def _not_a_string(kinds: pa.Array | None, field: str, what: str) -> pa.Array | None:
    """'<field>: <what> is int64, not a string' where a row's original value had another type, else null."""
    if kinds is None:
        return None
    return pc.binary_join_element_wise(f"{field}: {what} is ", kinds, ", not a string", "")


def _label_column(table: pa.Table, column: str, mapping: dict[str, bool] | None, problems: list) -> AnyArray:
    values, problem = decode_text(table[column], column)  # CSV labels arrive as bytes
    problems.append(problem)
    labels, problem = parse_labels(values, mapping)
    problems.append(_prefixed(column, problem))
    return labels


def _constant_label(value: bool | None, n: int) -> pa.Array:
    return pa.nulls(n, pa.bool_()) if value is None else pa.repeat(pa.scalar(value, pa.bool_()), n)


def text_table(prompts: list[Any], harmful: bool) -> pa.Table:
    """A prompt table from a Python list (the small packaged corpora): non-strings and strings that are not
    valid Unicode (lone surrogates) are rejected one by one."""
    try:
        prompt = pa.array(prompts, pa.string())
        reject = pa.nulls(len(prompts), pa.string())
    except (pa.ArrowException, UnicodeEncodeError):
        texts, reasons = zip(*(_python_text(p) for p in prompts)) if prompts else ((), ())
        prompt, reject = pa.array(texts, pa.string()), pa.array(reasons, pa.string())
    return pa.table({PROMPT: prompt, HARMFUL: _constant_label(harmful, len(prompts)), "reject": reject})


def _python_text(value: Any) -> tuple[str | None, str | None]:
    if value is None:
        return None, None
    if not isinstance(value, str):
        return repr(value), f"prompt is {type(value).__name__}, not a string"
    try:
        value.encode("utf-8")
        return value, None
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace").decode(), "prompt is not valid Unicode (lone surrogate)"


# ------------------------------------------------------------------------------------- column operations


_TEXT_TYPES = tuple(
    getattr(pa.types, name) for name in
    ("is_string", "is_large_string", "is_string_view", "is_binary", "is_large_binary", "is_binary_view", "is_null")
    if hasattr(pa.types, name)  # the *_view types exist from pyarrow 16
)


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):  # e.g. a pandas categorical written to parquet
        t = t.value_type
    return any(check(t) for check in _TEXT_TYPES)


def decode_text(values: AnyArray, name: str) -> tuple[AnyArray, AnyArray | None]:
    """Strings (`pa.string()`) from a string or binary column, UTF-8 validated: parquet and CSV bytes are not
    checked on read. Invalid cells get their text with U+FFFD replacements and a problem ('<name>: invalid
    UTF-8'); columns that are not text pass unchanged.

    The whole-chunk cast is the fast path; only a chunk that fails is looked at in slices, then cell by cell.
    """
    if pa.types.is_null(values.type):
        return values.cast(pa.string()), None
    if not _is_text(values.type):
        return values, None
    if pa.types.is_dictionary(values.type):
        values = values.cast(values.type.value_type)
    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    decoded, problems = zip(*(_decode_chunk(c, name) for c in chunks)) if chunks else ((), ())
    if all(p is None for p in problems):
        return pa.chunked_array(decoded, pa.string()), None
    problems = [pa.nulls(len(c), pa.string()) if p is None else p for c, p in zip(decoded, problems)]
    return pa.chunked_array(decoded, pa.string()), pa.chunked_array(problems, pa.string())


def _decode_chunk(chunk: pa.Array, name: str) -> tuple[pa.Array, pa.Array | None]:
    wide = pa.types.is_large_string(chunk.type) or pa.types.is_large_binary(chunk.type)
    raw, target = chunk.cast(pa.large_binary() if wide else pa.binary()), pa.string()
    try:
        return raw.cast(target), None
    except pa.ArrowInvalid:
        pass
    texts, problems = [], []
    for start in range(0, len(raw), _UTF8_SLICE_ROWS):
        part = raw.slice(start, _UTF8_SLICE_ROWS)
        try:
            texts.append(part.cast(target))
            problems.append(pa.nulls(len(part), pa.string()))
        except pa.ArrowInvalid:
            cells = [_decode_cell(b, name) for b in part.to_pylist()]
            texts.append(pa.array([c[0] for c in cells], target))
            problems.append(pa.array([c[1] for c in cells], pa.string()))
    return pa.concat_arrays(texts), pa.concat_arrays(problems)


def _decode_cell(value: bytes | None, name: str) -> tuple[str | None, str | None]:
    if value is None:
        return None, None
    try:
        return value.decode("utf-8"), None
    except UnicodeDecodeError:
        return value.decode("utf-8", "replace"), f"{name}: invalid UTF-8"


def list_item(values: AnyArray, index: int) -> AnyArray:
    """values[i][index] of a list column (negative from the end); null where a list is null or too short."""
    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    return pa.chunked_array([_list_item_chunk(c, index) for c in chunks], values.type.value_type)


def _list_item_chunk(chunk: pa.Array, index: int) -> pa.Array:
    # `offsets` honour the chunk's slice offset and index into `values`, the whole child array.
    lengths = pc.fill_null(pc.list_value_length(chunk), 0).cast(pa.int64())
    starts = chunk.offsets.slice(0, len(chunk)).cast(pa.int64())
    position = pc.add(lengths, index) if index < 0 else pa.repeat(pa.scalar(index, pa.int64()), len(chunk))
    ok = pc.and_(pc.greater_equal(position, 0), pc.less(position, lengths))
    return pc.take(chunk.values, pc.if_else(ok, pc.add(starts, position), None))


def join_extra_text(text: AnyArray, extra: AnyArray) -> AnyArray:
    """'text\\n\\nextra' where the extra text is non-blank, else the text alone."""
    blank = pc.or_(pc.equal(pc.binary_length(extra), 0), pc.utf8_is_space(extra))
    use = pc.fill_null(pc.invert(blank), False)
    return pc.if_else(use, pc.binary_join_element_wise(text, extra, "\n\n"), text)


def parse_labels(values: AnyArray, mapping: dict[str, bool] | None) -> tuple[AnyArray, AnyArray]:
    """(labels, problems): bools, 0/1, 'true'/'false'-like strings, or values looked up in `mapping`;
    an unusable value gives a null label and a problem ("label 'x' is not boolean")."""
    labels = _plain_labels(values)
    if mapping is not None:
        keys = pa.array(list(mapping), pa.string())
        found = pc.index_in(_label_text(values), value_set=keys)
        labels = pc.coalesce(pc.take(pa.array(list(mapping.values()), pa.bool_()), found), labels)
    suffix = " and not in label_map" if mapping else ""
    message = pc.binary_join_element_wise("label ", _python_repr(values), f" is not boolean{suffix}", "")
    return labels, pc.if_else(pc.is_null(labels), message, pa.scalar(None, pa.string()))


def _plain_labels(values: AnyArray) -> AnyArray:
    t = values.type
    if pa.types.is_boolean(t):
        return values
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return pc.if_else(pc.is_in(values, pa.array([0, 1], t)), pc.not_equal(values, pa.scalar(0, t)), None)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        norm = pc.utf8_lower(pc.utf8_trim_whitespace(values))
        norm = pc.replace_substring_regex(norm, r"^([01])\.0*$", r"\1")  # '1.0' from a float column in a CSV
        false = pc.if_else(pc.is_in(norm, pa.array(_FALSE)), False, None)
        return pc.if_else(pc.is_in(norm, pa.array(_TRUE)), True, false)
    return pa.nulls(len(values), pa.bool_())


def _label_text(values: AnyArray) -> AnyArray:
    """Values as `str(value)` spells them in Python, the form label_map keys are written in."""
    if pa.types.is_boolean(values.type):
        return pc.if_else(values, "True", "False")
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        return values
    if pa.types.is_integer(values.type) or pa.types.is_floating(values.type):
        return values.cast(pa.string())
    return pa.nulls(len(values), pa.string())


def _python_repr(values: AnyArray) -> AnyArray:
    """An approximation of repr(value) for messages: 'text' quoted, None for nulls."""
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        text = pc.binary_join_element_wise("'", values.cast(pa.string()), "'", "")
    elif pa.types.is_boolean(values.type) or pa.types.is_integer(values.type) or pa.types.is_floating(values.type):
        text = _label_text(values)
    else:
        text = pa.repeat(pa.scalar(f"<{values.type}>"), len(values))
    return pc.fill_null(text, "None")


def parse_splits(values: AnyArray) -> tuple[AnyArray, AnyArray]:
    """(split, problems): 'train' or 'test' (any case and padding), else null and a problem."""
    text = values if pa.types.is_string(values.type) or pa.types.is_large_string(values.type) else _label_text(values)
    norm = pc.utf8_lower(pc.utf8_trim_whitespace(text)).cast(pa.string())
    split = pc.if_else(pc.is_in(norm, pa.array(SPLITS)), norm, None)
    message = pc.binary_join_element_wise(_python_repr(values), " is not 'train' or 'test'", "")
    return split, pc.if_else(pc.is_null(split), message, pa.scalar(None, pa.string()))


def _prefixed(column: str, problems: AnyArray) -> AnyArray:
    return pc.binary_join_element_wise(f"{column}: ", problems, "")


def join_problems(problems: list[AnyArray | None], n: int) -> AnyArray:
    """Per row, the non-null problems joined with '; ' (null when there are none).

    Folded pairwise: `binary_join_element_wise(null_handling='skip')` returns a short array in pyarrow 26.
    """
    result: AnyArray = pa.nulls(n, pa.string())
    for problem in problems:
        if problem is None:
            continue
        problem = problem.cast(pa.string())
        both = pc.binary_join_element_wise(result, problem, "; ")
        result = pc.if_else(pc.is_null(result), problem, pc.coalesce(both, result))
    return result
