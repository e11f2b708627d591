"""The dataset stage: sources → one labelled, deduplicated, subsampled, split prompt table.

Every loaded row ends up either in `dataset.parquet` or in `rejects.parquet` with a reason (bad value, missing
label, duplicate); rows removed by subsampling are counted in the counts table. Output columns:
`id, prompt, harmful, source, split` plus any extra boolean labels the sources carried.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from guardray.datasets.sources import expected_rows, load_source
from guardray.spec import DatasetSpec, SplitSpec, SubsampleSpec
from guardray.storage import Location

log = logging.getLogger(__name__)

DATASET_FILE = "dataset.parquet"
REJECTS_FILE = "rejects.parquet"
CONFLICTS_FILE = "conflicts.parquet"
CORE_COLUMNS = ["id", "prompt", "harmful", "source", "split"]


def prompt_id(source: str, prompt: str) -> str:
    """Stable id: the same prompt from the same source gets the same id in every run."""
    return hashlib.sha256(f"{source}\0{prompt}".encode()).hexdigest()[:16]


def build_dataset(spec: DatasetSpec, out: Location) -> dict[str, Any]:
    """Run the dataset stage into `out`; return the summary (counts per source and label)."""
    loaded, expected = _load_all(spec)
    rows, rejects = _validate(loaded)
    rows, duplicates, conflicts = _deduplicate(rows)
    kept = subsample(rows, spec.subsample)
    final = assign_split(kept, spec.split)
    counts = count_table(loaded, pd.concat([rejects, duplicates]), final, expected)

    extra = [c for c in final.columns if c not in CORE_COLUMNS + ["row", "split_given"]]
    out.join(DATASET_FILE).write_table(_to_arrow(final[CORE_COLUMNS + extra]))
    out.join(REJECTS_FILE).write_table(_to_arrow(pd.concat([rejects, duplicates], ignore_index=True)))
    out.join(CONFLICTS_FILE).write_table(_to_arrow(conflicts))
    out.join("counts.csv").write_text(counts.to_csv(index=False))
    text = format_counts(counts)
    out.join("counts.txt").write_text(text + "\n")
    print(text)
    if len(conflicts):
        log.warning("%d prompts appear with conflicting labels; kept the first source's label (see %s)",
                    len(conflicts), CONFLICTS_FILE)
    return {
        "rows": len(final),
        "train": int((final["split"] == "train").sum()),
        "test": int((final["split"] == "test").sum()),
        "harmful": int(final["harmful"].sum()),
        "rejected": len(rejects),
        "duplicates": len(duplicates),
        "conflicts": len(conflicts),
        "labels": ["harmful", *extra],
        "counts": counts.to_dict(orient="records"),
    }


def _load_all(spec: DatasetSpec) -> tuple[pd.DataFrame, dict[str, int | None]]:
    frames, expected = [], {}
    for source in spec.sources:
        name = source.source_name
        rows = load_source(source)
        frame = pd.DataFrame(rows)
        frame["row"] = np.arange(len(frame))
        if source.limit and len(frame) > source.limit:
            pick = np.random.default_rng(source.seed).choice(len(frame), source.limit, replace=False)
            frame = frame.iloc[np.sort(pick)]
        frame["source"] = name
        expected[name] = expected_rows(source)
        log.info("source %s: %d rows", name, len(frame))
        frames.append(frame)
    loaded = pd.concat(frames, ignore_index=True)
    for column in ("reject", "split"):
        if column not in loaded:
            loaded[column] = None
    loaded["split_given"] = loaded["split"]
    return loaded, expected


def _validate(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split rows into usable ones and rejects (with a reason each)."""
    reasons = frame["reject"].copy()
    for i, (prompt, label) in enumerate(zip(frame["prompt"], frame["harmful"])):
        if isinstance(reasons.iat[i], str):
            continue
        if not isinstance(prompt, str):
            reasons.iat[i] = f"prompt is {type(prompt).__name__}, not a string"
        elif not prompt.strip():
            reasons.iat[i] = "empty or whitespace-only prompt"
        elif label is None or (isinstance(label, float) and np.isnan(label)):
            reasons.iat[i] = "missing label"
    bad = reasons.notna().to_numpy()
    rejects = _reject_frame(frame[bad], reasons[bad])
    good = frame[~bad].drop(columns=["reject"]).copy()
    good["harmful"] = good["harmful"].astype(bool)
    good["id"] = [prompt_id(s, p) for s, p in zip(good["source"], good["prompt"])]
    return good, rejects


def _reject_frame(frame: pd.DataFrame, reasons: pd.Series) -> pd.DataFrame:
    return pd.DataFrame({
        "source": frame["source"].astype(str).to_numpy(),
        "row": frame["row"].astype("int64").to_numpy(),
        "prompt": [p if isinstance(p, str) else (None if p is None else repr(p)) for p in frame["prompt"]],
        "reason": reasons.astype(str).to_numpy(),
    })


