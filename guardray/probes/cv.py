"""The probes stage: a grid of (feature column × probe type × hyper-parameters), cross-validated in parallel
with Ray Tune, then the best configuration per feature column refit on the whole train split. With several
`probes.targets`, each target has its own grid in the same Tune run (the trial's config names its target) and its
own refits; artifacts live under `artifacts/<target>/<feature>-<type>/`.

Work goes where the data is. The driver reads the parts' schema (a footer) and holds configurations and metrics,
never a feature matrix. Each Tune trial reads only its own feature column of the train split straight from the
features parquet (`columns.read_column`: projection and a pushed-down filter) and runs stratified K-fold CV
there; trials of one column run back to back, so a reused trial actor keeps that column instead of re-reading
it. Refits run in one Ray task per feature column, which reads that column and writes the artifact itself
(local or gs://). So any process holds about one column's float32 train matrix plus the model, whatever the
number of columns.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from sklearn import metrics
from sklearn.model_selection import StratifiedKFold

from guardray import targets
from guardray.targets import labels_the_response
from guardray.columns import (FEATURE_PREFIX, PARTS_DIR, POOLING_CONSTANTS, RESPONSE_POOLINGS, SOURCE, SPLIT,
                              ColumnData, FeatureInfo, Target, feature_infos, feature_schema, label_counts,
                              read_column, require)
from guardray.shards import footer
from guardray.errors import InputError, StageError, one_line, ray_get
from guardray.evaluate import recall_at_fpr
from guardray.telemetry import peak_rss_mb
from guardray.probes import artifact
from guardray.probes.registry import ProbeId, build_probe, grid_points, probe_scores
from guardray.jobspec import JobSpec, ProbesSpec
from guardray.storage import Location, apply_file_mode, resolve

log = logging.getLogger(__name__)

CV_METRICS = ("roc_auc", "average_precision", "recall_at_fpr")


def expand_grid(spec: ProbesSpec, feature_columns: list[str], targets: list[str] | None = None,
                pairs: list[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """Every (target, feature, probe type, preprocessing, params) combination (of the usable `pairs`, when
    given), grouped by (target, feature) so that the trials reading one column's rows for one target run one
    after the other."""
    configs = []
    usable = set(pairs) if pairs is not None else None
    for target in targets if targets is not None else spec.all_targets:
        for feature in feature_columns:
            if usable is not None and (target, feature) not in usable:
                continue
            for entry in spec.grid:
                for params in grid_points(entry.params):
                    configs.append({"target": target, "feature": feature, "type": entry.type,
                                    "preprocessing": entry.preprocessing, "params": params})
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


#: The column this worker process read last: a reused trial actor whose next trial is on the same column keeps
#: it instead of reading it again. One slot, so a process never holds more than one column.
_last_column: dict[tuple[str, str, str], ColumnData] = {}


def train_column(stage_uri: str, feature: str, target: Target) -> ColumnData:
    """The train split of one feature column, rows with a known `target` label, read on this worker (or kept
    from its previous trial). The key holds the label's expression: other thresholds are other rows."""
    key = (stage_uri, feature, f"{target.name}:{target.expression}")
    if key not in _last_column:
        _last_column.clear()  # drop the previous column before reading the next
        _last_column[key] = read_column(resolve(stage_uri), feature, target, "train")
    return _last_column[key]


def _trial(config: dict[str, Any], stage_uri: str, targets: dict[str, Target], folds: int, seed: int,
           max_fpr: float) -> None:
    from ray import tune

    trial = config["trial"]
    started = time.time()
    data = train_column(stage_uri, trial["feature"], targets[trial["target"]])
    result = cross_validate(trial, data.x, data.y, folds, seed, max_fpr)
    tune.report({**result, "trial_id": trial["id"], "trial_start": started, "trial_end": time.time(),
                 "columns_read": ",".join(data.columns_read), "train_rows": len(data.y), "peak_rss_mb": peak_rss_mb(),
                 "pid": os.getpid()})


