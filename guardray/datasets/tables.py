"""Turning the columns read from a data file (`readers.py`) into a columnar prompt table.

Shared by the file and Hugging Face sources. Everything stays in Arrow columns (a million-row file never
becomes a million Python dicts): label parsing (bool, 0/1, strings, or a `label_map`), list-valued text
columns, split values, UTF-8 validation.

A bad value never fails the file and never takes its neighbours with it: invalid UTF-8 in a CSV cell, an
unparseable label or split all become a `reject` reason on that row only, so the assembly accounts for every row.
"""
from __future__ import annotations

import re
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from guardray.columns import HARMFUL, PROMPT, SPLIT
from guardray.datasets.readers import RawTable, is_text
from guardray.jobspec import LabelledColumns

_INDEXED = re.compile(r"^(?P<column>.+)\[(?P<index>-?\d+)\]$")
_TRUE = ["true", "1", "yes", "y", "t"]
_FALSE = ["false", "0", "no", "n", "f"]
SPLITS = ["train", "test"]
#: When a column fails UTF-8 validation, it is re-checked in slices this long before going cell by cell.
_UTF8_SLICE_ROWS = 1024

AnyArray = pa.Array | pa.ChunkedArray


def wanted_columns(spec: LabelledColumns) -> dict[str, str]:
    """Spec field → file column, for every column the source reads (so errors can name the field)."""
    text = _INDEXED.match(spec.text_column)
    wanted = {
        # with a conversation column the prompt is its last user turn: text_column is not read
        "text_column": None if spec.messages_column else text.group("column") if text else spec.text_column,
        "messages_column": spec.messages_column,
        "extra_text_column": None if spec.messages_column else spec.extra_text_column,
        "label_column": spec.label_column,
        "split_column": spec.split_column,
        **{f"extra_labels[{i}]": c for i, c in enumerate(spec.extra_labels)},
        "system_column": spec.system_column,
        "response_column": spec.response_column,
        "response_label_column": spec.response_label_column,
    }
    return {field: column for field, column in wanted.items() if column}


# --------------------------------------------------------------------------------------- the prompt table


def source_table(raw: RawTable, spec: LabelledColumns, origin: str) -> pa.Table:
    """Columns prompt, harmful, [extra labels], [split], reject from a raw table, per the source's column spec.

    `reject` holds why a row cannot be used (read problem, bad UTF-8, label or split value), else null; the
    prompt itself (missing, empty) is judged later, by the assembly, for every source alike.
    """
    table, problems = raw.table, [raw.problems]
    if spec.messages_column:  # the prompt is the chat's last user turn: `conversations.with_conversations`
        prompt: AnyArray = pa.nulls(table.num_rows, pa.string())
    else:
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
        problems += [problem, prefixed(spec.split_column, split_problem)]
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
    if not is_text(values.type):  # every row is rejected; its value, as text, goes to rejects.parquet
        problem = pa.repeat(pa.scalar(f"{spec.text_column}: prompt is {values.type}, not a string"), len(values))
        try:
            return values.cast(pa.string()), [problem]
        except pa.ArrowException:
            return pa.nulls(len(values), pa.string()), [problem]
    text, problem = decode_text(values, spec.text_column)
    not_text = not_a_string(kinds.get(column) if not m else None, spec.text_column, "prompt")
    if not spec.extra_text_column:
        return text, [problem, not_text]
    extra, extra_problem = decode_text(table[spec.extra_text_column], spec.extra_text_column)
    extra_not_text = not_a_string(kinds.get(spec.extra_text_column), spec.extra_text_column, "extra text")
    return join_extra_text(text, extra), [problem, not_text, extra_problem, extra_not_text]


def not_a_string(kinds: pa.Array | None, field: str, what: str) -> pa.Array | None:
    """'<field>: <what> is int64, not a string' where a row's original value had another type, else null."""
    if kinds is None:
        return None
    return pc.binary_join_element_wise(f"{field}: {what} is ", kinds, ", not a string", "")


def _label_column(table: pa.Table, column: str, mapping: dict[str, bool] | None, problems: list) -> AnyArray:
    values, problem = decode_text(table[column], column)  # CSV labels arrive as bytes
    problems.append(problem)
    labels, problem = parse_labels(values, mapping)
    problems.append(prefixed(column, problem))
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


def decode_text(values: AnyArray, name: str) -> tuple[AnyArray, AnyArray | None]:
    """Strings (`pa.string()`) from a string or binary column, UTF-8 validated: parquet and CSV bytes are not
    checked on read. Invalid cells get their text with U+FFFD replacements and a problem ('<name>: invalid
    UTF-8'); columns that are not text pass unchanged.

    The whole-chunk cast is the fast path; only a chunk that fails is looked at in slices, then cell by cell.
    """
    if pa.types.is_null(values.type):
        return values.cast(pa.string()), None
    if not is_text(values.type):
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


def prefixed(column: str, problems: AnyArray) -> AnyArray:
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
