"""The source registry: spec type name → loader returning raw rows.

A loader returns a list of dicts with at least `prompt` (any value; validated later) and `harmful`
(bool or None), optionally extra label columns, `split`, and `reject` (a reason the row cannot be used).
Adding a source kind is one function registered in `LOADERS`.
"""
from __future__ import annotations

import fnmatch
import posixpath
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow.fs as pafs

from guardray.datasets import huggingface, packaged
from guardray.datasets.tables import FORMATS, read_table, table_rows
from guardray.errors import InputError
from guardray.spec import FileSource, HuggingFaceSource, PackagedSource
from guardray.storage import Location, resolve

Rows = list[dict[str, Any]]


def load_packaged(spec: PackagedSource) -> Rows:
    return packaged.CORPORA[spec.type].rows()


def load_file(spec: FileSource) -> Rows:
    try:
        root = resolve(spec.path)
    except ValueError as e:
        raise InputError(f"source '{spec.source_name}': path: {e}") from None
    return _rows_from_files(_expand(root), spec)


def load_huggingface(spec: HuggingFaceSource) -> Rows:
    return _rows_from_files(huggingface.dataset_files(spec), spec)


def _rows_from_files(files: list[Location], spec: FileSource | HuggingFaceSource) -> Rows:
    rows: Rows = []
    fmt = getattr(spec, "format", "auto")
    for location in files:
        rows.extend(table_rows(read_table(location, fmt), spec, origin=location.uri))
    return rows


def _expand(root: Location) -> list[Location]:
    """A file, a directory (every data file inside, sorted), or a glob in the last path component."""
    if "*" in posixpath.basename(root.path):
        parent = Location(root.fs, posixpath.dirname(root.path), posixpath.dirname(root.uri))
        pattern = posixpath.basename(root.path)
        names = [n for n in parent.list() if fnmatch.fnmatch(n, pattern)]
        files = [parent.join(n) for n in names]
    elif root.exists() and root.fs.get_file_info(root.path).type == pafs.FileType.Directory:
        files = [root.join(n) for n in root.list() if posixpath.splitext(n)[1].lower() in FORMATS]
    else:
        files = [root]
    if not files:
        raise InputError(f"{root.uri}: no data files found")
    return files


@dataclass(frozen=True)
class SourceKind:
    """How to load one kind of source and what it is expected to hold."""

    load: Callable[[Any], Rows]
    expected: Callable[[Any], int | None]


def _packaged_expected(spec: PackagedSource) -> int | None:
    return packaged.CORPORA[spec.type].expected


def _hf_expected(spec: HuggingFaceSource) -> int | None:
    return huggingface.PRESETS.get(spec.preset or "", {}).get("expected")


LOADERS: dict[str, SourceKind] = {
    **{name: SourceKind(load_packaged, _packaged_expected) for name in packaged.CORPORA},
    "file": SourceKind(load_file, lambda spec: None),
    "huggingface": SourceKind(load_huggingface, _hf_expected),
}


def load_source(spec: Any) -> Rows:
    return LOADERS[spec.type].load(spec)


def expected_rows(spec: Any) -> int | None:
    return LOADERS[spec.type].expected(spec)

