"""Portable probe artifacts: linear probes as JSON + safetensors (no pickle), others pickled with a warning.

A linear probe's score is `((normalize(x) - mean) / scale) · weight + bias`, which is all a serving system
needs; `load(path)` returns an object whose `score(features)` reproduces the sklearn pipeline exactly.
"""
from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler

from guardray.probes.registry import PROBE_TYPES, probe_scores

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


def save(pipeline: Pipeline, meta: dict[str, Any], directory: Path) -> None:
    """Save a fitted sklearn pipeline: linear ones as JSON + safetensors, others pickled with a warning."""
    if PROBE_TYPES[meta["type"]].linear:
        pre, probe = pipeline.named_steps["pre"], pipeline.named_steps["probe"]
        scaled = isinstance(pre, StandardScaler)
        save_linear(directory, meta, weight=probe.coef_, bias=probe.intercept_,
                    mean=pre.mean_ if scaled else None, scale=pre.scale_ if scaled else None,
                    normalize=isinstance(pre, Normalizer))
        return
    directory.mkdir(parents=True, exist_ok=True)
    log.warning("%s is not linear: saved with pickle (load only artifacts you trust)", meta["type"])
    (directory / PICKLE).write_bytes(pickle.dumps(pipeline))
    (directory / META).write_text(json.dumps({**meta, "format": "pickle"}, indent=2, sort_keys=True, default=str))


def save_linear(directory: Path, meta: dict[str, Any], weight: Any, bias: Any, mean: Any = None, scale: Any = None,
                normalize: bool = False) -> None:
    """The portable linear format, shared by sklearn and torch probes: score = standardize(x) · weight + bias."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"weight": np.asarray(weight, dtype=np.float64).reshape(-1),
               "bias": np.asarray(bias, dtype=np.float64).reshape(-1)}
    if mean is not None:
        tensors["scaler_mean"] = np.asarray(mean, dtype=np.float64).reshape(-1)
        tensors["scaler_scale"] = np.asarray(scale, dtype=np.float64).reshape(-1)
    save_file(tensors, str(directory / WEIGHTS))
    meta = {**meta, "format": "linear", "normalize": normalize}
    (directory / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))


def load(path: str | Path) -> LinearProbe | PickledProbe:
    directory = Path(path)
    meta = json.loads((directory / META).read_text())
    if meta["format"] == "pickle":
        return PickledProbe(meta, pickle.loads((directory / PICKLE).read_bytes()))
    t = load_file(str(directory / WEIGHTS))
    return LinearProbe(meta, t["weight"], float(t["bias"][0]), t.get("scaler_mean"), t.get("scaler_scale"),
                       bool(meta["normalize"]))