def run_grid(spec: ProbesSpec, features: Location, configs: list[dict[str, Any]],
             targets: dict[str, Target]) -> pd.DataFrame:
    """One Ray Tune trial per configuration (all targets in one run), `max_concurrent_trials` at a time; the
    trials read their own data."""
    import ray
    from ray import tune

    for i, config in enumerate(configs):
        config["id"] = i
    trainable = tune.with_parameters(_trial, stage_uri=features.uri, targets=targets, folds=spec.cv.folds,
                                     seed=spec.cv.seed, max_fpr=spec.cv.max_fpr)
    trainable = tune.with_resources(trainable, {"cpu": spec.cpus_per_trial})
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
            cause = getattr(result.error, "cause", None)
            if isinstance(cause, InputError):  # e.g. the column is not in the parts: one line, exit 2
                raise cause
            raise StageError(f"probe trial {result.config['trial']} failed: {one_line(result.error, 500)}")
        trial, m = result.config["trial"], result.metrics
        rows.append({"trial_id": trial["id"], "target": trial["target"], "feature": trial["feature"], "type": trial["type"],
                     "preprocessing": trial["preprocessing"], "params": trial["params"],
                     **{k: v for k, v in m.items() if k.endswith(("_mean", "_std")) or k == "fit_seconds"},
                     **{k: m.get(k) for k in ("trial_start", "trial_end", "columns_read", "train_rows",
                                              "peak_rss_mb", "pid")}})
    return pd.DataFrame(rows).sort_values("trial_id").reset_index(drop=True)


def feature_columns(spec: JobSpec, features: Location) -> dict[str, FeatureInfo]:
    """{feature column: its layer, pooling and width} to probe, from the parts' schema and its field metadata (no
    rows read); a missing column or a bad name fails with one line."""
    schema = feature_schema(features)
    dims = feature_infos(schema, features.uri)
    require(schema, [SPLIT] if dims else [SPLIT, f"{FEATURE_PREFIX}*"], stage="probes", where=features.uri,
            written_by="features")
    if spec.probes.features:
        unknown = sorted(set(spec.probes.features) - set(dims))
        if unknown:
            raise InputError(f"probes.features: {', '.join(unknown)} not extracted; available: {', '.join(dims)}")
        dims = {c: dims[c] for c in spec.probes.features}
    return dims


def resolve_targets(spec: JobSpec, features: Location) -> dict[str, Target]:
    """Each of `probes.targets` as a label expression over the parts (schema only); one line for a bad name."""
    return targets.resolve_all(spec.probes.all_targets, feature_schema(features), spec.feedback)


def usable_pairs(spec: JobSpec, features: Location, resolved: dict[str, Target],
                 dims: dict[str, FeatureInfo]) -> list[tuple[str, str]]:
    """The (target, feature column) pairs to probe: those whose train rows hold at least `folds` rows of each
    class. Prompt features are on every row; response features only on rows with a response, so with given
    replies on some sources only, a target can have both classes on the prompt side and one on the response
    side (that pair is left out, with a log line). A target with no usable pair fails with one line. The labels
    are counted in Ray tasks, one per (target, side)."""
    import ray

    response = next((c for c, info in dims.items() if not info.on_prompt), None)
    sides = {"prompt": None, **({"response": response} if response else {})}
    keys = [(target, side) for target in resolved for side in sides]
    count = ray.remote(num_cpus=0.5)(label_counts)
    counts = dict(zip(keys, ray_get([count.remote(features, resolved[t], "train", sides[side]) for t, side in keys])))
    folds = spec.probes.cv.folds
    usable = {key for key, classes in counts.items() if min(classes) >= folds}
    lacking = {t: counts[(t, "prompt")] for t in resolved if not any((t, side) in usable for side in sides)}
    problem = class_problem(lacking, folds)
    if problem:
        raise InputError(problem)
    pairs = [(t, c) for t in resolved for c, info in dims.items()
             if (t, "prompt" if info.on_prompt else "response") in usable]
    for (t, side), (true, false) in counts.items():
        if (t, side) not in usable:
            log.warning("probes: %s is not probed on %s features: their train rows have %d true, %d false",
                        t, side, true, false)
    return pairs


def class_problem(counts: dict[str, tuple[int, int]], folds: int) -> str | None:
    """One line naming every target whose train split has fewer than `folds` rows of a class, or None."""
    short = [f"'{name}' (has {true} true, {false} false)" for name, (true, false) in counts.items()
             if min(true, false) < folds]
    if not short:
        return None
    return f"probes: the train split needs at least {folds} rows of each class of every target: {'; '.join(short)}"