def _deduplicate(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Keep the first occurrence of each identical prompt (sources in spec order); report label conflicts."""
    first = frame.drop_duplicates("prompt", keep="first")
    dupes = frame[frame.duplicated("prompt", keep="first")]
    first_by_prompt = first.set_index("prompt")
    reasons = pd.Series(
        [f"duplicate of {first_by_prompt.at[p, 'id']} ({first_by_prompt.at[p, 'source']})" for p in dupes["prompt"]],
        index=dupes.index, dtype=object,
    )
    labels = frame.groupby("prompt")["harmful"].nunique()
    conflicting = labels[labels > 1].index
    conflicts = (
        frame[frame["prompt"].isin(conflicting)]
        .groupby("prompt")
        .agg(sources=("source", lambda s: sorted(set(s))), labels=("harmful", lambda s: sorted(set(s))))
        .reset_index()
    )
    conflicts["kept_label"] = [bool(first_by_prompt.at[p, "harmful"]) for p in conflicts["prompt"]]
    return first.reset_index(drop=True), _reject_frame(dupes, reasons), conflicts


def subsample(frame: pd.DataFrame, spec: SubsampleSpec) -> pd.DataFrame:
    """Strided (`every`), seeded random (`fraction`) per source, or a stratified total `limit`."""
    if spec.every:
        return frame[frame.groupby("source").cumcount() % spec.every == 0].reset_index(drop=True)
    if spec.fraction:
        parts = [g.sample(frac=spec.fraction, random_state=spec.seed) for _, g in frame.groupby("source", sort=False)]
        return pd.concat(parts).sort_index().reset_index(drop=True)
    if spec.limit and len(frame) > spec.limit:
        share = spec.limit / len(frame)
        parts = [
            g.sample(n=max(1, round(len(g) * share)), random_state=spec.seed)
            for _, g in frame.groupby(["source", "harmful"], sort=False)
        ]
        return pd.concat(parts).sort_index().reset_index(drop=True)
    return frame.reset_index(drop=True)


def assign_split(frame: pd.DataFrame, spec: SplitSpec) -> pd.DataFrame:
    """Seeded train/test split, stratified by (source, label); rows with a given split keep it.

    Each stratum is shuffled with the seed and its first round(n * test_fraction) rows go to test, so every
    source and label is represented in both splits in proportion (a stratum of one row stays in train).
    """
    frame = frame.copy()
    frame["split"] = frame["split_given"]
    rng = np.random.default_rng(spec.seed)
    free = frame[frame["split"].isna()]
    for _, group in free.sort_values("id").groupby(["source", "harmful"], sort=True):
        order = group.index.to_numpy()[rng.permutation(len(group))]
        n_test = int(round(len(group) * spec.test_fraction)) if len(group) > 1 else 0
        frame.loc[order[:n_test], "split"] = "test"
        frame.loc[order[n_test:], "split"] = "train"
    return frame


def count_table(
    loaded: pd.DataFrame, rejects: pd.DataFrame, final: pd.DataFrame, expected: dict[str, int | None]
) -> pd.DataFrame:
    """Rows per (source, label): expected, loaded, rejected (bad + duplicates), kept, train, test."""
    records = []
    loaded_labels = loaded.assign(harmful=loaded["harmful"].map(_label_text))
    reject_counts = rejects.groupby("source").size()
    for (source, label), group in loaded_labels.groupby(["source", "harmful"], sort=False):
        kept = final[(final["source"] == source) & (final["harmful"].map(_label_text) == label)]
        labels_in_source = loaded_labels.loc[loaded_labels["source"] == source, "harmful"].nunique()
        records.append({
            "source": source,
            "harmful": label,
            "expected": expected.get(source) if labels_in_source == 1 else None,
            "loaded": len(group),
            "rejected": int(reject_counts.get(source, 0)) if labels_in_source == 1 else None,
            "kept": len(kept),
            "train": int((kept["split"] == "train").sum()),
            "test": int((kept["split"] == "test").sum()),
        })
    return pd.DataFrame(records)


def _label_text(value: Any) -> str:
    return str(bool(value)) if isinstance(value, (bool, np.bool_, int)) else "?"


def format_counts(counts: pd.DataFrame) -> str:
    """The counts table as aligned text, with a ✓/✗ when a source declares its expected size."""
    header = f"{'Source':28} {'Harmful':>7} {'Expected':>9} {'Actual':>8} {'Rejected':>9} {'Kept':>7} {'Train':>7} {'Test':>6}"
    lines = [header, "-" * len(header)]
    for r in counts.itertuples():
        exp = "" if pd.isna(r.expected) else f"{int(r.expected)}"
        rej = "" if pd.isna(r.rejected) else f"{int(r.rejected)}"
        mark = "" if not exp else (" ✓" if int(r.expected) == r.loaded else " ✗")
        lines.append(
            f"{r.source:28} {r.harmful:>7} {exp:>9} {r.loaded:>8} {rej:>9} {r.kept:>7} {r.train:>7} {r.test:>6}{mark}"
        )
    lines.append("-" * len(header))
    lines.append(
        f"{'total':28} {'':>7} {'':>9} {counts['loaded'].sum():>8} {'':>9} {counts['kept'].sum():>7} "
        f"{counts['train'].sum():>7} {counts['test'].sum():>6}"
    )
    return "\n".join(lines)


def _to_arrow(frame: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
