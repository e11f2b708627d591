"""Result assembly on the driver: what each target's section compares (`Plan`), the section itself (`Section`,
small: metrics only), and `report.json`'s layout (`assemble`).

Each target has a section: its best probe (by CV) against its matching guard score (`targets.guard_column`), on
the test rows where that target's label is known. For a feedback target (`response_unsafe`, `slipped_through`)
the guard is the INPUT guard.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import pandas as pd
import pyarrow as pa

from guardray import targets
from guardray.columns import Target
from guardray.jobspec import JobSpec


@dataclass(frozen=True)
class Plan:
    """What one target's section compares: its probes, its best probe, its guard score (or none) and why."""

    target: Target
    probes: tuple[str, ...]
    best_probe: str
    guard: str | None
    guard_note: str | None


def plan_targets(spec: JobSpec, summary: dict[str, Any], schema: pa.Schema) -> dict[str, Plan]:
    """Per target (from the probes' summary): its probes, best probe and matching guard column (schema only)."""
    resolved = targets.resolve_all(summary["targets"], schema, spec.feedback)
    best = summary["best_by_target"]
    plans = {}
    for name, target in resolved.items():
        probes = tuple(p["name"] for p in summary["probes"] if p["id"]["target"] == name)
        guard, note = (targets.guard_column(spec, name, schema.names) if spec.guard.enabled else (None, None))
        if guard is not None and guard not in schema.names:
            guard, note = None, f"{guard} is not in the features: no guard comparison"
        plans[name] = Plan(target, probes, best[name]["name"], guard, note)
    return plans


@dataclass(frozen=True)
class Section:
    """One target's part of the report, as `report.json` stores it under `targets.<name>` (field = key).

    `probes` maps each probe's name to its metrics (`test`, `train`, `by_source`, `sweep`) and `id`; `guard` is
    the guard scorer's metrics and `comparison` the probe-vs-guard view, both present only with a guard scorer.
    `comparison_table` and `answer` are the section's markdown, kept in the JSON for `guardray report`."""

    target: str
    feedback: bool
    best_probe: str
    guard_scorer: str | None
    guard_note: str | None
    test_rows: int
    probes: dict[str, dict[str, Any]]
    cv_leaderboard: list[dict[str, Any]]
    cv_best_by_feature: dict[str, Any]
    guard: dict[str, Any] | None = None
    comparison: dict[str, Any] | None = None
    comparison_table: str = ""
    answer: str = ""
    #: scorer (best probe, guard) → `guardray.held_out.held_out_figures`, when the job holds sources out
    held_out: dict[str, Any] | None = None
    #: left-out source → `tasks.evaluate_left_out`'s figures, when the job asks for `leave_one_source_out`
    left_out: dict[str, Any] | None = None

    @property
    def best(self) -> dict[str, Any]:
        """The best probe's entry."""
        return self.probes[self.best_probe]

    def guard_items(self) -> list[tuple[str, dict[str, Any]]]:
        """(guard scorer, its metrics), when the section has one."""
        return [(self.guard_scorer, self.guard)] if self.guard is not None else []

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: `guard` and `comparison` appear only when the section has a guard scorer."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if not (f.name in ("guard", "comparison", "held_out", "left_out") and getattr(self, f.name) is None)}

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> "Section":
        return cls(**{f.name: stored[f.name] for f in fields(cls) if f.name in stored})


def build_section(spec: JobSpec, plan: Plan, entries: dict[str, dict[str, Any]], cv: pd.DataFrame,
                  ids: dict[str, dict[str, Any]]) -> Section:
    """One target's section from its scorers' metrics (`entries`, by scorer name), the CV results and each
    probe's structured identity (`ids`)."""
    selection = f"{spec.probes.cv.metric}_mean"
    name = plan.target.name
    cv = cv[cv["target"] == name] if "target" in cv else cv
    ranked = cv.sort_values(selection, ascending=False, kind="stable")
    probes = {n: {**entries[n], "id": ids[n]} for n in plan.probes}
    best = probes[plan.best_probe]["test"]
    return Section(
        target=name, feedback=plan.target.derived, best_probe=plan.best_probe, guard_scorer=plan.guard,
        guard_note=plan.guard_note, test_rows=best["count"] if best else 0, probes=probes,
        cv_leaderboard=ranked.head(15).to_dict(orient="records"),
        cv_best_by_feature=ranked.groupby("feature", sort=False).head(1).set_index("feature")[selection].to_dict(),
        guard=entries[plan.guard] if plan.guard else None)


def assemble(spec: JobSpec, sections: dict[str, Section], tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """report.json: `targets` holds every section; the first target's section is also spread at the top level
    (best_probe, probes, guard, comparison, ...) as the single-target report had it."""
    stored = {t: s.to_dict() for t, s in sections.items()}
    scorers = [n for s in sections.values() for n in [*s.probes, s.guard_scorer] if n]
    # report.json is written with sorted keys: `target_order` keeps the spec's order of the sections
    return {**next(iter(stored.values())), "job": spec.name, "targets": stored, "target_order": list(stored),
            "tasks": tasks, "scorers": list(dict.fromkeys(scorers))}


def ordered(report: dict[str, Any]) -> list[Section]:
    """The sections of a report dict (`report.json`), in the spec's order (report.json's keys are sorted)."""
    return [Section.from_dict(report["targets"][t]) for t in report.get("target_order", report["targets"])]


def auc_and_ci(entry: dict[str, Any] | None) -> tuple[float | None, list[float] | None]:
    """A scorer entry's test ROC AUC and its bootstrap 95% CI (None where not computed)."""
    test = (entry or {}).get("test") or {}
    return test.get("roc_auc"), (test.get("ci95") or {}).get("roc_auc")
