"""The probes stage: a grid of (feature column × probe type × hyper-parameters), cross-validated in parallel
with Ray Tune, then the best configuration per feature column refit on the whole train split.

Feature matrices are put in the object store once (`tune.with_parameters`) and shared by every trial; each
trial runs stratified K-fold CV on the train split only and reports the mean and std of each metric.
"""
from __future__ import annotations

import itertools
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from sklearn import metrics
from sklearn.model_selection import StratifiedKFold

from guardray.errors import InputError
from guardray.evaluate import recall_at_fpr
from guardray.features import labelled, matrix, read_features
from guardray.probes import artifact
from guardray.probes.registry import build_probe, probe_scores
from guardray.spec import JobSpec, ProbesSpec
from guardray.storage import Location

log = logging.getLogger(__name__)

CV_METRICS = ("roc_auc", "average_precision", "recall_at_fpr")


def expand_grid(spec: ProbesSpec, feature_columns: list[str]) -> list[dict[str, Any]]:
    """Every (feature, probe type, preprocessing, params) combination; list values expand."""
    configs = []
    for entry in spec.grid:
        keys = list(entry.params)
        values = [v if isinstance(v, list) else [v] for v in entry.params.values()]
        for combo in itertools.product(*values) if keys else [()]:
            for feature in feature_columns:
                configs.append({"feature": feature, "type": entry.type, "preprocessing": entry.preprocessing,
                                "params": dict(zip(keys, combo))})
    return configs


def cross_validate(config: dict[str, Any], x: np.ndarray, y: np.ndarray, folds: int, seed: int,
                   max_fpr: float) -> dict[str, float]:
    """Stratified K-fold CV of one configuration: mean and std of each metric, and fit time."""
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    per_fold: dict[str, list[float]] = {m: [] for m in CV_METRICS}
    fit_seconds = 0.0
    for train, valid in splitter.split(x, y):
        probe = build_probe(config["type"], config["preprocessing"], config["params"], seed)
        started = time.perf_counter()
        probe.fit(x[train], y[train])
        fit_seconds += time.perf_counter() - started
        scores = probe_scores(probe, x[valid])
        per_fold["roc_auc"].append(metrics.roc_auc_score(y[valid], scores))
        per_fold["average_precision"].append(metrics.average_precision_score(y[valid], scores))
        per_fold["recall_at_fpr"].append(recall_at_fpr(y[valid], scores, max_fpr) or 0.0)
    result = {f"{m}_mean": float(np.mean(v)) for m, v in per_fold.items()}
    result.update({f"{m}_std": float(np.std(v)) for m, v in per_fold.items()})
    result["fit_seconds"] = fit_seconds / folds
    return result


def _trial(config: dict[str, Any], data: dict[str, Any]) -> None:
    from ray import tune

    trial = config["trial"]
    started = time.time()
    result = cross_validate(trial, data["x"][trial["feature"]], data["y"], data["folds"], data["seed"], data["max_fpr"])
    tune.report({**result, "trial_id": trial["id"], "trial_start": started, "trial_end": time.time()})


def run_grid(spec: ProbesSpec, x: dict[str, np.ndarray], y: np.ndarray, configs: list[dict[str, Any]]) -> pd.DataFrame:
    """One Ray Tune trial per configuration, `max_concurrent_trials` at a time."""
    import ray
    from ray import tune

    for i, config in enumerate(configs):
        config["id"] = i
    data = {"x": x, "y": y, "folds": spec.cv.folds, "seed": spec.cv.seed, "max_fpr": spec.cv.max_fpr}
    trainable = tune.with_resources(tune.with_parameters(_trial, data=data), {"cpu": spec.cpus_per_trial})
    concurrency = spec.max_concurrent_trials or max(1, int(ray.cluster_resources().get("CPU", 1) // spec.cpus_per_trial))
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(configs)},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=True),
        run_config=tune.RunConfig(name="probes", storage_path=tempfile.mkdtemp(prefix="guardray-tune-"),
                                  verbose=0),
    )
    grid = tuner.fit()
    rows = []
    for result in grid:
        if result.error:
            raise RuntimeError(f"probe trial failed: {result.error}")
        trial = result.config["trial"]
        rows.append({"trial_id": trial["id"], "feature": trial["feature"], "type": trial["type"],
                     "preprocessing": trial["preprocessing"], "params": trial["params"],
                     **{k: v for k, v in result.metrics.items() if k.endswith(("_mean", "_std")) or k == "fit_seconds"},
                     "trial_start": result.metrics["trial_start"], "trial_end": result.metrics["trial_end"],
                     "pid": result.metrics.get("pid")})
    return pd.DataFrame(rows).sort_values("trial_id").reset_index(drop=True)


