"""Which deduplicated rows are kept (`subsample`) and which side of the train/test split each lands on
(`assign_split`, by near-duplicate group).

Split from `assemble.py`: both work on a pandas frame of per-row metadata only (source, label, id, group,
given split), never on the text, and keep the frame's index (the row's position in the loaded table).
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from guardray.columns import HARMFUL, ID, SOURCE, SPLIT
from guardray.datasets.tables import SPLITS
from guardray.jobspec import SplitSpec, SubsampleSpec

log = logging.getLogger(__name__)
def subsample(frame: pd.DataFrame, spec: SubsampleSpec) -> pd.DataFrame:
    """Strided (`every`), seeded random (`fraction`) per source, or a stratified total `limit`.

    Keeps the frame's index and order (the assembly uses the index as the row's position).
    """
    if spec.every:
        return frame[frame.groupby(SOURCE).cumcount() % spec.every == 0]
    if spec.fraction:
        parts = [g.sample(frac=spec.fraction, random_state=spec.seed) for _, g in frame.groupby(SOURCE, sort=False)]
        return pd.concat(parts).sort_index() if parts else frame
    if spec.limit and len(frame) > spec.limit:
        share = spec.limit / len(frame)
        parts = [
            g.sample(n=max(1, round(len(g) * share)), random_state=spec.seed)
            for _, g in frame.groupby([SOURCE, HARMFUL], sort=False)
        ]
        return pd.concat(parts).sort_index()
    return frame


def assign_split(frame: pd.DataFrame, spec: SplitSpec) -> pd.DataFrame:
    """Seeded train/test split by group (`group` column; without one every row is its own group), stratified
    by (source, label); rows with a given split keep it. `split` comes back as a categorical ('train', 'test').

    All rows of a group land on one side: near-copies of a training prompt in test would inflate test AUC.
    A group with given splits pulls its other rows to the split of its first given row (load order); if the
    given splits themselves disagree the group straddles (`groups_straddling` counts it). Every other group
    belongs to the stratum of its first row; groups are ordered by key (so the input order does not matter),
    given one seeded random number each, and in each stratum taken in that order into test while test has
    fewer than round(rows * test_fraction) rows. So test_fraction is a share of rows, exact for groups of
    one row (the usual case) and approximate with larger groups; a stratum of one group stays in train.
    """
    groups = (frame["group"] if "group" in frame.columns else frame[ID]).to_numpy()
    codes = np.full(len(frame), -1, dtype=np.int8)
    for code, name in enumerate(SPLITS):
        codes[(frame["split_given"] == name).to_numpy(dtype=bool)] = code
    given = pd.DataFrame({"group": groups, "code": codes}, index=frame.index).sort_index().query("code >= 0")
    if len(given):
        follow = pd.Series(groups).map(given.groupby("group")["code"].first()).to_numpy()
        pulled = (codes < 0) & ~np.isnan(follow)
        codes[pulled] = follow[pulled]
    free = codes < 0
    if free.any():
        members = pd.DataFrame({"group": groups[free], SOURCE: frame[SOURCE].to_numpy()[free],
                                HARMFUL: frame[HARMFUL].to_numpy()[free]}, index=frame.index[free])
        table = members.sort_index().groupby("group", sort=True).agg(
            **{SOURCE: (SOURCE, "first"), HARMFUL: (HARMFUL, "first")}, rows=(SOURCE, "size"))
        table["key"] = np.random.default_rng(spec.seed).random(len(table))
        table = table.sort_values("key", kind="stable")
        strata = table.groupby([SOURCE, HARMFUL], sort=False)["rows"]
        before = (strata.cumsum() - table["rows"]).to_numpy()
        target = np.where(strata.transform("size") > 1, np.round(strata.transform("sum") * spec.test_fraction), 0)
        to_test = pd.Series(before < target, index=table.index)
        wanted = np.round(strata.transform("sum") * spec.test_fraction) > 0
        by_stratum = pd.DataFrame({"tested": to_test, "wanted": wanted.to_numpy()}, index=table.index).groupby(
            [table[SOURCE], table[HARMFUL]], sort=False).any()
        starved = by_stratum[by_stratum["wanted"] & ~by_stratum["tested"]]
        if len(starved):  # a stratum that is one near-duplicate group: it stays whole in train
            log.warning("split: no test rows for %s (one near-duplicate group each, kept whole in train)",
                        ", ".join(f"{src}/{'harmful' if lab else 'benign'}" for src, lab in starved.index))
        codes[free] = to_test.reindex(groups[free]).to_numpy(dtype=bool).astype(np.int8)
    return frame.assign(split=pd.Categorical.from_codes(codes, SPLITS))


def groups_straddling(frame: pd.DataFrame) -> int:
    """How many groups have rows in both splits (only given splits can do that)."""
    if "group" not in frame.columns or frame.empty:
        return 0
    codes = pd.Series(frame[SPLIT].cat.codes.to_numpy()).groupby(frame["group"].to_numpy())
    return int((codes.min() != codes.max()).sum())