def best_configurations(results: pd.DataFrame, selection: str) -> pd.DataFrame:
    """The best row per (target, feature) by the selection metric (ties go to the earlier trial), in grid order:
    targets as in the spec, then feature columns."""
    ranked = results.sort_values(selection, ascending=False, kind="stable")
    return ranked.groupby(["target", "feature"], sort=False).head(1).sort_values("trial_id")


def headline_probes(saved: list[dict[str, Any]], selection: str, targets: list[str]) -> dict[str, dict[str, Any]]:
    """Per target, the refit probe with the best CV score: the report's headline probe. It is taken among the
    prompt features when there are any, since the report asks what the prompt alone tells before any token is
    generated; probes on the response's activations (act_resp_*, an output guard) stay in the tables. A label
    of the reply itself (`response_harmful`) is the exception: its headline reads the response."""
    best = {}
    for target in targets:
        candidates = [p for p in saved if p["id"]["target"] == target]
        on_response = labels_the_response(target)
        side = [p for p in candidates if (p["id"]["pooling"] in RESPONSE_POOLINGS) == on_response] or candidates
        best[target] = max(side, key=lambda p: p[selection])  # max keeps the first (grid order) of ties
    return best


def run_probes(spec: JobSpec, inputs: dict[str, Location], out: Location) -> dict[str, Any]:
    """The probes stage: CV grid with Tune, refit the best per (target, feature column) where the data is, save
    artifacts."""
    features = inputs["features"]
    check_parts(features)
    dims = feature_columns(spec, features)
    resolved = resolve_targets(spec, features)
    pairs = usable_pairs(spec, features, resolved, dims)
    configs = expand_grid(spec.probes, list(dims), list(resolved), pairs)
    log.info("probes: %d configurations x %d folds over %d feature columns and %d targets", len(configs),
             spec.probes.cv.folds, len(dims), len(resolved))
    results = run_grid(spec.probes, features, configs, resolved)
    write_cv_results(results, out)
    selection = f"{spec.probes.cv.metric}_mean"
    chosen = best_configurations(results, selection)
    best = [ProbeId(dims[r.feature], r.type, r.preprocessing, r.params, r.target) for r in chosen.itertuples()]
    cv_score = {p.name: {selection: float(score)} for p, score in zip(best, chosen[selection])}
    numerics = features_numerics(features)  # read once: every artifact records it
    saved = refit_all(spec, features, out, best, cv_score, resolved, numerics)
    for probe in saved:
        probe[selection] = cv_score[probe["name"]][selection]
    best_by_target = headline_probes(saved, selection, list(resolved))
    first = next(iter(resolved))
    if spec.probes.torch_probe.enabled:  # on the first target only
        saved.append(_torch_probe(spec, features, dims, best_by_target[first]["id"]["feature"], out,
                                  resolved[first], numerics))
    headline = [next(p for p in best if p.name == b["name"]) for b in best_by_target.values()]
    left_out = fit_without_each_source(spec, features, out, headline, resolved, numerics)
    train_rows = results.groupby("target", sort=False)["train_rows"].first()
    return {"configurations": len(configs), "selection_metric": selection, "targets": list(resolved),
            **({"leave_one_source_out": left_out} if spec.sources_left_out else {}),
            "best": best_by_target[first], "best_by_target": best_by_target, "probes": saved,
            "train_rows": int(train_rows[first]), "train_rows_by_target": {t: int(n) for t, n in train_rows.items()},
            "trial_peak_rss_mb": _max(results["peak_rss_mb"]),
            "refit_peak_rss_mb": _max(pd.Series([p.pop("peak_rss_mb") for p in saved if "peak_rss_mb" in p]))}


