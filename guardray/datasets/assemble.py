"""The dataset stage: sources → one labelled, deduplicated, subsampled, split prompt table.

Every loaded row ends up either in `dataset.parquet` or in `rejects.parquet` with a reason (bad value,
missing label, duplicate, near-duplicate); rows removed by subsampling are counted in the counts table.
Output columns: `id, prompt, harmful, source, split` plus any extra boolean labels the sources carried (null
for the rows of a source that lacks that label; the summary's `null_labels` counts them), and the harm
category columns `cat_<name>` when a source is a categorised corpus (`categories.py`: its True / False / null
rule; the summary's `categories` counts them).

The stage is columnar so a million-row source fits: the prompt text stays in Arrow columns from reader to
parquet (validated with Arrow kernels, copied once by the final filter); ids and the dedupe and group digests
are hashed from the prompts' (raw, normalised, affix-stripped: `normalize.py`) bytes a batch at a time, and
subsampling and the split run on a pandas frame of per-row metadata only (source, label, id, group).

Near-duplicates and the split: `dataset.dedupe` picks the key that drops copies (exact text, normalised text,
or base text with adversarial affixes stripped); the split always groups rows by base text, so a prompt and its
jailbreak-wrapped variants that are kept as separate rows still land on one side, and test AUC is not inflated
by near-copies of training prompts. The output keeps the load order (sources in spec order, rows in
file order), so it is the same for the same spec and the features stage can read it by row ranges.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from guardray.datasets import categories, packaged
from guardray.datasets.normalize import text_keys
from guardray.datasets.sources import expected_rows, load_source
from guardray.datasets.tables import SPLITS
from guardray.columns import HARMFUL, ID, PROMPT, REASON, SOURCE, SPLIT
from guardray.errors import InputError, one_line
from guardray.jobspec import DatasetSpec, JobSpec, SplitSpec, SubsampleSpec
from guardray.storage import Location

log = logging.getLogger(__name__)

DATASET_FILE = "dataset.parquet"
REJECTS_FILE = "rejects.parquet"
CONFLICTS_FILE = "conflicts.parquet"
CONFLICTS_SCHEMA = pa.schema([(PROMPT, pa.string()), ("sources", pa.list_(pa.string())),
                              ("labels", pa.list_(pa.bool_())), ("kept_label", pa.bool_())])
#: Small row groups: the features stage reads dataset.parquet by row ranges and decodes only what it needs.
DATASET_ROW_GROUP_ROWS = 1024
#: Prompts turned into Python bytes at a time while hashing (bounds that transient memory).
_HASH_BATCH_ROWS = 8192
_NO_TEXT = pa.scalar(None, pa.string())


def prompt_id(source: str, prompt: str) -> str:
    """Stable id: the same prompt from the same source gets the same id in every run."""
    return hashlib.sha256(f"{source}\0{prompt}".encode()).hexdigest()[:16]


def build_dataset(spec: DatasetSpec, out: Location) -> dict[str, Any]:
    """Run the dataset stage into `out`; return the summary (counts per source and label)."""
    loaded, expected, missing_labels = _load_all(spec)
    extra = [c for c in loaded.column_names if c not in _LOADED_CORE]
    reasons = validate(loaded)
    usable = pc.is_null(reasons).to_numpy(zero_copy_only=False)
    keys = prompt_keys(loaded, usable, spec.dedupe, spec.adversarial_affixes)
    first_of = first_occurrence(keys.dedupe, usable)
    rows = np.arange(loaded.num_rows)
    is_first = first_of == rows
    removed = usable & ~is_first
    exact = removed & (first_occurrence(keys.exact, usable) != rows)  # this very text came earlier
    near = removed & ~exact  # only a normalised / affix-stripped form of it did
    rejects = pa.concat_tables([
        _reject_table(loaded, ~usable, reasons.filter(pa.array(~usable))),
        _reject_table(loaded, exact, _duplicate_reasons(loaded, keys.ids, first_of[exact], "duplicate")),
        _reject_table(loaded, near, _duplicate_reasons(loaded, keys.ids, first_of[near], "near-duplicate")),
    ])
    conflicts = find_conflicts(loaded, usable, first_of)
    kept = assign_split(subsample(_candidates(loaded, is_first, keys), spec.subsample), spec.split).sort_index()
    straddling = groups_straddling(kept)
    if straddling:
        log.warning("%d near-duplicate groups have rows on both sides of the split because a split_column put "
                    "them there (kept as given: test metrics may be optimistic)", straddling)
    final = _final_table(loaded, kept, extra)
    counts = count_table(_meta(loaded, ~usable | removed, exact, near), kept, expected)
    if not final.num_rows:  # every later stage would fail on it, or train on nothing: say why, here
        _write_outputs(out, None, rejects, conflicts, counts)
        raise InputError(empty_dataset_problem(counts, rejects, out.join(REJECTS_FILE).uri))
    _write_outputs(out, final, rejects, conflicts, counts)
    return {
        "rows": final.num_rows,
        "train": int((kept[SPLIT] == "train").sum()),
        "test": int((kept[SPLIT] == "test").sum()),
        "harmful": int(pc.sum(final[HARMFUL]).as_py() or 0),
        "rejected": int((~usable).sum()),
        "dedupe": spec.dedupe,
        "duplicates": int(exact.sum()),
        "near_duplicates": int(near.sum()),
        "split_groups": int(kept["group"].nunique()),
        "groups_straddling_given_split": straddling,
        "conflicts": conflicts.num_rows,
        "labels": [HARMFUL, *extra],
        "counts": counts.to_dict(orient="records"),
        "null_labels": _null_labels(final, missing_labels),
        **({"categories": cats} if (cats := categories.category_counts(final)) else {}),
    }


def _write_outputs(
    out: Location, final: pa.Table | None, rejects: pa.Table, conflicts: pa.Table, counts: pd.DataFrame
) -> None:
    """The stage's files; without `final` (an empty dataset, a failed stage) only what explains it."""
    if final is not None:
        out.join(DATASET_FILE).write_table(final, row_group_size=DATASET_ROW_GROUP_ROWS)
    out.join(REJECTS_FILE).write_table(rejects)
    out.join(CONFLICTS_FILE).write_table(conflicts)
    out.join("counts.csv").write_text(counts.to_csv(index=False))
    text = format_counts(counts)
    out.join("counts.txt").write_text(text + "\n")
    print(text)
    if conflicts.num_rows:
        log.warning("%d prompts appear with conflicting labels; kept the first source's label (see %s)",
                    conflicts.num_rows, CONFLICTS_FILE)