def run_probes(spec: JobSpec, inputs: dict[str, Location], out: Location) -> dict[str, Any]:
    """The probes stage: CV grid with Tune, refit the best per feature column, save artifacts."""
    table = read_features(inputs["features"])
    target = spec.probes.target
    if target not in table.column_names:
        labels = [f.name for f in table.schema if f.type == pa.bool_() and f.name != "truncated"]
        raise InputError(f"probes.target: column '{target}' not in the features; labels are: {', '.join(labels)}")
    feature_columns = [c for c in table.column_names if c.startswith("act_")]
    if spec.probes.features:
        unknown = sorted(set(spec.probes.features) - set(feature_columns))
        if unknown:
            raise InputError(f"probes.features: {', '.join(unknown)} not extracted; available: {', '.join(feature_columns)}")
        feature_columns = list(spec.probes.features)
    train = labelled(table.filter(pc.equal(table.column("split"), "train")), target)
    y = np.asarray(train.column(target).to_pylist(), dtype=bool)
    if len(np.unique(y)) < 2 or min(y.sum(), (~y).sum()) < spec.probes.cv.folds:
        raise InputError(f"probes: the train split needs at least {spec.probes.cv.folds} rows of each class "
                         f"of '{target}' (has {int(y.sum())} true, {int((~y).sum())} false)")
    x = {c: matrix(train, c) for c in feature_columns}
    configs = expand_grid(spec.probes, feature_columns)
    log.info("probes: %d configurations x %d folds on %d train rows", len(configs), spec.probes.cv.folds, len(y))
    results = run_grid(spec.probes, x, y, configs)
    out.join("cv_results.csv").write_text(results.to_csv(index=False))
    out.join("cv_results.parquet").write_table(pa.Table.from_pandas(results.assign(params=results["params"].map(str)),
                                                                    preserve_index=False))
    selection = f"{spec.probes.cv.metric}_mean"
    best_per_feature = results.sort_values(selection, ascending=False).groupby("feature", sort=False).head(1)
    saved = []
    for row in best_per_feature.itertuples():
        name = f"{row.feature}-{row.type}"
        probe = build_probe(row.type, row.preprocessing, row.params, spec.probes.cv.seed).fit(x[row.feature], y)
        meta = _probe_meta(spec, row, selection)
        store_artifact(out, name, lambda directory: artifact.save(probe, meta, directory))
        saved.append({"name": name, "feature": row.feature, "type": row.type, selection: getattr(row, selection)})
    if spec.probes.torch_probe.enabled:
        saved.append(_torch_probe(spec, inputs["features"], x, saved[0]["feature"], out))
    best = saved[0]
    return {"configurations": len(configs), "selection_metric": selection, "best": best, "probes": saved,
            "train_rows": len(y)}


def _torch_probe(spec: JobSpec, features: Location, x: dict[str, np.ndarray], best_feature: str,
                 out: Location) -> dict[str, Any]:
    """Train the torch probe with Ray Train on the configured feature (default: the best CV feature)."""
    from guardray.probes.torch_probe import TORCH_PROBE_TYPE, train_torch_probe

    config = spec.probes.torch_probe
    feature = config.feature or best_feature
    if feature not in x:
        raise InputError(f"probes.torch_probe.feature: '{feature}' not extracted; available: {', '.join(x)}")
    fitted = train_torch_probe(config, features, feature, spec.probes.target, x[feature].shape[1],
                               out.join("torch_train"), seed=spec.probes.cv.seed)
    name = f"{feature}-{TORCH_PROBE_TYPE}"
    params = config.model_dump(include={"workers", "epochs", "lr", "weight_decay", "batch_size"})
    meta = {**probe_meta(spec, feature, TORCH_PROBE_TYPE, "standardize", params),
            "history": fitted["history"], "use_gpu": fitted["use_gpu"]}
    store_artifact(out, name, lambda directory: artifact.save_linear(
        directory, meta, fitted["weight"], fitted["bias"], fitted["mean"], fitted["scale"]))
    return {"name": name, "feature": feature, "type": TORCH_PROBE_TYPE, "final_loss": fitted["history"][-1]["loss"]}


def store_artifact(out: Location, name: str, write: Callable[[Path], None]) -> None:
    """`write` saves into a local directory (safetensors needs local files); the files are then copied to
    `<stage>/artifacts/<name>/`, local or gs://."""
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        for file in Path(tmp).iterdir():
            out.join("artifacts", name, file.name).write_bytes(file.read_bytes())


def probe_meta(spec: JobSpec, feature: str, probe_type: str, preprocessing: str, params: dict[str, Any]) -> dict[str, Any]:
    """What a serving system needs besides the weights: where the features come from and how prompts render."""
    pooling, layer = feature.removeprefix("act_").rsplit("_L", 1)
    return {
        "type": probe_type, "preprocessing": preprocessing, "params": params, "feature": feature,
        "layer": int(layer), "pooling": pooling, "target": spec.probes.target,
        "chat_model": spec.model.id, "rendering": spec.model.model_dump(
            include={"chat_template", "system_prompt", "max_length", "truncation"}),
        "threshold": spec.evaluate.probe_threshold,
    }


def _probe_meta(spec: JobSpec, row: Any, selection: str) -> dict[str, Any]:
    return {**probe_meta(spec, row.feature, row.type, row.preprocessing, row.params),
            "cv": {selection: getattr(row, selection)}}
