"""The report stage's entry point (`run_report`) and `guardray report`'s re-rendering (`rerender`): the driver
plans the targets, starts the Ray tasks of `tasks` (and `mining`), assembles the sections from their metrics
and renders markdown and plots. The driver holds metrics only."""
from __future__ import annotations

import io
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from guardray.columns import GUARD_RESPONSE_SCORE, N_TOKENS, feature_schema, require
from guardray.errors import InputError, ray_get
from guardray.report.mining import mine_prompts
from guardray.report.plots import SUMMARY_PLOT, make_plots, summary_plot
from guardray.report.render import answer, comparison_markdown, markdown
from guardray.report.sections import Section, assemble, build_section, ordered, plan_targets
from guardray.report.tasks import (META, compare, evaluate_held_out, evaluate_left_out, evaluate_scorer,
                                   held_out_sources, merge_scores,
                                   read_scores, score_one, scorers, write_labels)
from guardray.jobspec import JobSpec
from guardray.storage import Location


def run_report(spec: JobSpec, inputs: dict[str, Location], out: Location) -> dict[str, Any]:
    """Score every features row with every refit probe and guard score (`scores.parquet`), compare per target
    (`report.json`), render (`report.md`, plots) and mine the prompts whose response the guard flags."""
    import ray

    features, probes = inputs["features"], inputs["probes"]
    schema = feature_schema(features)
    plans = plan_targets(spec, probes.join("summary.json").read_json(), schema)
    found = scorers(spec, probes, [p.guard for p in plans.values() if p.guard])
    require(schema, [*META, N_TOKENS, *(s.column for s in found)], stage="report", where=features.uri, written_by="features")
    remote = ray.remote(num_cpus=1, max_retries=1)  # each task rewrites its own files whole: safe to retry
    ray_get([remote(write_labels).remote(features, out, [p.target for p in plans.values()]),
             *(remote(score_one).remote(features, out, s, i) for i, s in enumerate(found))])
    ray_get(remote(merge_scores).remote(out, [s.name for s in found]))
    pairs = [(t, s) for t, p in plans.items() for s in (*p.probes, *([p.guard] if p.guard else []))]
    thresholds = {s.name: s.threshold for s in found}
    entries = ray_get([remote(evaluate_scorer).remote(spec, out, t, s, thresholds[s]) for t, s in pairs])
    tasks = {f"{t}:{s}": {"peak_rss_mb": entry.pop("peak_rss_mb", None)} for (t, s), entry in zip(pairs, entries)}
    by_target: dict[str, dict[str, Any]] = {t: {} for t in plans}
    for (t, s), entry in zip(pairs, entries):
        by_target[t][s] = entry
    cv = pd.read_csv(io.StringIO(probes.join("cv_results.csv").read_text()))
    ids = {s.name: s.id for s in found}
    sections = {t: build_section(spec, plans[t], by_target[t], cv, ids) for t in plans}
    sections = {t: _finish(s, comparison) for t, s, comparison in _compared(spec, out, sections, remote)}
    sections = _with_held_out(spec, out, sections, remote)
    sections = _with_left_out(spec, out, sections, probes.join("summary.json").read_json(), remote)
    report = assemble(spec, sections, tasks)
    report["mined_prompts"] = _mine(spec, inputs, out, schema, sections, remote)
    out.join("report.json").write_json(report)
    if spec.evaluate.plots:
        ray_get(remote(render).remote(report, out))
    else:
        out.join("report.md").write_text(markdown(report, {}))
    for section in sections.values():
        print(f"{section.target}:\n{section.comparison_table}")
    return {"probes": sum(len(s.probes) for s in sections.values()), "test_rows": report["test_rows"],
            "best_probe": report["best_probe"], "targets": list(sections),
            "task_peak_rss_mb": max((t["peak_rss_mb"] or 0) for t in tasks.values())}


def _compared(spec: JobSpec, out: Location, sections: dict[str, Section],
              remote: Any) -> list[tuple[str, Section, dict[str, Any] | None]]:
    """Each section with its probe-vs-guard comparison (a task per section that has a guard scorer)."""
    with_guard = [t for t, s in sections.items() if s.guard_scorer]
    comparisons = dict(zip(with_guard, ray_get([
        remote(compare).remote(out, t, sections[t].best_probe, sections[t].guard_scorer, spec.evaluate.probe_threshold,
                               spec.evaluate.guard_threshold, held_out_sources(spec)) for t in with_guard])))
    return [(t, s, comparisons.get(t)) for t, s in sections.items()]


