"""Portable probe artifacts: linear probes as JSON + safetensors (no pickle), others pickled with a warning.

A linear probe's score is `((normalize(x) - mean) / scale) · weight + bias`, which is all a serving system
needs; `load(location)` returns an object whose `score(features)` reproduces the sklearn pipeline exactly.

The one I/O path for artifacts: the probes stage saves, the report and the server load, all through a
`guardray.storage.Location` (local directory or gs://). The files go through memory as bytes (safetensors
(de)serialises bytes too), so no temporary copy on local disk is needed for gs://, and every file is written
atomically with the location's file mode; `probe.json` is written last, so a directory that has it is whole.

Unpickling runs whatever code the file names, so an artifact is data only while it is JSON + safetensors:
`load` refuses `probe.pkl` unless the caller opts in (`allow_pickle=True`, `guardray serve --allow-pickle`), and
a `probe.json` that asks for pickle for a type that has the portable form (every linear type) is refused
outright (`read_meta`): no genuine artifact is like that. `probe.json` is checked before `probe.pkl` is read.
"""
from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.numpy import load as load_tensors, save as save_tensors
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler

from guardray.errors import InputError, one_line
from guardray.probes.registry import PROBE_TYPES, probe_scores
from guardray.storage import Location

log = logging.getLogger(__name__)
META, WEIGHTS, PICKLE = "probe.json", "probe.safetensors", "probe.pkl"


@dataclass
class LinearProbe:
    meta: dict[str, Any]
    weight: np.ndarray
    bias: float
    mean: np.ndarray | None
    scale: np.ndarray | None
    normalize: bool

    def score(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        if self.normalize:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)
        if self.mean is not None:
            x = (x - self.mean) / self.scale
        return x @ self.weight + self.bias


@dataclass
class PickledProbe:
    meta: dict[str, Any]
    pipeline: Pipeline

    def score(self, features: np.ndarray) -> np.ndarray:
        return probe_scores(self.pipeline, np.asarray(features, dtype=np.float32))


# ------------------------------------------------------------------------------------------------ save
def save(pipeline: Pipeline, location: Location, meta: dict[str, Any]) -> None:
    """Save a fitted sklearn pipeline into directory `location`: linear ones as JSON + safetensors, others
    pickled with a warning."""
    if PROBE_TYPES[meta["type"]].linear:
        pre, probe = pipeline.named_steps["pre"], pipeline.named_steps["probe"]
        scaled = isinstance(pre, StandardScaler)
        save_linear(location, meta, weight=probe.coef_, bias=probe.intercept_,
                    mean=pre.mean_ if scaled else None, scale=pre.scale_ if scaled else None,
                    normalize=isinstance(pre, Normalizer))
        return
    log.warning("%s is not linear: saved with pickle (loading it runs code: serving it needs --allow-pickle)",
                meta["type"])
    location.join(PICKLE).write_bytes(pickle.dumps(pipeline))
    _write_meta(location, {**meta, "format": "pickle"})


def save_linear(location: Location, meta: dict[str, Any], weight: Any, bias: Any, mean: Any = None,
                scale: Any = None, normalize: bool = False) -> None:
    """The portable linear format, shared by sklearn and torch probes: score = standardize(x) · weight + bias."""
    tensors = {"weight": np.asarray(weight, dtype=np.float64).reshape(-1),
               "bias": np.asarray(bias, dtype=np.float64).reshape(-1)}
    if mean is not None:
        tensors["scaler_mean"] = np.asarray(mean, dtype=np.float64).reshape(-1)
        tensors["scaler_scale"] = np.asarray(scale, dtype=np.float64).reshape(-1)
    location.join(WEIGHTS).write_bytes(save_tensors(tensors))
    _write_meta(location, {**meta, "format": "linear", "normalize": normalize})


def _write_meta(location: Location, meta: dict[str, Any]) -> None:
    """`probe.json`, last: its presence marks the artifact whole."""
    location.join(META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))


# ------------------------------------------------------------------------------------------------ load
#: the probe types that may be pickled: those without the portable linear form
PICKLED_TYPES = tuple(name for name, kind in PROBE_TYPES.items() if not kind.linear)


class PickleRefused(InputError):
    """A pickled artifact met a caller that did not opt in to running its code."""


class _Header(BaseModel):
    """The fields of `probe.json` that decide how the rest is read (the others are the probe's metadata)."""

    model_config = ConfigDict(extra="allow")
    format: Literal["linear", "pickle"]
    type: str | None = None


def read_meta(location: Location, allow_pickle: bool = False) -> dict[str, Any]:
    """`probe.json` of the artifact in `location`, checked before anything else of the artifact is read: its
    format, a pickle only for a type that has no portable form, and only when the caller allows pickles.
    Every failure is a one-line InputError naming the file."""
    where = location.uri
    try:
        meta = json.loads(location.join(META).read_bytes())
    except (OSError, ValueError) as e:
        raise InputError(f"{where}/{META}: {one_line(e)}") from None
    try:
        header = _Header.model_validate(meta)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or META
        raise InputError(f"{where}/{META}: {field}: {first['msg']}") from None
    if header.format == "pickle":
        if header.type not in PICKLED_TYPES:
            raise InputError(f"{where}/{META}: format 'pickle' for probe type {header.type!r}: only "
                             f"{', '.join(PICKLED_TYPES)} are pickled (linear probes are always safetensors); "
                             f"refusing to unpickle {PICKLE}")
        if not allow_pickle:
            raise PickleRefused(f"{where}/{PICKLE}: a pickled probe ({header.type}) runs code when loaded; load "
                                f"it only if you trust where it came from (guardray serve --allow-pickle)")
    return dict(meta)


def load(location: Location, allow_pickle: bool = False) -> LinearProbe | PickledProbe:
    """The artifact in directory `location` (local or gs://). A pickled one (a non-linear probe type) is
    unpickled only with `allow_pickle`; otherwise `PickleRefused` (an InputError) before `probe.pkl` is read."""
    meta = read_meta(location, allow_pickle)
    if meta["format"] == "pickle":
        return PickledProbe(meta, pickle.loads(location.join(PICKLE).read_bytes()))
    t = load_tensors(location.join(WEIGHTS).read_bytes())
    return LinearProbe(meta, t["weight"], float(t["bias"][0]), t.get("scaler_mean"), t.get("scaler_scale"),
                       bool(meta["normalize"]))
