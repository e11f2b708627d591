"""The stage cache: `<output>/<stage>-<hash>/` with `spec.json` (what the hash covers) and `_SUCCESS` last.

A stage's hash covers exactly the spec parts its result depends on plus its inputs' hashes, so editing probe
parameters reuses the features, and editing the chat model recomputes features but not the dataset.
A directory without `_SUCCESS` is an interrupted run: the stage decides whether to resume inside it
(the features stage keeps finished shards) or to start it over.
"""
from __future__ import annotations

import calendar
import hashlib
import json
import posixpath
import re
import time
from dataclasses import dataclass
from typing import Any

from guardray.storage import Location

MARKER = "_SUCCESS"
SPEC_FILE = "spec.json"
#: `<output>/latest.json`: {"job": name, "stages": {stage: directory}}, merged by every run (`runner`).
LATEST_FILE = "latest.json"
def stable_hash(payload: Any, length: int = 12) -> str:
    """Hash of a JSON-able value, independent of dict order."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class StageDir:
    """One stage's output directory and the key it was computed from."""

    stage: str
    key: dict[str, Any]
    location: Location

    @classmethod
    def for_stage(cls, output: Location, stage: str, part: dict[str, Any], upstream: dict[str, str],
                  format: int) -> "StageDir":
        """The directory of `stage` whose result depends on `part` of the spec, its output `format` and its
        inputs' directories (`upstream`: {stage: directory name})."""
        key = {"stage": stage, "format": format, "spec": part, "inputs": upstream}
        return cls(stage, key, output.join(f"{stage}-{stable_hash(key)}"))

    @property
    def name(self) -> str:
        return self.location.path.rsplit("/", 1)[-1]

    @property
    def done(self) -> bool:
        return self.location.join(MARKER).exists()

    @property
    def state(self) -> str:
        """'done', 'incomplete' (directory without marker) or 'missing'."""
        if self.done:
            return "done"
        return "incomplete" if self.location.exists() else "missing"

    @property
    def detail(self) -> str:
        """Why an incomplete directory is not a result, for `guardray status` ('' for done or missing): a run
        that failed at once leaves only spec.json; one that failed later leaves what it wrote (kept parts
        resume a resumable stage, anything else is redone)."""
        if self.state != "incomplete":
            return ""
        entries = self.location.list() + self.location.list_dirs()
        if set(entries) <= {SPEC_FILE}:
            return f"no {MARKER}; holds only {SPEC_FILE}" if entries else f"no {MARKER}; empty"
        parts = self.location.join("parts").list(".parquet")
        return f"no {MARKER}; {len(parts)} parts kept" if parts else f"no {MARKER}"

    def begin(self, fresh: bool) -> None:
        """Prepare the directory: wipe it when `fresh` (forced, or a stage that cannot resume)."""
        if fresh:
            self.location.delete()
        self.location.mkdir()
        self.location.join(SPEC_FILE).write_json(self.key)

    def commit(self, summary: dict[str, Any]) -> None:
        """Write the summary, then the marker: a directory with the marker is complete by construction. The
        marker's `finished_ns` orders finished directories of one stage (`newest_finished`)."""
        self.location.join("summary.json").write_json(summary)
        self.location.join(MARKER).write_json({"finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                               "finished_ns": time.time_ns()})

    def summary(self) -> dict[str, Any]:
        loc = self.location.join("summary.json")
        return loc.read_json() if loc.exists() else {}


def finished_at(stage_dir: Location) -> int | None:
    """When a stage directory was committed (ns since the epoch), from its marker; None without one."""
    marker = stage_dir.join(MARKER)
    if not marker.exists():
        return None
    try:
        stamp = marker.read_json()
    except ValueError:  # a marker from elsewhere (an empty _SUCCESS file): still finished, of unknown age
        return 0
    if not isinstance(stamp, dict):
        return 0
    if "finished_ns" in stamp:
        return int(stamp["finished_ns"])
    try:  # markers written before finished_ns: second resolution
        return calendar.timegm(time.strptime(stamp["finished_at"], "%Y-%m-%dT%H:%M:%SZ")) * 10**9
    except (KeyError, TypeError, ValueError):
        return 0


def newest_finished(output: Location, stage: str) -> Location | None:
    """The `<stage>-<hash>` directory of `output` committed last (only directories with the marker count:
    a failed run's leftovers never do), or None."""
    name = re.compile(rf"^{re.escape(stage)}-[0-9a-f]{{12}}$")
    finished = [(stamp, d) for d in output.list_dirs() if name.match(d)
                if (stamp := finished_at(output.join(d))) is not None]
    return output.join(max(finished)[1]) if finished else None


def latest_stage(output: Location, kind: str) -> Location | None:
    """The finished `kind` stage (e.g. 'probes', 'report') of a job output: the directory latest.json names
    when it holds the completion marker, else the newest finished `<kind>-<hash>` directory, else None.

    A named directory is looked up by its name inside `output`, so an output that was copied or moved
    elsewhere still finds its own stages."""
    latest = output.join(LATEST_FILE)
    if latest.exists():
        try:
            named = (latest.read_json().get("stages") or {}).get(kind)
        except (ValueError, AttributeError):
            named = None
        if named:
            candidate = output.join(posixpath.basename(str(named).rstrip("/")))
            if candidate.join(MARKER).exists():
                return candidate
    return newest_finished(output, kind)
