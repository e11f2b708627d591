"""The report's markdown: each section's headline sentence (`answer`) and probe-vs-guard table
(`comparison_markdown`), both kept in report.json, and `report.md` (`markdown`) from a report dict and the
plots' relative paths. Pure text: no Ray, no I/O."""
from __future__ import annotations

from typing import Any

from guardray.columns import GUARD_SCORE
from guardray.probes.torch_probe import TORCH_PROBE_TYPE
from guardray.held_out import OPERATING_POINTS
from guardray.report.sections import Section, auc_and_ci, ordered


def fmt(value: Any, digits: int = 3) -> str:
    return "–" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def _auc_text(entry: dict[str, Any] | None) -> str:
    """ROC AUC, precision at 99% recall and recall at 1% FPR, with the bootstrap CIs there are."""
    auc, ci = auc_and_ci(entry)
    test = (entry or {}).get("test") or {}
    ci95 = test.get("ci95") or {}

    def interval(bounds: list[float] | None) -> str:
        return f" (95% CI {fmt(bounds[0])}–{fmt(bounds[1])})" if bounds else ""

    precision = (test.get("precision_at_recall") or {}).get("0.99")
    recall = (test.get("recall_at_fpr") or {}).get("0.01")
    return (f"ROC AUC {fmt(auc)}{interval(ci)}, precision at 99% recall {fmt(precision)}"
            f"{interval(ci95.get('precision@0.99'))}, recall at 1% FPR {fmt(recall)}")


def answer(section: Section) -> str:
    """The section's headline sentence: the probe against the matching guard score, with CIs."""
    target, probe = section.target, section.best
    test = probe["test"] or {"count": 0, "n_true": 0}
    rows = f"{test['count']} held-out prompts with a known `{target}` label ({test['n_true']} positive)"
    if section.feedback:
        head = (f"From the prompt's activations, before any token is generated, the best probe "
                f"`{section.best_probe}` predicts `{target}` with test {_auc_text(probe)}")
        guard_words = f"the input guard's score (`{section.guard_scorer}`) for the same target"
    else:
        head = f"The best probe `{section.best_probe}` predicts `{target}` with test {_auc_text(probe)}"
        guard_words = f"the guard's score (`{section.guard_scorer}`)"
    if not section.guard_scorer:
        return f"{head}, on {rows}; no guard score to compare with."
    sentence = f"{head}; {guard_words} gives {_auc_text(section.guard)} on the same {rows}."
    (p, _), (g, _) = auc_and_ci(probe), auc_and_ci(section.guard)
    if p is not None and g is not None:
        sentence += f" Probe minus guard: {p - g:+.3f}."
    return sentence