# ------------------------------------------------------------------------------------------------ loading

_LOADED_CORE = [SOURCE, "row", PROMPT, HARMFUL, "split_given", "reject"]


def _load_all(spec: DatasetSpec) -> tuple[pa.Table, dict[str, int | None], dict[str, list[str]]]:
    """All sources as one table (source, row, prompt, harmful, extra labels..., split_given, reject), plus
    the expected sizes and, per extra label, the sources that do not have it.

    Category columns (`categories.py`) come from the corpora that carry them; when a job has any, a benign
    source gets False in them before its `limit` sample (benign is judged on the whole source)."""
    loaded = [(source, _with_categories(source, load_source(source))) for source in spec.sources]
    cat_columns = categories.category_columns(c for _, t in loaded for c in t.column_names)
    tables, expected = [], {}
    for source, table in loaded:
        name = source.source_name
        table = categories.fill_benign(table, cat_columns)
        table = table.append_column("row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
        if source.limit and table.num_rows > source.limit:
            pick = np.random.default_rng(source.seed).choice(table.num_rows, source.limit, replace=False)
            keep = np.zeros(table.num_rows, dtype=bool)
            keep[pick] = True
            table = table.filter(pa.array(keep))
        expected[name] = expected_rows(source)
        log.info("source %s: %d rows", name, table.num_rows)
        tables.append((name, table))
    extra = list(dict.fromkeys(c for _, t in tables for c in t.column_names if c not in _SOURCE_COLUMNS))
    missing = {c: [name for name, t in tables if c not in t.column_names] for c in extra}
    return pa.concat_tables([_conform(t, name, extra) for name, t in tables]), expected, missing


def _with_categories(source: Any, table: pa.Table) -> pa.Table:
    """A packaged corpus's table with its category columns (row for row); other sources unchanged."""
    corpus = packaged.CORPORA.get(source.type)
    if corpus is None:
        return table
    cats = corpus.category_table(table.num_rows)
    for column in cats.column_names:
        table = table.append_column(column, cats[column])
    return table


_SOURCE_COLUMNS = {PROMPT, HARMFUL, SPLIT, "reject", "row"}


def _conform(table: pa.Table, name: str, extra: list[str]) -> pa.Table:
    """One source's table in the shared column order and types; absent columns are null (never False)."""
    n = table.num_rows

    def column(col: str, typ: pa.DataType) -> pa.ChunkedArray | pa.Array:
        return table[col].cast(typ) if col in table.column_names else pa.nulls(n, typ)

    columns = {
        SOURCE: pa.repeat(pa.scalar(name, pa.string()), n),
        "row": table["row"],
        PROMPT: column(PROMPT, pa.string()),
        HARMFUL: column(HARMFUL, pa.bool_()),
        **{c: column(c, pa.bool_()) for c in extra},
        "split_given": column(SPLIT, pa.string()),
        "reject": column("reject", pa.string()),
    }
    return pa.table(columns)


def _meta(loaded: pa.Table, rejected: np.ndarray, exact: np.ndarray, near: np.ndarray) -> pd.DataFrame:
    """source, label, whether rejected (bad or a copy) and the duplicate kind per loaded row (no text), for
    the counts."""
    return pd.DataFrame({
        SOURCE: loaded[SOURCE].to_pandas(),
        HARMFUL: loaded[HARMFUL].to_pandas(types_mapper={pa.bool_(): pd.BooleanDtype()}.get),
        "rejected": rejected,
        "duplicate": exact,
        "near_duplicate": near,
    })


# -------------------------------------------------------------------------------------- checks and dedupe


def validate(loaded: pa.Table) -> pa.ChunkedArray:
    """Per row, why it cannot be used (null when it can): the source's reject reason first, then a missing
    or blank prompt, then a missing label. There is no length limit: a long prompt is a valid prompt."""
    prompt = loaded[PROMPT]
    blank = pc.or_(pc.equal(pc.binary_length(prompt), 0), pc.utf8_is_space(prompt))
    return pc.coalesce(
        loaded["reject"],
        pc.if_else(pc.is_null(prompt), pa.scalar("missing prompt"), _NO_TEXT),
        pc.if_else(blank, pa.scalar("empty or whitespace-only prompt"), _NO_TEXT),
        pc.if_else(pc.is_null(loaded[HARMFUL]), pa.scalar("missing label"), _NO_TEXT),
    )


class PromptKeys(NamedTuple):
    """Per loaded row (zeros where not usable): the id key and three prompt digests."""

    ids: np.ndarray  #: uint64: the first 8 bytes of `prompt_id`'s sha256
    exact: np.ndarray  #: V16 digest of the raw text (exact duplicates)
    dedupe: np.ndarray  #: V16 digest of the text `dataset.dedupe` compares (one of the others)
    group: np.ndarray  #: V16 digest of the base text (normalised, adversarial affixes stripped): the split group


def prompt_keys(
    loaded: pa.Table, mask: np.ndarray, dedupe: str = "exact", affixes: tuple[str, ...] = ()
) -> PromptKeys:
    """The id key and the prompt digests of the rows in `mask`.

    The id key is a uint64 (numbers sort fast; they become hex text only for the output); the digests are
    the first 16 bytes of a sha256 (a collision is ~1e-27 likely at a million rows). Hashing is a Python
    loop (hashlib per prompt) over UTF-8 bytes read from Arrow a batch at a time, and the normalised and
    base texts are made per batch by Arrow kernels and dropped after hashing, so the transient memory is
    one batch's worth. It is cheaper than Arrow's exact `dictionary_encode`, whose hash table holds two
    more copies of the text (measured once by hand, not by a repo benchmark, on a million 900-character
    prompts: 2.9 GB instead of 1.6 GB peak RSS, and slower).
    """
    n = loaded.num_rows
    ids = np.zeros(n, dtype=np.uint64)
    exact, normalized, group = (np.zeros(n, dtype="V16") for _ in range(3))
    start = 0
    for batch in loaded.select([SOURCE, PROMPT]).to_batches(max_chunksize=_HASH_BATCH_ROWS):
        local = np.flatnonzero(mask[start:start + batch.num_rows])
        if len(local):
            part = batch if len(local) == batch.num_rows else batch.take(pa.array(local))
            sources = pc.dictionary_encode(part.column(0))
            prefixes = [f"{s}\0".encode() for s in sources.dictionary.to_pylist()]
            texts = part.column(1).cast(pa.binary()).to_pylist()
            keys = [hashlib.sha256(prefixes[i] + t).digest()[:8] for i, t in zip(sources.indices.to_numpy(), texts)]
            ids[start + local] = np.frombuffer(b"".join(keys), dtype=">u8")
            exact[start + local] = _digests(texts)
            norm_text, base_text = text_keys(part.column(1), affixes)
            if dedupe == "normalized":
                normalized[start + local] = _digests(norm_text.cast(pa.binary()).to_pylist())
            group[start + local] = _digests(base_text.cast(pa.binary()).to_pylist())
        start += batch.num_rows
    chosen = {"exact": exact, "normalized": normalized, "variants": group}[dedupe]
    return PromptKeys(ids, exact, chosen, group)


def _digests(texts: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join([hashlib.sha256(t).digest()[:16] for t in texts]), "V16")


def first_occurrence(digests: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """For each usable row, the position of the first usable row with the same prompt digest (-1 for others);
    np.unique's return_index is the first occurrence, so 'first' follows the load order (spec order)."""
    positions = np.flatnonzero(usable)
    _, first, inverse = np.unique(digests[positions], return_index=True, return_inverse=True)
    result = np.full(len(digests), -1, dtype=np.int64)
    result[positions] = positions[first][inverse.reshape(-1)]
    return result


def hex_ids(keys: np.ndarray) -> pa.Array:
    """uint64 keys → the 16-hex-digit id strings (`prompt_id`), built in numpy without per-row strings."""
    octets = keys.astype(">u8").view(np.uint8).reshape(-1, 8)
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    text = np.empty((len(keys), 16), dtype=np.uint8)
    text[:, 0::2], text[:, 1::2] = digits[octets >> 4], digits[octets & 15]
    offsets = np.arange(0, 16 * (len(keys) + 1), 16, dtype=np.int32)
    return pa.StringArray.from_buffers(len(keys), pa.py_buffer(offsets), pa.py_buffer(text.tobytes()))


def _duplicate_reasons(loaded: pa.Table, keys: np.ndarray, firsts: np.ndarray, kind: str) -> pa.ChunkedArray:
    """'<kind> of <kept row's id> (<its source>)'."""
    first_sources = loaded[SOURCE].take(pa.array(firsts, pa.int64()))
    return pc.binary_join_element_wise(f"{kind} of ", hex_ids(keys[firsts]), " (", first_sources, ")", "")


def _reject_table(loaded: pa.Table, mask: np.ndarray, reasons: pa.Array | pa.ChunkedArray) -> pa.Table:
    rows = loaded.select([SOURCE, "row", PROMPT]).filter(pa.array(mask))
    return rows.append_column(REASON, reasons.cast(pa.string()) if len(reasons) else pa.array([], pa.string()))


def find_conflicts(loaded: pa.Table, usable: np.ndarray, first_of: np.ndarray) -> pa.Table:
    """Prompts given both labels (by one or several sources, counting every copy the dedupe key merges):
    prompt (the kept row's text), sources, labels, kept_label (the kept row's label)."""
    harmful = pc.fill_null(loaded[HARMFUL], False).to_numpy()
    groups = first_of[usable]
    total = np.bincount(groups, minlength=loaded.num_rows)
    true = np.bincount(groups, weights=harmful[usable], minlength=loaded.num_rows)
    mixed = (true > 0) & (true < total)
    in_conflict = usable & mixed[np.maximum(first_of, 0)]
    if not in_conflict.any():
        return CONFLICTS_SCHEMA.empty_table()
    picked = loaded.select([SOURCE, HARMFUL]).filter(pa.array(in_conflict)).to_pandas()
    picked["first"] = first_of[in_conflict]
    conflicts = picked.groupby("first").agg(
        sources=(SOURCE, lambda s: sorted(set(s))), labels=(HARMFUL, lambda s: sorted(map(bool, set(s)))))
    firsts = conflicts.index.to_numpy()
    conflicts.insert(0, PROMPT, loaded[PROMPT].take(pa.array(firsts)).to_pylist())
    conflicts["kept_label"] = harmful[firsts]
    return pa.Table.from_pandas(conflicts, CONFLICTS_SCHEMA, preserve_index=False)


# ---------------------------------------------------------------------------------- subsample and split


def _candidates(loaded: pa.Table, is_first: np.ndarray, keys: PromptKeys) -> pd.DataFrame:
    """Metadata of the deduplicated rows (no text; `id` as its uint64 key, `group` as the first 8 bytes of the
    base-text digest), indexed by position in `loaded`."""
    positions = np.flatnonzero(is_first)
    rows = loaded.select([SOURCE, HARMFUL, "split_given"]).filter(pa.array(is_first)).to_pandas()
    group = np.ascontiguousarray(keys.group[positions]).view(">u8")[::2].astype(np.uint64)
    frame = pd.DataFrame({ID: keys.ids[positions], SOURCE: rows[SOURCE],
                          HARMFUL: rows[HARMFUL].astype(bool), "split_given": rows["split_given"], "group": group})
    frame.index = positions
    return frame


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


def _final_table(loaded: pa.Table, kept: pd.DataFrame, extra: list[str]) -> pa.Table:
    """dataset.parquet's table: the `kept` rows (indexed by position, ascending) in load order; their text is
    copied once, by the filter (not at all when every row is kept)."""
    rows = loaded
    if len(kept) != loaded.num_rows:
        keep = np.zeros(loaded.num_rows, dtype=bool)
        keep[kept.index.to_numpy()] = True
        rows = loaded.filter(pa.array(keep))
    is_test = pa.array((kept[SPLIT] == "test").to_numpy(dtype=bool))
    return pa.table({
        ID: hex_ids(kept[ID].to_numpy()),
        PROMPT: rows[PROMPT],
        HARMFUL: rows[HARMFUL],
        SOURCE: rows[SOURCE],
        SPLIT: pc.if_else(is_test, "test", "train"),
        **{c: rows[c] for c in extra},
    })


def _null_labels(final: pa.Table, missing: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """{label: {source: rows}} for extra labels a source does not have: its rows keep null there (a missing
    label is unknown, not False); one warning line per source and label (per source for category columns)."""
    result: dict[str, dict[str, int]] = {}
    for column, sources in missing.items():
        for source in sources:
            rows = int(pc.sum(pc.equal(final[SOURCE], source)).as_py() or 0)
            if rows:
                result.setdefault(column, {})[source] = rows
    cat_columns = set(categories.category_columns(result))
    for column in (c for c in result if c not in cat_columns):
        for source, rows in result[column].items():
            log.warning("source %s has no '%s' label: its %d rows keep null in that column", source, column, rows)
    by_source: dict[str, list[str]] = {}
    for column in categories.category_columns(cat_columns):
        for source in result[column]:
            by_source.setdefault(source, []).append(column)
    for source, columns in by_source.items():
        log.warning("source %s has no harm categories: its %d rows keep null in %s", source,
                    result[columns[0]][source], ", ".join(columns))
    return result


# ------------------------------------------------------------------------------------------------- counts


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


def run_dataset(spec: JobSpec, inputs: dict[str, Location], out: Location) -> dict[str, Any]:
    """The dataset stage's entry point (`guardray.stages.dataset`): it reads no other stage."""
    return build_dataset(spec.dataset, out)
