"""Probe types: name → how to build the scikit-learn estimator. Adding a type is one registered entry.

Every probe yields a continuous score (its decision function, or the log-odds of predict_proba) so it can be
thresholded and compared with the guard's log-odds on the same footing.
"""
from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from sklearn import ensemble, linear_model, naive_bayes, svm
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler

from guardray.columns import FeatureInfo
from guardray.errors import InputError


@dataclass(frozen=True)
class ProbeType:
    build: Callable[..., Any]
    linear: bool  # linear probes export as JSON + safetensors (no pickle)
    defaults: dict[str, Any]


PROBE_TYPES: dict[str, ProbeType] = {
    "logistic_regression": ProbeType(linear_model.LogisticRegression, True, {"C": 1.0, "max_iter": 2000}),
    "linear_svc": ProbeType(svm.LinearSVC, True, {"C": 1.0, "max_iter": 5000}),
    "rbf_svc": ProbeType(svm.SVC, False, {"kernel": "rbf", "C": 1.0}),
    "passive_aggressive": ProbeType(linear_model.SGDClassifier, True,
                                    {"loss": "hinge", "penalty": None, "learning_rate": "pa1", "eta0": 1.0}),
    "sgd": ProbeType(linear_model.SGDClassifier, True, {"loss": "log_loss", "alpha": 1e-4}),
    "ridge": ProbeType(linear_model.RidgeClassifier, True, {"alpha": 1.0}),
    "random_forest": ProbeType(ensemble.RandomForestClassifier, False, {"n_estimators": 200}),
    "naive_bayes": ProbeType(naive_bayes.GaussianNB, False, {}),
}

PREPROCESSING: dict[str, Callable[[], Any]] = {
    "none": lambda: FunctionTransformer(),
    "standardize": StandardScaler,
    "normalize": Normalizer,
}


@dataclass(frozen=True)
class ProbeId:
    """What a probe is: the target it predicts, its feature column (with the layer and pooling its field
    metadata records), type, preprocessing and hyper-parameters. Results, artifacts and the report carry this
    structure (`to_dict`), so no code parses a probe's name or its column's name back into their parts."""

    feature: FeatureInfo
    type: str
    preprocessing: str
    params: dict[str, Any]
    target: str = "harmful"

    @property
    def name(self) -> str:
        """`<target>/<feature>-<type>`: the artifact directory under `artifacts/` and the scorer's name, one best
        probe of each type per (target, feature column)."""
        return f"{self.target}/{self.feature.column}-{self.type}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target, "feature": self.feature.column, "layer": self.feature.layer,
                "pooling": self.feature.pooling, "type": self.type, "preprocessing": self.preprocessing,
                "params": dict(self.params)}


def check_probe_type(probe_type: str) -> None:
    """A ValueError naming the closest registered type (spec validation turns it into a one-line error)."""
    if probe_type not in PROBE_TYPES:
        hint = difflib.get_close_matches(probe_type, PROBE_TYPES, n=1)
        extra = f"did you mean '{hint[0]}'?" if hint else f"known: {', '.join(PROBE_TYPES)}"
        raise ValueError(f"unknown probe type '{probe_type}'; {extra}")


def grid_points(params: dict[str, Any]) -> list[dict[str, Any]]:
    """`{C: [0.1, 1], max_iter: 100}` → `[{C: 0.1, max_iter: 100}, {C: 1, max_iter: 100}]`."""
    values = [v if isinstance(v, list) else [v] for v in params.values()]
    return [dict(zip(params, combo)) for combo in itertools.product(*values)]


def check_probe_params(probe_type: str, params: dict[str, Any]) -> None:
    """Build every grid point's estimator and run scikit-learn's own parameter checks (names, types, ranges)
    without fitting: a ValueError names the parameter, with a "did you mean" for a misspelt one."""
    if probe_type not in PROBE_TYPES:
        return  # reported by check_probe_type
    kind = PROBE_TYPES[probe_type]
    known = sorted(kind.build().get_params())
    for name in params:
        if name not in known:
            hint = difflib.get_close_matches(name, known, n=1)
            extra = f"did you mean '{hint[0]}'?" if hint else f"known: {', '.join(known)}"
            raise ValueError(f"{probe_type} has no parameter '{name}'; {extra}")
    for point in grid_points(params):
        estimator = kind.build(**{**kind.defaults, **point})
        try:
            estimator._validate_params()  # scikit-learn's declarative constraints, as fit() would check them
        except AttributeError:  # an estimator without declared constraints
            pass
        except (ValueError, TypeError) as e:
            raise ValueError(f"{probe_type} {point}: {str(e).splitlines()[0]}") from None


def build_probe(probe_type: str, preprocessing: str, params: dict[str, Any], seed: int = 0) -> Pipeline:
    if probe_type not in PROBE_TYPES:
        raise InputError(f"probes.grid: unknown probe type '{probe_type}'; known: {', '.join(PROBE_TYPES)}")
    kind = PROBE_TYPES[probe_type]
    kwargs = {**kind.defaults, **params}
    if "random_state" in kind.build().get_params():
        kwargs.setdefault("random_state", seed)
    try:
        estimator = kind.build(**kwargs)
    except TypeError as e:
        raise InputError(f"probes.grid: {probe_type}: {e}") from None
    return Pipeline([("pre", PREPROCESSING[preprocessing]()), ("probe", estimator)])


def probe_scores(pipeline: Pipeline, features: np.ndarray) -> np.ndarray:
    """A continuous score where higher means the positive class: decision function, else proba log-odds."""
    if hasattr(pipeline, "decision_function"):
        try:
            return np.asarray(pipeline.decision_function(features), dtype=np.float64)
        except AttributeError:
            pass
    proba = np.clip(pipeline.predict_proba(features)[:, 1], 1e-12, 1 - 1e-12)
    return np.log(proba) - np.log1p(-proba)