def comparison_markdown(section: Section) -> str:
    """The headline table of one target: best probe (and the torch probe, when trained) vs its guard score."""
    rows = [("probe " + section.best_probe, section.best["test"])]
    rows += [("probe " + name, entry["test"]) for name, entry in section.probes.items()
             if entry["id"]["type"] == TORCH_PROBE_TYPE]
    for guard, entry in section.guard_items():
        rows.append(("guard" if guard == GUARD_SCORE else f"guard {guard}", entry["test"]))
    lines = ["| scorer | threshold | accuracy | precision | recall | precision@0.99 | ROC AUC | ROC AUC 95% CI | "
             "AP | recall@1% FPR |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in rows:
        if m is None:
            lines.append(f"| {name} | – | – | – | – | – | – | – | – | – |")
            continue
        ci = (m.get("ci95") or {}).get("roc_auc")
        lines.append(f"| {name} | {fmt(m['threshold'], 2)} | {fmt(m['accuracy'])} | {fmt(m['precision'])} | "
                     f"{fmt(m['recall'])} | {fmt(m['precision_at_recall'].get('0.99'))} | {fmt(m['roc_auc'])} | "
                     f"{f'{fmt(ci[0])}–{fmt(ci[1])}' if ci else '–'} | {fmt(m['average_precision'])} | "
                     f"{fmt(m['recall_at_fpr'].get('0.01'))} |")
    if section.comparison and section.comparison["guard_at_matched"]:
        g = section.comparison["guard_at_matched"]
        lines.append(f"| guard (matched recall) | {fmt(g['threshold'], 2)} | {fmt(g['accuracy'])} | "
                     f"{fmt(g['precision'])} | {fmt(g['recall'])} | – | – | – | – | – |")
    return "\n".join(lines)


def markdown(report: dict[str, Any], plots: dict[str, list[str]]) -> str:
    """report.md: the headline per target, the summary plot, the mined prompts, then each target's section
    (`plots`: relative paths by target name, "" for the summary plot)."""
    sections = ordered(report)
    parts = [f"# guardray report: {report['job']}", "", f"Targets: {', '.join(f'`{s.target}`' for s in sections)}.",
             ""]
    parts += [f"- **{s.target}**: {s.answer}" + (f" *Note: {s.guard_note}.*" if s.guard_note else "")
              for s in sections]
    parts += [""] + [f"![{p}]({p})" for p in plots.get("", [])] + [""]
    mined = report.get("mined_prompts")
    if mined and "rows" in mined:
        parts += [f"Mined prompts: {mined['rows']} rows whose response the guard flags (guard_response_score > "
                  f"{mined['response_threshold']:g}), {mined['slipped_through']} of them slipped through the input "
                  f"guard (guard_score <= {mined['input_threshold']:g}): `{mined['file']}`.", ""]
    elif mined:
        parts += [f"Mined prompts: skipped ({mined['skipped']}).", ""]
    for section in sections:
        parts += section_markdown(section, plots.get(section.target, []))
    return "\n".join(parts) + "\n"


def section_markdown(section: Section, plots: list[str]) -> list[str]:
    """One target's part of report.md."""
    parts = [f"## Target `{section.target}`", "", section.answer, ""]
    if section.guard_note:
        parts += [f"Note: {section.guard_note}.", ""]
    parts += [f"{section.test_rows} held-out rows with a known label. Best probe by CV: `{section.best_probe}`.",
              "", "### Probe vs guard (test split)", "", section.comparison_table, ""]
    if section.comparison:
        f = section.comparison["fpr_at_99_recall"]
        parts += [f"False-positive rate at 99% recall: probe {fmt(f['probe'])}, guard {fmt(f['guard'])} "
                  f"(guard/probe = {fmt(f['guard_over_probe'], 1)}).", ""]
    best = section.best["test"] or {}
    if "ci95" in best:
        parts += [f"Bootstrap 95% CI of the best probe: ROC AUC {best['ci95']['roc_auc']}, precision@0.99 "
                  f"{best['ci95']['precision@0.99']}.", ""]
    return parts + _held_out(section) + _left_out(section) + _by_feature(section) + _by_source(section) + _by_group(section) + \
        _sweeps(section) + _leaderboard(section) + [
        "", "### Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]


def held_out_markdown(section: Section) -> str:
    """The held-out sources table: per source and scorer, the detection rate (or FPR) at the thresholds fixed
    on the in-distribution test rows, with 95% CIs, and the AUCs."""
    rows = ["| source | rows (positive) | scorer | flagged at 1% FPR (in-dist.) | flagged at 99% recall (in-dist.) "
            "| ROC AUC | AUC vs in-dist. negatives |", "|---|---|---|---|---|---|---|"]
    for scorer, figures in (section.held_out or {}).items():
        for source, f in figures["sources"].items():
            kind = "detection" if f["positives"] else "fpr"
            cells = [_rate_cell(f.get(f"{kind}_{point}"), kind) for point in OPERATING_POINTS]
            rows.append(f"| {source} | {f['rows']} ({f['positives']}) | {scorer} | {cells[0]} | {cells[1]} | "
                        f"{fmt(f['roc_auc'])} | {fmt(f['roc_auc_vs_in_distribution_negatives'])} |")
    return "\n".join(rows)


def _rate_cell(entry: dict[str, Any] | None, kind: str) -> str:
    if not entry or entry["rate"] is None:
        return "–"
    ci = f" ({fmt(entry['ci95'][0])}–{fmt(entry['ci95'][1])})" if entry["ci95"] else ""
    return f"{kind} {fmt(entry['rate'])}{ci}"


def _held_out(section: Section) -> list[str]:
    if not section.held_out:
        return []
    return ["### Held-out sources (never trained on; thresholds fixed on the in-distribution test rows)", "",
            held_out_markdown(section), ""]


#: The leave-one-source-out table's scorers: figures key → column heading.
LEFT_OUT_COLUMNS = (("probe", "probe (trained on it)"), ("left_out_probe", "probe (never saw it)"), ("guard", "guard"))


def left_out_markdown(section: Section) -> str:
    """Per left-out source: its rows flagged at the 1% FPR point by the probe that trained on it, the probe
    that never saw it and the guard (the detection rate of its positives, the FPR of its negatives)."""
    shown = [(key, title) for key, title in LEFT_OUT_COLUMNS if any(key in f for f in section.left_out.values())]
    rows = [f"| source left out | rows (positive) | trained on (rows) | {' | '.join(t for _, t in shown)} |",
            "|---|---|---|" + "---|" * len(shown)]
    for source, f in section.left_out.items():
        trained = f"{', '.join(f['train_sources']) or 'none'} ({f['train_rows']})"
        first = f.get(shown[0][0], {})
        why = f.get("skipped") or (None if first["rows"] else f"no test rows where {section.target} is known")
        if why:
            rows.append(f"| {source} | – | {trained} | {why} |" + " |" * (len(shown) - 1))
            continue
        cells = [_flagged_cell(f[key]) for key, _ in shown]
        rows.append(f"| {source} | {first['rows']} ({first['positives']}) | {trained} | {' | '.join(cells)} |")
    return "\n".join(rows)


def _flagged_cell(figures: dict[str, Any]) -> str:
    """What crosses the 1% FPR point: the detection rate of the positives and/or the FPR of the negatives."""
    kinds = [k for k in ("detection", "fpr") if f"{k}_at_1pct_fpr" in figures]
    return "; ".join(_rate_cell(figures[f"{k}_at_1pct_fpr"], k) for k in kinds) or "–"


def _left_out(section: Section) -> list[str]:
    if not section.left_out:
        return []
    return ["### Leave one source out (at the 1% FPR point; the probe that never saw a source and the guard have "
            "thresholds fixed on the other sources' test rows)", "", left_out_markdown(section), ""]


def _by_feature(section: Section) -> list[str]:
    parts = ["### ROC AUC by layer and pooling (test)", "",
             "| feature | probe | CV (selection metric) | test ROC AUC | test AP |", "|---|---|---|---|---|"]
    for name, entry in sorted(section.probes.items()):
        feature, kind, test = entry["id"]["feature"], entry["id"]["type"], entry["test"] or {}
        cv = section.cv_best_by_feature.get(feature)
        parts.append(f"| {feature} | {kind} | {fmt(cv)} | {fmt(test.get('roc_auc'))} | "
                     f"{fmt(test.get('average_precision'))} |")
    return parts


def _by_source(section: Section) -> list[str]:
    parts = ["", "### Per source (test, best probe vs guard)", "",
             f"| source | rows | {section.target} | probe accuracy | probe recall | guard accuracy | guard recall |",
             "|---|---|---|---|---|---|---|"]
    guard_src = (section.guard or {}).get("by_source", {})
    for source, m in section.best["by_source"].items():
        g = guard_src.get(source, {})
        parts.append(f"| {source} | {m['count']} | {m['n_true']} | {fmt(m['accuracy'])} | {fmt(m['recall'])} | "
                     f"{fmt(g.get('accuracy'))} | {fmt(g.get('recall'))} |")
    return parts


#: Breakdowns of the test rows beyond source: the metrics key, its heading and its first column's name.
GROUPINGS = (("by_length", "prompt length (test, tokens after the chat template)", "length"),
             ("by_history", "turns before the last user turn (test, conversation rows)", "earlier turns"),
             ("by_persona", "persona (test, conversation rows)", "persona"))


def _by_group(section: Section) -> list[str]:
    """The test rows by prompt length (quartiles and a long tail) and, with conversation rows, by the turns
    before the last user turn and by persona: ROC AUC and the detection rate of harmful rows at the scorer's
    1% FPR point (fixed on all in-distribution test rows), best probe beside guard; then, by earlier turns, the
    detection rate of every probe, so poolings can be compared as history grows."""
    parts: list[str] = []
    for key, title, column in GROUPINGS:
        if key not in section.best:
            continue
        parts += ["", f"### By {title}", "",
                  f"| {column} | rows | {section.target} | probe ROC AUC | probe detection at 1% FPR | guard ROC AUC "
                  "| guard detection at 1% FPR |", "|---|---|---|---|---|---|---|"]
        guard = (section.guard or {}).get(key, {})
        for group, m in section.best[key].items():
            g = guard.get(group, {})
            shown = group.split(": ", 1)[-1]  # length buckets are numbered so that they sort
            parts.append(f"| {shown} | {m['count']} | {m['n_true']} | {fmt(m['roc_auc'])} | "
                         f"{fmt(m.get('detection_at_1pct_fpr'))} | {fmt(g.get('roc_auc'))} | "
                         f"{fmt(g.get('detection_at_1pct_fpr'))} |")
    return parts + _history_by_probe(section)


def _history_by_probe(section: Section) -> list[str]:
    """Every probe's detection rate at its 1% FPR point by the turns before the last user turn."""
    if "by_history" not in section.best:
        return []
    groups = list(section.best["by_history"])
    parts = ["", "### Detection at 1% FPR by earlier turns, every probe (pooling and layer)", "",
             f"| probe | {' | '.join(groups)} |", "|---|" + "---|" * len(groups)]
    for name, entry in sorted(section.probes.items(), key=lambda item: (item[1]["id"]["pooling"],
                                                                        item[1]["id"]["layer"])):
        cells = [fmt(entry.get("by_history", {}).get(g, {}).get("detection_at_1pct_fpr")) for g in groups]
        parts.append(f"| {entry['id']['feature']} | {' | '.join(cells)} |")
    return parts


def _sweeps(section: Section) -> list[str]:
    parts = []
    for name, entry in [(section.best_probe, section.best), *section.guard_items()]:
        parts += ["", f"### Threshold sweep: {name}", "",
                  "| threshold | precision | recall | accuracy | tn | fp | fn | tp |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in entry["sweep"]:
            c = s["confusion"]
            parts.append(f"| {s['threshold']:g} | {fmt(s['precision'])} | {fmt(s['recall'])} | {fmt(s['accuracy'])} | "
                         f"{c['tn']} | {c['fp']} | {c['fn']} | {c['tp']} |")
    return parts


def _leaderboard(section: Section) -> list[str]:
    parts = ["", "### CV leaderboard", "", "| feature | type | params | ROC AUC (mean ± std) | AP | fit s |",
             "|---|---|---|---|---|---|"]
    for r in section.cv_leaderboard:
        parts.append(f"| {r['feature']} | {r['type']} | {r['params']} | {fmt(r['roc_auc_mean'])} ± "
                     f"{fmt(r['roc_auc_std'])} | {fmt(r['average_precision_mean'])} | {fmt(r['fit_seconds'], 2)} |")
    return parts
