"""Which probe a server runs: from a job's output, its probes stage, or one artifact directory (local or gs://).

A job output (with `latest.json`) or a probes stage directory serves its headline probe (`summary.json`'s
`best`: the first target's best prompt probe by CV) unless `--probe NAME` picks another; an artifact directory
(with `probe.json`) serves itself. Only probes on prompt features can run in front of a model (a response
probe needs the response first), and only artifacts that record their chat model.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardray.errors import InputError
from guardray.probes import artifact
from guardray.probes.artifact import META
from guardray.spec import RESPONSE_POOLINGS, ModelSpec
from guardray.storage import Location, resolve

PROMPT_POOLINGS = ("last", "mean", "mean_all")


@dataclass(frozen=True)
class ServedProbe:
    """A loaded probe artifact and where it came from."""

    uri: str
    meta: dict[str, Any]
    probe: Any  # artifact.LinearProbe | artifact.PickledProbe: `.score(features) -> scores`

    @property
    def model_spec(self) -> ModelSpec:
        """The chat model the probe was trained on; artifacts from before `model` was recorded give the id and
        rendering they have (revision and dtype then take the spec's defaults)."""
        if "model" in self.meta:
            return ModelSpec(**self.meta["model"])
        return ModelSpec(id=self.meta["chat_model"], **self.meta.get("rendering", {}))


def find_probe(target: str, name: str | None = None) -> ServedProbe:
    """The artifact `target` names (job output, probes stage or artifact dir), loaded and checked."""
    location = resolve(target)
    if location.join(META).exists():
        directory = location
    else:
        stage = _probes_stage(location)
        directory = stage.join("artifacts", _probe_name(stage, name))
    meta, probe = _load(directory)
    meta.setdefault("name", directory.uri.rstrip("/").rsplit("/", 1)[-1])  # artifacts before names were recorded
    served = ServedProbe(directory.uri, meta, probe)
    _check(served)
    return served


def _probes_stage(location: Location) -> Location:
    if location.join("summary.json").exists() and location.join("artifacts").exists():
        return location
    latest = location.join("latest.json")
    if not latest.exists():
        raise InputError(f"{location.uri}: not a job output (no latest.json), a probes stage or a probe artifact "
                         f"(no {META})")
    stages = latest.read_json()["stages"]
    if "probes" not in stages:
        raise InputError(f"{location.uri}: this job's last run has no probes stage; run it with `guardray run`")
    stage = resolve(stages["probes"])
    if not stage.join("_SUCCESS").exists():
        raise InputError(f"{stage.uri}: the probes stage did not finish; run the job again")
    return stage


def _probe_name(stage: Location, name: str | None) -> str:
    summary = stage.join("summary.json").read_json()
    if name is None:
        return summary["best"]["name"]
    names = [p["name"] for p in summary["probes"]]
    if name not in names:
        raise InputError(f"--probe {name!r}: not in {stage.uri} (probes: {', '.join(names)})")
    return name


def _load(directory: Location) -> tuple[dict[str, Any], Any]:
    """safetensors reads local files: a gs:// artifact is copied to a temporary directory first."""
    if directory.is_local:
        probe = artifact.load(directory.local_path())
        return probe.meta, probe
    with tempfile.TemporaryDirectory() as tmp:
        for name in directory.list():
            (Path(tmp) / name).write_bytes(directory.join(name).read_bytes())
        probe = artifact.load(tmp)
    return probe.meta, probe


def _check(served: ServedProbe) -> None:
    meta = served.meta
    missing = [key for key in ("name", "layer", "pooling", "chat_model") if key not in meta]
    if missing:
        raise InputError(f"{served.uri}: the artifact does not record {', '.join(missing)}; refit it with this "
                         f"version of guardray")
    if meta["pooling"] in RESPONSE_POOLINGS or meta["pooling"] not in PROMPT_POOLINGS:
        raise InputError(f"{served.uri}: pooling {meta['pooling']!r} reads a response; a server scores prompts "
                         f"(poolings {', '.join(PROMPT_POOLINGS)})")
