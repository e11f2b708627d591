"""Output locations: a URI resolved to a pyarrow filesystem plus a path, local disk or GCS.

Everything that reads or writes stage outputs goes through `Location`, so a stage works unchanged whether
`output` is a local directory or `gs://bucket/prefix`. GCS goes through gcsfs wrapped for pyarrow
(`PyFileSystem(FSSpecHandler(...))`), which Ray Data accepts as `filesystem=` and pickles to its workers.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# gcsfs >= 2026.3 probes for zonal/HNS buckets on every call; against an emulator (or a plain bucket) that
# stalls each call for 60 s. Must be set before gcsfs is imported anywhere in the process.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import pyarrow as pa  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from guardray.errors import InputError  # noqa: E402

#: Temporary files of atomic writes start with this (hidden from `*.parquet` listings and parquet datasets).
TEMPORARY_PREFIX = ".tmp-"

#: Permission bits of local output files unless the job says otherwise (`JobSpec.file_mode`): prompts, responses
#: and activations stay private to the job's user on a shared host, whatever the umask.
DEFAULT_FILE_MODE = 0o600


def directory_mode(file_mode: int) -> int:
    """The mode of a directory holding files of `file_mode`: each class that may read may also enter
    (0600 → 0700, 0640 → 0750, 0644 → 0755)."""
    return file_mode | ((file_mode & 0o444) >> 2)


def file_mode_of(spec: Any) -> int:
    """A job spec's `file_mode` as bits (the default where a spec has none)."""
    return int(str(getattr(spec, "file_mode", None) or f"{DEFAULT_FILE_MODE:04o}"), 8)


#: Environment variables a Ray worker needs to reach the same storage as the driver.
STORAGE_ENV_VARS = ("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")


@functools.lru_cache(maxsize=None)
def _gcsfs(emulator: str | None) -> Any:
    """One gcsfs instance per endpoint. With STORAGE_EMULATOR_HOST set (tests), use anonymous access."""
    import gcsfs

    if emulator:
        return gcsfs.GCSFileSystem(token="anon", endpoint_url=emulator)
    return gcsfs.GCSFileSystem()


def gcs_filesystem() -> pafs.FileSystem:
    return pafs.PyFileSystem(pafs.FSSpecHandler(_gcsfs(os.environ.get("STORAGE_EMULATOR_HOST"))))


