"""The stage cache: `<output>/<stage>-<hash>/` with `spec.json` (what the hash covers) and `_SUCCESS` last.

A stage's hash covers exactly the spec parts its result depends on plus its inputs' hashes, so editing probe
parameters reuses the features, and editing the chat model recomputes features but not the dataset.
A directory without `_SUCCESS` is an interrupted run: the stage decides whether to resume inside it
(the features stage keeps finished shards) or to start it over.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from guardray.storage import Location

MARKER = "_SUCCESS"
#: Bumped when a stage's output format changes, so old directories are not reused.
FORMAT_VERSION = 2  # 2: features parts named by row range, dataset.parquet with 1,024-row row groups
#: A stage's own format, where it changed alone (its directory, and those after it, are recomputed).
STAGE_FORMATS = {"probes": 4}  # 3: artifacts record the model spec, features dtype, guard; 4: numerics (serving)


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
    def for_stage(cls, output: Location, stage: str, part: dict[str, Any], upstream: dict[str, str]) -> "StageDir":
        key = {"stage": stage, "format": STAGE_FORMATS.get(stage, FORMAT_VERSION), "spec": part, "inputs": upstream}
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

    def begin(self, fresh: bool) -> None:
        """Prepare the directory: wipe it when `fresh` (forced, or a stage that cannot resume)."""
        if fresh:
            self.location.delete()
        self.location.mkdir()
        self.location.join("spec.json").write_json(self.key)

    def commit(self, summary: dict[str, Any]) -> None:
        """Write the summary, then the marker: a directory with the marker is complete by construction."""
        self.location.join("summary.json").write_json(summary)
        self.location.join(MARKER).write_json({"finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def summary(self) -> dict[str, Any]:
        loc = self.location.join("summary.json")
        return loc.read_json() if loc.exists() else {}
