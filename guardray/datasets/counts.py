"""The dataset stage's counts table: rows per (source, label) from expected to kept, as CSV and aligned text,
and the one-line reason when no row is left.

Split from `assemble.py` (which decides what is kept) because it only reports: it reads per-row metadata (no
text) and the rejects table, and decides nothing.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from guardray.columns import HARMFUL, REASON, SOURCE, SPLIT
from guardray.errors import one_line


COUNT_COLUMNS = [SOURCE, HARMFUL, "expected", "loaded", "rejected", "duplicates", "near_duplicates", "kept",
                 "train", "test"]


def count_table(loaded: pd.DataFrame, final: pd.DataFrame, expected: dict[str, int | None]) -> pd.DataFrame:
    """Rows per (source, label): expected, loaded, rejected (bad + duplicates), of those the exact and the
    near duplicates, kept, train, test. A source that loaded no rows (a header-only CSV) has one row of zeros
    with label '-', so every source is accounted for.

    `loaded` and `final` hold one row per loaded / kept row (source, harmful, rejected, duplicate,
    near_duplicate / source, harmful, split); no text. A row without a label is counted under '?' (it is
    always rejected: 'missing label').
    """
    label = _label_text(loaded[HARMFUL])
    strata = [loaded[SOURCE], label]
    loaded_counts = loaded.groupby(strata, sort=False, observed=True).size()
    sums = {c: loaded[c].groupby(strata, observed=True).sum() for c in ("rejected", "duplicate", "near_duplicate")}
    labels_per_source = label.groupby(loaded[SOURCE], observed=True).nunique()
    kept = final.groupby([final[SOURCE], _label_text(final[HARMFUL]), final[SPLIT]], observed=True).size()
    by_source: dict[str, list[tuple[str, int]]] = {}
    for (source, text), n in loaded_counts.items():
        by_source.setdefault(source, []).append((text, int(n)))
    records = []
    for source in dict.fromkeys([*expected, *by_source]):  # spec order
        single = labels_per_source.get(source, 1) == 1
        for text, n in by_source.get(source, [("-", 0)]):
            train, test = (int(kept.get((source, text, s), 0)) for s in ("train", "test"))
            records.append({
                SOURCE: source,
                HARMFUL: text,
                "expected": expected.get(source) if single else None,
                "loaded": n,
                **{column: int(sums[key].get((source, text), 0)) for column, key in
                   (("rejected", "rejected"), ("duplicates", "duplicate"), ("near_duplicates", "near_duplicate"))},
                "kept": train + test,
                "train": train,
                "test": test,
            })
    return pd.DataFrame(records, columns=COUNT_COLUMNS)


def empty_dataset_problem(counts: pd.DataFrame, rejects: pa.Table, rejects_uri: str) -> str:
    """One line for a dataset with no row left: per source its rows, rejects (with the first reason) and
    what subsampling dropped."""
    first = (rejects.select([SOURCE, REASON]).to_pandas().drop_duplicates(SOURCE)
             .set_index(SOURCE)[REASON].to_dict())
    per_source = counts.groupby(SOURCE, sort=False)[["loaded", "rejected"]].sum()
    parts = []
    for source, row in per_source.iterrows():
        text = f"{source}: {row['loaded']} rows, {row['rejected']} rejected"
        if source in first:
            text += f" (first reason: {one_line(first[source], 120)})"
        if row["loaded"] > row["rejected"]:
            text += f", {row['loaded'] - row['rejected']} dropped by dataset.subsample"
        parts.append(text)
    return f"dataset: no rows left; {'; '.join(parts)}; see {rejects_uri}"


def _label_text(labels: pd.Series) -> pd.Series:
    """'True' / 'False', or '?' for a missing label (as the counts table shows it), as a categorical."""
    values = labels.astype("boolean")
    codes = np.where(values.isna().to_numpy(), 2, values.fillna(False).to_numpy(dtype=bool)).astype(np.int8)
    return pd.Series(pd.Categorical.from_codes(codes, ["False", "True", "?"]), index=labels.index, name=HARMFUL)


def format_counts(counts: pd.DataFrame) -> str:
    """The counts table as aligned text, with a ✓/✗ when a source declares its expected size."""
    header = (f"{'Source':28} {'Harmful':>7} {'Expected':>9} {'Actual':>8} {'Rejected':>9} {'Dup':>7} {'NearDup':>7} "
              f"{'Kept':>7} {'Train':>7} {'Test':>6}")
    lines = [header, "-" * len(header)]
    for r in counts.itertuples():
        exp = "" if pd.isna(r.expected) else f"{int(r.expected)}"
        rej = f"{int(r.rejected)}"
        mark = "" if not exp else (" ✓" if int(r.expected) == r.loaded else " ✗")
        lines.append(
            f"{r.source:28} {r.harmful:>7} {exp:>9} {r.loaded:>8} {rej:>9} {r.duplicates:>7} {r.near_duplicates:>7} "
            f"{r.kept:>7} {r.train:>7} {r.test:>6}{mark}"
        )
    lines.append("-" * len(header))
    lines.append(
        f"{'total':28} {'':>7} {'':>9} {counts['loaded'].sum():>8} {counts['rejected'].sum():>9} "
        f"{counts['duplicates'].sum():>7} "
        f"{counts['near_duplicates'].sum():>7} {counts['kept'].sum():>7} "
        f"{counts['train'].sum():>7} {counts['test'].sum():>6}"
    )
    return "\n".join(lines)