@dataclass(frozen=True)
class Location:
    """A directory or file: `fs` + `path` (scheme-less), and the `uri` users see.

    `file_mode`: the permission bits of the local files written here (and, with `directory_mode`, of the
    directories created for them); it travels with `join` and with the Location to Ray workers. GCS objects
    have no mode: their bucket's IAM decides who reads them.
    """

    fs: pafs.FileSystem
    path: str
    uri: str
    file_mode: int = DEFAULT_FILE_MODE

    @property
    def is_gcs(self) -> bool:
        return self.uri.startswith("gs://")

    @property
    def is_local(self) -> bool:
        """On local disk, where writes need a temporary name and a rename to be atomic."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, *parts: str) -> "Location":
        return Location(self.fs, posixpath.join(self.path, *parts), posixpath.join(self.uri, *parts), self.file_mode)

    def refresh(self) -> None:
        """Drop gcsfs's listing cache so we see what Ray workers (other processes) wrote."""
        if isinstance(self.fs, pafs.PyFileSystem):
            self.fs.handler.fs.invalidate_cache()

    def exists(self) -> bool:
        self.refresh()
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def mkdir(self) -> None:
        _make_dirs(self.fs, self.path, self.file_mode)

    def list(self, suffix: str = "") -> list[str]:
        """Names (not paths) of the files directly inside this directory, sorted."""
        if not self.exists():  # exists() refreshes the listing cache
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))
        return sorted(
            posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)
        )

    def list_dirs(self) -> list[str]:
        """Names of the directories directly inside this directory, sorted."""
        if not self.exists():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))
        return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos if i.type == pafs.FileType.Directory)

    def delete(self) -> None:
        """Remove this directory and everything in it (used to redo an incomplete stage)."""
        if self.exists():
            self.fs.delete_dir(self.path)

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file atomically: a reader (or a resumed run) sees the old file, the new one, or none.

        Local disk: a temporary name in the same directory, then `os.replace` (atomic within one filesystem), so
        a process killed mid-write leaves only a `.tmp-*` file that no listing of `*.parquet` picks up. GCS
        objects only appear once their upload completes, so they are written directly.
        """
        self.write_with(lambda f: f.write(data))

    def _replace_atomically(self, write: Any) -> None:
        """Local disk: `write(file)` into a temporary name beside the target, fsync, then `os.replace`."""
        directory, name = os.path.split(self.path)
        fd, temporary = tempfile.mkstemp(prefix=f"{TEMPORARY_PREFIX}{name}-", dir=directory)
        try:
            os.fchmod(fd, self.file_mode)  # before any byte is written: never readable by more than the mode says
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise

    def write_with(self, write: Any) -> None:
        """Stream a file through `write(file)`, atomically (a temporary then a rename on local disk; a GCS
        object appears whole when its upload completes), never holding the whole file in memory."""
        _make_dirs(self.fs, posixpath.dirname(self.path), self.file_mode)
        if self.is_local:
            self._replace_atomically(write)
            return
        with self.fs.open_output_stream(self.path) as f:
            write(f)

    def remove_temporaries(self) -> int:
        """Delete the `.tmp-*` files a killed writer left in this directory; returns how many."""
        if not self.is_local or not self.exists():
            return 0
        stale = [i.path for i in self.fs.get_file_info(pafs.FileSelector(self.path))
                 if posixpath.basename(i.path).startswith(TEMPORARY_PREFIX)]
        for path in stale:
            self.fs.delete_file(path)
        return len(stale)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_json(self, obj: Any) -> None:
        self.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    def read_json(self) -> Any:
        return json.loads(self.read_text())

    def write_table(self, table: pa.Table, row_group_size: int | None = None) -> None:
        """One parquet file, written atomically and streamed (no in-memory copy of the file); `row_group_size`
        bounds what a ranged read has to decode."""
        self.write_with(lambda f: pq.write_table(table, f, row_group_size=row_group_size))

    def delete_file(self) -> None:
        """Remove one file if it exists (a part that failed validation)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self.path)

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        """Read a parquet file, or every parquet file of a directory."""
        self.refresh()
        return pq.read_table(self.path, filesystem=self.fs, columns=columns)

    def local_path(self) -> Path:
        """The local filesystem path (only for local locations, e.g. for matplotlib)."""
        if self.is_gcs:
            raise ValueError(f"{self.uri} is not on local disk")
        return Path(self.path)


def _make_dirs(fs: pafs.FileSystem, path: str, file_mode: int) -> None:
    """Create `path` and its missing parents. On local disk the directories this creates get
    `directory_mode(file_mode)` exactly (whatever the umask); existing ones, the user's, are left as they are."""
    if not isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path, recursive=True)
        return
    missing = []
    current = Path(path)
    while not current.is_dir():
        if current.exists() or current.is_symlink():
            raise InputError(f"{path}: {current} exists and is not a directory")
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    mode = directory_mode(file_mode)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:  # another writer (a Ray worker) made it meanwhile: theirs has the same mode
            continue
        os.chmod(directory, mode)  # mkdir's mode passes through the umask


def apply_file_mode(location: Location) -> None:
    """Give everything under a local directory that another library wrote (Ray Train's checkpoints) the
    location's file mode, and its directories the matching directory mode; gs:// is left alone."""
    if not location.is_local or not os.path.isdir(location.path):
        return
    os.chmod(location.path, directory_mode(location.file_mode))
    for root, dirs, files in os.walk(location.path):  # symlinks (and what they point to) are left alone
        for name, mode in [*((d, directory_mode(location.file_mode)) for d in dirs),
                           *((f, location.file_mode) for f in files)]:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, mode)


def resolve(uri: str, file_mode: int = DEFAULT_FILE_MODE) -> Location:
    """Map a local path or gs:// URI to a Location whose local writes get `file_mode`."""
    if uri.startswith("gs://"):
        return Location(gcs_filesystem(), uri.removeprefix("gs://").rstrip("/"), uri.rstrip("/"), file_mode)
    if "://" in uri:
        raise ValueError(f"unsupported URI scheme: {uri!r} (use a local path or gs://)")
    path = str(Path(uri).expanduser().absolute())
    return Location(pafs.LocalFileSystem(), path, path, file_mode)


def output_location(spec: Any) -> Location:
    """A job's output root, writing with the job's `file_mode`."""
    return resolve(spec.output, file_mode_of(spec))


def storage_env() -> dict[str, str]:
    """The storage-related environment to pass to Ray workers."""
    return {k: os.environ[k] for k in STORAGE_ENV_VARS if k in os.environ}
