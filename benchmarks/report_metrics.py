"""Time of the report's metrics on a 2.5M-row test split: the one-sort, vectorised guardray.evaluate against the
sklearn-per-metric, sklearn-per-resample code it replaced (issue 11), both measured in the same run.

Synthetic split: labels with `--positives` positives (default 5%, the rare-harm case; --positives 0.5 for a
balanced one), scores = 1.5 * label + N(0, 1) (planted signal, AUC ~0.86), continuous so nearly every row is its
own tie group (the worst case for the bootstrap's group counts). The baseline is the code of commit ac0b2f5,
copied below. Its bootstrap on 2.5M rows would take hours at 1000 resamples, so it is timed on a few resamples
and the time per resample is extrapolated to 1000: those figures are marked "extrapolated".

    .venv/bin/python benchmarks/report_metrics.py                      # 2.5M rows, 1000 resamples (~5 minutes)
    .venv/bin/python benchmarks/report_metrics.py --rows 250000 --uncapped-resamples 100
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
import warnings
from typing import Any, Callable

import numpy as np
from sklearn import metrics

from guardray.evaluate import bootstrap_ci, by_source, score_metrics
from guardray.jobspec import EvaluateSpec


# ------------------------------------------------------------- baseline: guardray/evaluate.py at ac0b2f5
def old_precision_at_recall(y: np.ndarray, scores: np.ndarray, recall: float) -> float | None:
    if not old_two_classes(y):
        return None
    precision, rec, _ = metrics.precision_recall_curve(y, scores)
    ok = rec >= recall
    return float(precision[ok].max()) if ok.any() else None


def old_recall_at_fpr(y: np.ndarray, scores: np.ndarray, fpr: float) -> float | None:
    if not old_two_classes(y):
        return None
    fprs, tprs, _ = metrics.roc_curve(y, scores)
    ok = fprs <= fpr
    return float(tprs[ok].max()) if ok.any() else 0.0


def old_fpr_at_recall(y: np.ndarray, scores: np.ndarray, recall: float) -> float | None:
    if not old_two_classes(y):
        return None
    fprs, tprs, _ = metrics.roc_curve(y, scores)
    return float(fprs[tprs >= recall].min())


def old_best_accuracy_threshold(y: np.ndarray, scores: np.ndarray) -> tuple[float | None, float | None]:
    if not old_two_classes(y):
        return None, None
    fprs, tprs, thresholds = metrics.roc_curve(y, scores, drop_intermediate=False)
    positives, negatives = y.sum(), len(y) - y.sum()
    accuracy = (tprs * positives + (1 - fprs) * negatives) / len(y)
    best = int(np.argmax(accuracy))
    return float(thresholds[best]), float(accuracy[best])


def old_at_threshold(y: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    predicted = scores >= threshold
    tn, fp, fn, tp = metrics.confusion_matrix(y, predicted, labels=[False, True]).ravel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "threshold": float(threshold),
            "accuracy": float(metrics.accuracy_score(y, predicted)),
            "precision": float(metrics.precision_score(y, predicted, zero_division=0)),
            "recall": float(metrics.recall_score(y, predicted, zero_division=0)),
            "f1": float(metrics.f1_score(y, predicted, zero_division=0)),
            "fpr": float(fp / (fp + tn)) if fp + tn else 0.0,
            "confusion": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
        }


def old_score_metrics(y: np.ndarray, scores: np.ndarray, threshold: float, spec: EvaluateSpec,
                      resamples: int | None = None) -> dict[str, Any]:
    y = np.asarray(y, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    two = old_two_classes(y)
    best_threshold, best_accuracy = old_best_accuracy_threshold(y, scores)
    result: dict[str, Any] = {
        "count": int(len(y)),
        "n_true": int(y.sum()),
        "n_false": int((~y).sum()),
        "avg_score": float(scores.mean()) if len(scores) else None,
        "roc_auc": float(metrics.roc_auc_score(y, scores)) if two else None,
        "average_precision": float(metrics.average_precision_score(y, scores)) if two else None,
        **old_at_threshold(y, scores, threshold),
        "precision_at_recall": {str(r): old_precision_at_recall(y, scores, r) for r in spec.recalls},
        "recall_at_fpr": {str(f): old_recall_at_fpr(y, scores, f) for f in spec.fprs},
        "fpr_at_recall_0.99": old_fpr_at_recall(y, scores, 0.99),
        "best_threshold": best_threshold,
        "best_accuracy": best_accuracy,
    }
    if spec.bootstrap and two:
        result["ci95"] = old_bootstrap_ci(y, scores, spec.bootstrap, spec.seed)
    return result


def old_bootstrap_ci(y: np.ndarray, scores: np.ndarray, resamples: int, seed: int) -> dict[str, list[float] | None]:
    rng = np.random.default_rng(seed)
    aucs, precisions = [], []
    for _ in range(resamples):
        pick = rng.integers(0, len(y), len(y))
        if not old_two_classes(y[pick]):
            continue
        aucs.append(metrics.roc_auc_score(y[pick], scores[pick]))
        precisions.append(old_precision_at_recall(y[pick], scores[pick], 0.99))
    interval = lambda v: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else None  # noqa: E731
    return {"roc_auc": interval(aucs), "precision@0.99": interval([p for p in precisions if p is not None])}


def old_by_source(y: np.ndarray, scores: np.ndarray, sources: np.ndarray, threshold: float,
                  spec: EvaluateSpec) -> dict[str, dict[str, Any]]:
    y, scores, sources = np.asarray(y, dtype=bool), np.asarray(scores), np.asarray(sources)
    quiet = spec.model_copy(update={"bootstrap": 0})
    out = {}
    for source in sorted(set(sources)):
        mask = sources == source
        out[source] = old_score_metrics(y[mask], scores[mask], threshold, quiet)
    return out


def old_two_classes(y: np.ndarray) -> bool:
    return len(np.unique(y)) == 2


# ---------------------------------------------------------------------------------------------- run
def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """CPU seconds of this process (all its threads), and fn's result.

    CPU time rather than wall time: on a shared 2-core machine wall time grows with whatever else runs, CPU time
    hardly does; both implementations are single-threaded numpy/sklearn code, so on an idle machine the two agree.
    Wall time of the whole run is printed at the end.
    """
    started = time.process_time()
    out = fn()
    return time.process_time() - started, out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2_500_000)
    parser.add_argument("--positives", type=float, default=0.05, help="fraction of positive labels")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (the spec default)")
    parser.add_argument("--max-rows", type=int, default=EvaluateSpec().bootstrap_max_rows, help="bootstrap cap")
    parser.add_argument("--old-resamples", type=int, default=3, help="resamples the old bootstrap is timed on")
    parser.add_argument("--uncapped-resamples", type=int, default=1000,
                        help="resamples of the new bootstrap without the cap (extrapolated to --resamples if fewer)")
    parser.add_argument("--sources", type=int, default=20, help="sources for the by_source timing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    wall = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    y = rng.random(args.rows) < args.positives
    scores = 1.5 * y + rng.normal(size=args.rows)
    sources = np.array([f"source-{i:02d}" for i in range(args.sources)], dtype=object)[
        rng.integers(0, args.sources, args.rows)]
    spec = EvaluateSpec(bootstrap=args.resamples, bootstrap_max_rows=args.max_rows, seed=args.seed)
    quiet = spec.model_copy(update={"bootstrap": 0})
    print(f"{datetime.date.today()}  {cpu_name()}, {len(os.sched_getaffinity(0))} cores, "
          f"load average {os.getloadavg()[0]:.1f} at start; numpy {np.__version__}")
    print(f"{args.rows:,} test rows, {y.mean():.1%} positives, scores 1.5 * label + N(0, 1), "
          f"bootstrap {args.resamples} resamples, cap {args.max_rows:,} rows", flush=True)
    rows: list[tuple[str, float, float, bool, bool]] = []  # what, old s, new s, old/new extrapolated

    def add(what: str, old: float, new: float, old_extrapolated: bool = False, new_extrapolated: bool = False) -> None:
        rows.append((what, old, new, old_extrapolated, new_extrapolated))
        print(f"  {what}: old {old:.1f} CPU s{' (extrapolated)' * old_extrapolated}, new {new:.2f} CPU s"
              f"{' (extrapolated)' * new_extrapolated}", flush=True)

    old_plain_s, old_plain = timed(lambda: old_score_metrics(y, scores, 0.0, quiet))
    new_plain_s, new_plain = timed(lambda: score_metrics(y, scores, 0.0, quiet))
    add("score_metrics, no bootstrap", old_plain_s, new_plain_s)
    print(f"  new score_metrics == old: {new_plain == old_plain}", flush=True)

    old_boot_s, _ = timed(lambda: old_bootstrap_ci(y, scores, args.old_resamples, args.seed))
    per_resample = old_boot_s / args.old_resamples
    old_full = per_resample * args.resamples
    new_capped_s, capped = timed(lambda: bootstrap_ci(y, scores, args.resamples, args.seed, args.max_rows))
    add(f"bootstrap_ci, {args.resamples} resamples, cap {capped['rows']:,} rows", old_full, new_capped_s, True)

    new_uncapped_s, uncapped = timed(lambda: bootstrap_ci(y, scores, args.uncapped_resamples, args.seed, None))
    new_uncapped_s *= args.resamples / args.uncapped_resamples
    add(f"bootstrap_ci, {args.resamples} resamples, no cap ({uncapped['rows']:,} rows)", old_full, new_uncapped_s,
        True, args.uncapped_resamples != args.resamples)

    new_report_s, report = timed(lambda: score_metrics(y, scores, 0.0, spec))
    add(f"score_metrics with bootstrap {args.resamples} (the report's call)", old_plain_s + old_full, new_report_s,
        True)

    old_source_s, old_sources = timed(lambda: old_by_source(y, scores, sources, 0.0, spec))
    new_source_s, new_sources = timed(lambda: by_source(y, scores, sources, 0.0, spec))
    add(f"by_source, {args.sources} sources", old_source_s, new_source_s)
    print(f"  new by_source == old: {new_sources == old_sources}", flush=True)

    print(f"\nROC AUC {new_plain['roc_auc']:.4f}; 95% CI capped ({capped['rows']:,} rows) "
          f"{np.round(capped['roc_auc'], 4)}"
          f", uncapped ({uncapped['rows']:,} rows) {np.round(uncapped['roc_auc'], 4)}; precision@0.99 CI capped "
          f"{np.round(capped['precision@0.99'], 4)}, uncapped {np.round(uncapped['precision@0.99'], 4)}; "
          f"report ci95 {report['ci95']}")
    width = max(len(r[0]) for r in rows)
    print(f"\nCPU seconds{'':{width - 11}}  {'old (sklearn)':>14}  {'new':>12}  {'speed-up':>9}")
    for what, old, new, old_x, new_x in rows:
        print(f"{what:{width}}  {old:>11.1f} s{'*' if old_x else ' '}  {new:>9.2f} s{'*' if new_x else ' '}  "
              f"{old / new:>8.0f}x")
    print(f"* extrapolated: the old bootstrap from {args.old_resamples} resamples ({per_resample:.2f} s each) to "
          f"{args.resamples}" + (f", the new uncapped one from {args.uncapped_resamples}"
                                 if args.uncapped_resamples != args.resamples else "") +
          f"; the rest measured.\nWall time of the whole run {time.perf_counter() - wall:.0f} s, load average "
          f"{os.getloadavg()[0]:.1f} at the end.")


if __name__ == "__main__":
    main()
