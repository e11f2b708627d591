"""The source registry: spec type name → loader returning an Arrow table of prompts.

A loader returns a `pa.Table` with columns `prompt` (string; missing or blank prompts are judged later),
`harmful` (bool, null when unknown), any extra label columns (bool, nullable), optionally `split` (string)
and `reject` (string: why the row cannot be used, null when it is fine); a conversation source
(`SourceBase.conversational`) adds `messages`, `response` and `response_harmful` (`conversations.py`). Files
stay columnar from reader to table; only the small packaged corpora are built from Python lists. Adding a
source kind is one function registered in `LOADERS`.
"""
from __future__ import annotations

import errno
import fnmatch
import os
import posixpath
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa
import pyarrow.fs as pafs

from guardray.columns import PROMPT
from guardray.datasets import huggingface, packaged
from guardray.datasets.conversations import records_table, with_conversations
from guardray.datasets.readers import FORMATS, read_table
from guardray.datasets.tables import source_table, text_table, wanted_columns
from guardray.errors import InputError
from guardray.jobspec import FileSource, HuggingFaceSource, PackagedSource
from guardray.storage import Location, resolve

def load_packaged(spec: PackagedSource) -> pa.Table:
    corpus = packaged.CORPORA[spec.type]
    if spec.conversational:
        return records_table(corpus.rows(spec.turns), corpus.harmful, spec.system_prompt)
    return text_table([row[PROMPT] for row in corpus.rows()], corpus.harmful)


def load_file(spec: FileSource) -> pa.Table:
    try:
        root = resolve(spec.path)
    except ValueError as e:
        raise InputError(f"source '{spec.source_name}': path: {e}") from None
    files = _expand(root)
    for file in files:
        _refuse_symlink_loop(file, spec.source_name)
    return _table_from_files(files, spec)


def _refuse_symlink_loop(location: Location, source: str) -> None:
    """A local path that is (or passes through) a symlink loop: one line saying so, rather than a message
    about its extension or a missing file."""
    if location.is_local and _is_loop(location.path):
        raise InputError(f"source '{source}': path {location.uri}: symlink loop")


def _symlink_loops(directory: Location) -> list[str]:
    """Names in a local directory that are symlink loops: its listing skips them silently, so the source
    would quietly lose a file; listed, they fail with `_refuse_symlink_loop`'s line."""
    if not directory.is_local or not os.path.isdir(directory.path):
        return []
    return [n for n in os.listdir(directory.path) if _is_loop(os.path.join(directory.path, n))]


def _is_loop(path: str) -> bool:
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def load_huggingface(spec: HuggingFaceSource) -> pa.Table:
    return _table_from_files(huggingface.dataset_files(spec), spec)


def _table_from_files(files: list[Location], spec: FileSource | HuggingFaceSource) -> pa.Table:
    """Each file read and turned into prompt columns on its own (its errors name it), then concatenated
    without copying."""
    fmt = getattr(spec, "format", "auto")
    wanted = wanted_columns(spec)
    tables = []
    for file in files:
        problem = spec.csv_problem(fmt, file.path)  # a directory or glob may hold CSV files too
        if problem:
            raise InputError(f"{file.uri}: {problem}")
        raw = read_table(file, fmt, wanted)
        table = source_table(raw, spec, origin=file.uri)
        tables.append(with_conversations(table, raw, spec) if spec.conversational else table)
    return pa.concat_tables(tables, promote_options="permissive")


def _expand(root: Location) -> list[Location]:
    """A file, a directory (every data file inside, sorted), or a glob in the last path component."""
    if "*" in posixpath.basename(root.path):
        parent = Location(root.fs, posixpath.dirname(root.path), posixpath.dirname(root.uri))
        pattern = posixpath.basename(root.path)
        names = [n for n in [*parent.list(), *_symlink_loops(parent)] if fnmatch.fnmatch(n, pattern)]
        files = [parent.join(n) for n in sorted(set(names))]
    elif root.exists() and root.fs.get_file_info(root.path).type == pafs.FileType.Directory:
        names = [n for n in [*root.list(), *_symlink_loops(root)] if posixpath.splitext(n)[1].lower() in FORMATS]
        files = [root.join(n) for n in sorted(set(names))]
    else:
        files = [root]
    if not files:
        raise InputError(f"{root.uri}: no data files found")
    return files


@dataclass(frozen=True)
class SourceKind:
    """How to load one kind of source and what it is expected to hold."""

    load: Callable[[Any], pa.Table]
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


def load_source(spec: Any) -> pa.Table:
    return LOADERS[spec.type].load(spec)


def expected_rows(spec: Any) -> int | None:
    return LOADERS[spec.type].expected(spec)