def _with_held_out(spec: JobSpec, out: Location, sections: dict[str, Section], remote: Any) -> dict[str, Section]:
    """Each section with its best probe's and guard's figures on the held-out sources (a task per scorer)."""
    held = held_out_sources(spec)
    if not held:
        return sections
    jobs = [(t, scorer) for t, s in sections.items() for scorer in (s.best_probe, s.guard_scorer) if scorer]
    figures = ray_get([remote(evaluate_held_out).remote(spec, out, t, scorer, held) for t, scorer in jobs])
    found: dict[str, dict[str, Any]] = {t: {} for t in sections}
    for (t, scorer), f in zip(jobs, figures):
        found[t][scorer] = f
    return {t: replace(s, held_out=found[t]) for t, s in sections.items()}


def _with_left_out(spec: JobSpec, out: Location, sections: dict[str, Section], summary: dict[str, Any],
                   remote: Any) -> dict[str, Section]:
    """Each section with its leave-one-source-out figures (a task per target), when the job asked for them."""
    entries = summary.get("leave_one_source_out")
    if not entries:
        return sections
    jobs = {t: [e for e in entries if e["target"] == t] for t in sections}
    figures = ray_get([remote(evaluate_left_out).remote(spec, out, t, sections[t].best_probe, sections[t].guard_scorer,
                                                        jobs[t]) for t in sections])
    return {t: replace(s, left_out=f) for (t, s), f in zip(sections.items(), figures)}


def _finish(section: Section, comparison: dict[str, Any] | None) -> Section:
    """The section with its comparison, then its table and headline sentence (which read the comparison)."""
    section = replace(section, comparison=comparison)
    section = replace(section, comparison_table=comparison_markdown(section))
    return replace(section, answer=answer(section))


def _mine(spec: JobSpec, inputs: dict[str, Location], out: Location, schema: pa.Schema,
          sections: dict[str, Section], remote: Any) -> dict[str, Any] | None:
    """mined_prompts.parquet when the responses were judged and the responses stage is an input."""
    if GUARD_RESPONSE_SCORE not in schema.names:
        return None
    if "responses" not in inputs:
        return {"skipped": "no responses stage among the report's inputs"}
    probe = sections["response_unsafe"].best_probe if "response_unsafe" in sections else None
    return ray_get(remote(mine_prompts).remote(spec, inputs["features"], inputs["responses"], out, probe))


def render(report: dict[str, Any], out: Location) -> None:
    """report.md and the PNG plots, from the report dict and the test split's in-distribution scores of the
    plotted scorers (held-out sources have their own table).
    matplotlib writes local files: they are drawn in a temporary directory and copied to `out` (local or gs://)."""
    plots: dict[str, list[str]] = {}
    sections = ordered(report)
    with tempfile.TemporaryDirectory() as tmp:
        for section in sections:
            plotted = [section.best_probe, *([section.guard_scorer] if section.guard_scorer else [])]
            rows = read_scores(out, section.target, plotted, extra=["source"])
            held = {s for figures in (section.held_out or {}).values() for s in figures["sources"]}
            plots[section.target] = [str(p.relative_to(tmp)) for p in make_plots(
                section, rows[~rows["source"].isin(held)], Path(tmp) / section.target)]
        plots[""] = [str(summary_plot(sections, Path(tmp) / SUMMARY_PLOT).relative_to(tmp))]
        for files in plots.values():
            for relative in files:
                out.join(relative).write_bytes((Path(tmp) / relative).read_bytes())
    out.join("report.md").write_text(markdown(report, plots))


def rerender(stage: Location) -> str:
    """Re-render report.md and plots from a finished report directory; returns the comparison tables."""
    report = stage.join("report.json").read_json()
    if "targets" not in report:
        raise InputError(f"{stage.uri}: report.json predates per-target reports; run the report stage again")
    render(report, stage)
    return "\n\n".join(f"{s.target}:\n{s.comparison_table}" for s in ordered(report))
