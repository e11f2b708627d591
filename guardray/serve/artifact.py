"""Which probe a server runs: from a job's output, its probes stage, or one artifact directory (local or gs://).

A job output (with `latest.json`) or a probes stage directory serves its headline probe (`summary.json`'s
`best`: the first target's best prompt probe by CV) unless `--probe NAME` picks another; an artifact directory
(with `probe.json`) serves itself. Only probes on prompt features can run in front of a model (a response
probe needs the response first), and only artifacts that record their chat model.

An artifact is data, not configuration: it names the chat model it was trained on (id, revision, rendering),
but never whether that model's own code may run (`trust_remote_code` comes from the server's settings only),
and a pickled probe is read only when the server allows pickles (`--allow-pickle`): `probe.json` is checked
before `probe.pkl` is opened or downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from guardray.columns import POOLING_CONSTANTS, PROMPT_POOLINGS
from guardray.errors import InputError, one_line
from guardray.probes import artifact
from guardray.probes.artifact import META
from guardray.jobspec import ModelSpec
from guardray.storage import Location, resolve


@dataclass(frozen=True)
class ServedProbe:
    """A loaded probe artifact and where it came from."""

    uri: str
    meta: dict[str, Any]
    # artifact.LinearProbe | artifact.PickledProbe: `.score(features) -> scores`; None when only the metadata
    # was read (`find_probe(..., unpickle=False)`)
    probe: Any

    @property
    def model_spec(self) -> ModelSpec:
        """The chat model the probe was trained on, with `trust_remote_code` off whatever the artifact says (the
        server's settings turn it on: `loading.serving_spec`). The probes stage's format version keeps older
        artifacts, which did not record `model`, out of reach."""
        if "model" not in self.meta:
            raise InputError(f"{self.uri}/{META}: no `model` record: an artifact of an older probes format; "
                             "rerun the probes stage")
        return untrusted_model(self.meta["model"], self.uri)


def untrusted_model(fields: Any, uri: str) -> ModelSpec:
    """A ModelSpec from an artifact's record, whose own `trust_remote_code` is dropped; a record the spec
    refuses is a one-line InputError naming the artifact."""
    if not isinstance(fields, dict):
        raise InputError(f"{uri}/{META}: model: not a mapping")
    try:
        return ModelSpec(**{**fields, "trust_remote_code": False})
    except ValueError as e:
        raise InputError(f"{uri}/{META}: model: {one_line(e)}") from None


def find_probe(target: str, name: str | None = None, allow_pickle: bool = False,
               unpickle: bool = True) -> ServedProbe:
    """The artifact `target` names (job output, probes stage or artifact dir), loaded and checked. A pickled
    probe needs `allow_pickle` even to read its metadata; `unpickle=False` then reads the metadata only (the
    CLI checks the artifact and writes configs without running its code)."""
    location = resolve(target)
    if location.join(META).exists():
        directory = location
    else:
        stage = _probes_stage(location)
        directory = stage.join("artifacts", _probe_name(stage, name))
    meta, probe = _load(directory, allow_pickle, unpickle)
    meta.setdefault("name", directory.uri.rstrip("/").rsplit("/", 1)[-1])  # artifacts before names were recorded
    served = ServedProbe(directory.uri, meta, probe)
    _check(served)
    return served


def _probes_stage(location: Location) -> Location:
    """A finished probes stage itself, or the one a job output's `latest.json` names; when that one is missing
    or unfinished (a partial or failed rerun), the newest probes stage with its completion marker."""
    from guardray.cache import MARKER, latest_stage

    if location.join("summary.json").exists() and location.join("artifacts").exists():
        if not location.join(MARKER).exists():
            raise InputError(f"{location.uri}: the probes stage did not finish (no {MARKER}); run the job again")
        return location
    stage = latest_stage(location, "probes")
    if stage is None:
        raise InputError(f"{location.uri}: no finished probes stage (probes-<hash> with {MARKER}), probes stage "
                         f"or probe artifact ({META}); run the job with `guardray run`")
    return stage


def _probe_name(stage: Location, name: str | None) -> str:
    summary = stage.join("summary.json").read_json()
    if name is None:
        return summary["best"]["name"]
    names = [p["name"] for p in summary["probes"]]
    if name not in names:
        raise InputError(f"--probe {name!r}: not in {stage.uri} (probes: {', '.join(names)})")
    return name


def _load(directory: Location, allow_pickle: bool, unpickle: bool) -> tuple[dict[str, Any], Any]:
    """`probe.json` is checked first (format, pickle allowed); with `unpickle=False` a pickled probe's metadata
    is all that is read."""
    meta = artifact.read_meta(directory, allow_pickle)
    if meta["format"] == "pickle" and not unpickle:
        return meta, None
    probe = artifact.load(directory, allow_pickle)
    return probe.meta, probe


def _check(served: ServedProbe) -> None:
    meta = served.meta
    missing = [key for key in ("name", "layer", "pooling", "chat_model") if key not in meta]
    if missing:
        raise InputError(f"{served.uri}: the artifact does not record {', '.join(missing)}; refit it with this "
                         f"version of guardray")
    if meta["pooling"] not in PROMPT_POOLINGS:
        raise InputError(f"{served.uri}: pooling {meta['pooling']!r} reads a response; a server scores prompts "
                         f"(poolings {', '.join(PROMPT_POOLINGS)})")
    recorded, here = meta.get("pooling_constants"), POOLING_CONSTANTS.get(meta["pooling"])
    if here is not None and recorded != here:
        raise InputError(f"{served.uri}: pooling {meta['pooling']!r} was trained with {recorded} and this guardray "
                         f"computes it with {here}: refit the probe")