def check_parts(features: Location) -> None:
    """Every part's footer reads (a few KB each, in threads; no rows): a part truncated or replaced after the
    features stage finished fails here, naming the file and the fix, instead of deep inside a Ray task whose
    flattened traceback is cut off before the file name."""
    parts = features.join(PARTS_DIR)
    names = parts.list(".parquet")
    with ThreadPoolExecutor(max_workers=16) as pool:
        problems = list(pool.map(lambda name: _footer_problem(parts.join(name)), names))
    bad = [(name, problem) for name, problem in zip(names, problems) if problem]
    if bad:
        more = f" (and {len(bad) - 1} more parts)" if len(bad) > 1 else ""
        raise InputError(f"features part {parts.join(bad[0][0]).uri} is unreadable ({bad[0][1]}){more}: the "
                         f"features stage must be redone: guardray run SPEC --force features")


def _footer_problem(part: Location) -> str | None:
    """Why a part's parquet footer cannot be read (truncated, not parquet), or None. An I/O error (a storage
    outage) is raised as such: it says nothing about the file."""
    try:
        footer(part)
    except pa.ArrowInvalid as e:
        return one_line(e, 120)
    return None


def _max(values: pd.Series) -> int | None:
    values = values.dropna()
    return int(values.max()) if len(values) else None


def write_cv_results(results: pd.DataFrame, out: Location) -> None:
    """cv_results.csv for people, cv_results.parquet for code (params as a JSON object per row)."""
    flat = results.assign(params=results["params"].map(lambda p: json.dumps(p, sort_keys=True)))
    out.join("cv_results.csv").write_text(flat.to_csv(index=False))
    out.join("cv_results.parquet").write_table(pa.Table.from_pandas(flat, preserve_index=False))


def refit_all(spec: JobSpec, features: Location, out: Location, best: list[ProbeId],
              cv: dict[str, dict[str, float]], resolved: dict[str, Target],
              numerics: dict[str, str] | None) -> list[dict[str, Any]]:
    """One Ray task per (target, feature column): read the column, refit its best configuration, write the
    artifact."""
    import ray

    task = ray.remote(num_cpus=spec.probes.cpus_per_trial, max_retries=1)(refit_and_save)
    futures = [task.remote(spec, features, out, probe, cv[probe.name], resolved[probe.target], numerics)
               for probe in best]
    return ray_get(futures)


def refit_and_save(spec: JobSpec, features: Location, out: Location, probe: ProbeId,
                   cv: dict[str, float], target: Target, numerics: dict[str, str] | None) -> dict[str, Any]:
    """Runs on a worker: fit `probe` on the whole train split of its column and store the artifact."""
    data = read_column(features, probe.feature.column, target, "train")
    pipeline = build_probe(probe.type, probe.preprocessing, probe.params, spec.probes.cv.seed).fit(data.x, data.y)
    meta = {**probe_meta(spec, probe, numerics), "cv": cv}
    artifact.save(pipeline, out.join("artifacts", probe.name), meta)
    return {"name": probe.name, "id": probe.to_dict(), "train_rows": len(data.y), "peak_rss_mb": peak_rss_mb()}


def fit_without_each_source(spec: JobSpec, features: Location, out: Location, headline: list[ProbeId],
                            resolved: dict[str, Target], numerics: dict[str, str] | None) -> list[dict[str, Any]]:
    """`evaluate.leave_one_source_out`: per target and named source S, one Ray task fits the target's headline
    configuration on the train rows of every other source and saves it under `artifacts/left_out/<i>/` (i: S's
    place in the list; a source name is free text, never a path). They run after the CV grid, in parallel,
    because the configuration is the grid's winner."""
    import ray

    task = ray.remote(num_cpus=spec.probes.cpus_per_trial, max_retries=1)(refit_without)
    futures = [task.remote(spec, features, out, probe, resolved[probe.target], index, source, numerics)
               for probe in headline for index, source in enumerate(spec.sources_left_out)]
    return ray_get(futures)


