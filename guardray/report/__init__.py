"""The report stage: score every row with every refit probe and the guard scores, compare per target, render.

Writes `scores.parquet` (one row per features row: id, split, source, one nullable label column per target, one
score column per scorer), `report.json` (all metrics; `targets: {name: section}`), `report.md`, PNG plots (per
target under `<target>/`, and `auc_by_target.png`) and, when the responses were judged, `mined_prompts.parquet`.
`guardray report` re-renders the markdown and plots from `report.json` + `scores.parquet` without recomputing.

Each target has a section: its best probe (by CV) against its matching guard score (`targets.guard_column`), on
the test rows where that target's label is known. For a feedback target (`response_unsafe`, `slipped_through`)
the guard is the INPUT guard: the section answers "from the prompt's activations, before any token is
generated, how well does a probe predict the label, compared with the input guard's score?".

Work goes where the data is. One Ray task per scorer streams its own column, keeps the scores and drops the
features, and writes `scores/<i>.parquet`; one task writes every row's labels (computed in the scan); one task
merges those files a batch at a time into `scores.parquet`; one task per (target, scorer) reads three columns of
it and computes the metrics. The driver holds metrics only.

Modules: `stage` (`run_report`, `rerender`: the driver), `tasks` (the Ray work: scores, labels, merge,
metrics), `mining` (mined prompts), `sections` (`Plan`, `Section`, report.json's layout), `render` (markdown),
`plots` (matplotlib).
"""
from guardray.report.stage import rerender, run_report

__all__ = ["rerender", "run_report"]
