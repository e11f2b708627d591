"""Turning a table (from a file or a Hugging Face dataset) into raw prompt rows.

Shared by the file and Hugging Face sources: column lookup with a clear error naming the file and the
columns that exist, label parsing (bool, 0/1, strings, or a `label_map`), list-valued text columns.
Values that cannot be used are kept with a `reject` reason, so the assembly accounts for every row.
"""
from __future__ import annotations

import json
import posixpath
import re
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from guardray.errors import InputError
from guardray.spec import LabelledColumns
from guardray.storage import Location

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "json", ".csv": "csv"}
_INDEXED = re.compile(r"^(?P<column>.+)\[(?P<index>-?\d+)\]$")
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}


def read_table(location: Location, fmt: str) -> pa.Table:
    """Read one parquet / jsonl / csv file."""
    fmt = fmt if fmt != "auto" else FORMATS.get(posixpath.splitext(location.path)[1].lower(), "")
    if not fmt:
        raise InputError(f"{location.uri}: cannot tell the format from the extension; set `format:`")
    try:
        with location.fs.open_input_file(location.path) as f:
            if fmt == "parquet":
                return pq.read_table(f)
            if fmt == "csv":
                return pacsv.read_csv(f)
            if fmt == "json":
                return _json_table(f.read())
            return pajson.read_json(f)
    except FileNotFoundError:
        raise InputError(f"{location.uri}: file not found") from None
    except (pa.ArrowInvalid, OSError, ValueError) as e:
        raise InputError(f"{location.uri}: cannot read as {fmt}: {' '.join(str(e).split())[:200]}") from None


def _json_table(data: bytes) -> pa.Table:
    """A `.json` file: an array of records, an object holding one such array, or (fallback) JSON lines."""
    text = data.decode("utf-8").lstrip()
    if not text.startswith(("[", "{")):
        raise ValueError("not JSON")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:  # several objects, one per line
        return pajson.read_json(pa.BufferReader(data))
    if isinstance(value, dict):
        arrays = [v for v in value.values() if isinstance(v, list)]
        value = arrays[0] if len(arrays) == 1 else [value]
    if not all(isinstance(record, dict) for record in value):
        raise ValueError("expected an array of objects")
    return pa.Table.from_pylist(value)


def table_rows(table: pa.Table, spec: LabelledColumns, origin: str) -> list[dict[str, Any]]:
    """Rows {prompt, harmful, [extra labels], [split], reject?} from a table, per the source's column spec."""
    _check_columns(table, spec, origin)
    columns = table.to_pydict()
    n = table.num_rows
    texts = _text_values(columns, spec.text_column, n)
    if spec.extra_text_column:
        extra = columns[spec.extra_text_column]
        texts = [_join(t, x) for t, x in zip(texts, extra)]
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"prompt": texts[i]}
        problems = []
        if spec.label_column:
            row["harmful"], problem = parse_label(columns[spec.label_column][i], spec.label_map)
            if problem:
                problems.append(f"{spec.label_column}: {problem}")
        else:
            row["harmful"] = spec.harmful
        for name in spec.extra_labels:
            row[name], problem = parse_label(columns[name][i], spec.label_map)
            if problem:
                problems.append(f"{name}: {problem}")
        if spec.split_column:
            row["split"] = _split_value(columns[spec.split_column][i])
            if row["split"] is None:
                problems.append(f"{spec.split_column}: {columns[spec.split_column][i]!r} is not 'train' or 'test'")
        if problems:
            row["reject"] = "; ".join(problems)
        rows.append(row)
    return rows


def _check_columns(table: pa.Table, spec: LabelledColumns, origin: str) -> None:
    text_col = _INDEXED.match(spec.text_column)
    wanted = {
        "text_column": text_col.group("column") if text_col else spec.text_column,
        "extra_text_column": spec.extra_text_column,
        "label_column": spec.label_column,
        "split_column": spec.split_column,
        **{f"extra_labels[{i}]": c for i, c in enumerate(spec.extra_labels)},
    }
    for field, column in wanted.items():
        if column and column not in table.column_names:
            raise InputError(f"{origin}: {field} '{column}' not found; columns are: {', '.join(table.column_names)}")


def _text_values(columns: dict[str, list[Any]], text_column: str, n: int) -> list[Any]:
    m = _INDEXED.match(text_column)
    if not m:
        return columns[text_column]
    index = int(m.group("index"))
    out = []
    for value in columns[m.group("column")]:
        ok = isinstance(value, list) and -len(value) <= index < len(value)
        out.append(value[index] if ok else None)
    return out


def _join(text: Any, extra: Any) -> Any:
    if isinstance(text, str) and isinstance(extra, str) and extra.strip():
        return f"{text}\n\n{extra}"
    return text


def parse_label(value: Any, mapping: dict[str, bool] | None) -> tuple[bool | None, str | None]:
    """(label, problem): bools, 0/1, 'true'/'false'-like strings, or values looked up in `mapping`."""
    if mapping is not None and value is not None and str(value) in mapping:
        return mapping[str(value)], None
    if isinstance(value, bool):
        return value, None
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value), None
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE, None
    return None, f"label {value!r} is not boolean" + (" and not in label_map" if mapping else "")


def _split_value(value: Any) -> str | None:
    text = str(value).strip().lower()
    return {"train": "train", "test": "test"}.get(text)