def refit_without(spec: JobSpec, features: Location, out: Location, probe: ProbeId, target: Target, index: int,
                  source: str, numerics: dict[str, str] | None) -> dict[str, Any]:
    """Runs on a worker: fit `probe`'s configuration on the train rows not of `source`; the artifact records the
    sources its rows came from, as read. Without both classes left (the source held a class alone) no probe is
    fitted and the entry says why."""
    data = read_column(features, probe.feature.column, target, "train", extra=[SOURCE], without_source=source)
    seen = sorted(set(data.extra[SOURCE].to_pylist()))
    name = f"left_out/{index}/{probe.name}"
    entry = {"name": name, "source": source, "target": probe.target, "probe": probe.name,
             "feature": probe.feature.column, "type": probe.type, "train_rows": len(data.y), "train_sources": seen}
    if data.y.all() or not data.y.any():
        return {**entry, "name": None, "skipped": f"the other sources' train rows hold one class of {probe.target}"}
    pipeline = build_probe(probe.type, probe.preprocessing, probe.params, spec.probes.cv.seed).fit(data.x, data.y)
    meta = {**probe_meta(spec, probe, numerics), "left_out_source": source, "train_sources": seen,
            "train_rows": len(data.y)}
    artifact.save(pipeline, out.join("artifacts", name), meta)
    return entry


def _torch_probe(spec: JobSpec, features: Location, dims: dict[str, FeatureInfo], best_feature: str,
                 out: Location, target: Target, numerics: dict[str, str] | None) -> dict[str, Any]:
    """Train the torch probe with Ray Train on the configured feature (default: the best CV feature), for the
    first target only: one Ray Train run per target would multiply the stage's longest step."""
    from guardray.probes.torch_probe import TORCH_PROBE_TYPE, train_torch_probe

    config = spec.probes.torch_probe
    feature = config.feature or best_feature
    if feature not in dims:
        raise InputError(f"probes.torch_probe.feature: '{feature}' not extracted; available: {', '.join(dims)}")
    fitted = train_torch_probe(config, features, feature, target, out.join("torch_train"),
                               seed=spec.probes.cv.seed)
    apply_file_mode(out.join("torch_train"))  # Ray Train wrote its checkpoints with the umask's modes
    params = config.model_dump(include={"workers", "epochs", "lr", "weight_decay", "batch_size"})
    probe = ProbeId(dims[feature], TORCH_PROBE_TYPE, "standardize", params, target.name)
    meta = {**probe_meta(spec, probe, numerics), "history": fitted["history"], "use_gpu": fitted["use_gpu"]}
    artifact.save_linear(out.join("artifacts", probe.name), meta, fitted["weight"], fitted["bias"], fitted["mean"],
                         fitted["scale"])
    return {"name": probe.name, "id": probe.to_dict(), "final_loss": fitted["history"][-1]["loss"]}


def features_numerics(features: Location) -> dict[str, str] | None:
    """The chat model's numerics the features stage verified on all its parts (`summary.json`); None where
    there is no summary or no record (synthetic features)."""
    summary = features.join("summary.json")
    recorded = summary.read_json().get("numerics") if summary.exists() else None
    return recorded["chat"] if recorded else None


def probe_meta(spec: JobSpec, probe: ProbeId, numerics: dict[str, str] | None) -> dict[str, Any]:
    """What a serving system needs besides the weights: where the features come from, how prompts render, and
    for a feedback target the thresholds that defined its label."""
    return {
        **probe.to_dict(),
        **({"feedback": spec.feedback.cache_payload()} if targets.is_feedback(probe.target) else {}),
        # a pooling's constants (the ema half-life): a server computing it otherwise refuses the artifact
        **({"pooling_constants": POOLING_CONSTANTS[probe.feature.pooling]}
           if probe.feature.pooling in POOLING_CONSTANTS else {}),
        "chat_model": spec.model.id, "rendering": spec.model.model_dump(
            include={"chat_template", "system_prompt", "max_length", "truncation"}),
        "threshold": spec.evaluate.probe_threshold,
        # `guardray serve` loads exactly this model (id, revision, dtype, attention) and, for `guard: both`,
        # this guard; `features_dtype` says how the training activations were stored (float16 rounds them)
        "model": spec.model.model_dump(mode="json"),
        "features_dtype": spec.extract.store_dtype,
        # the device, dtype and attention the chat model computed the training activations with, as resolved
        # on the features stage's actors (`model.dtype: auto` is float32 on a CPU, bfloat16 on most GPUs)
        "numerics": numerics,
        "guard": {"spec": spec.guard.model_dump(mode="json"), "model": spec.guard_model.model_dump(mode="json"),
                  "is_chat_model": spec.guard_is_chat, "threshold": spec.evaluate.guard_threshold}
        if spec.guard.enabled else None,
    }
