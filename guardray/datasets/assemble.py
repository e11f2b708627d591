"""The dataset stage: sources → one labelled, deduplicated, subsampled, split prompt table.

Every loaded row ends up either in `dataset.parquet` or in `rejects.parquet` with a reason (bad value,
missing label, duplicate, near-duplicate); rows removed by subsampling are counted in the counts table.
Output columns: `id, prompt, harmful, source, split` plus any extra boolean labels the sources carried (null
for the rows of a source that lacks that label; the summary's `null_labels` counts them), and the harm
category columns `cat_<name>` when a source is a categorised corpus (`categories.py`: its True / False / null
rule; the summary's `categories` counts them). A job with a conversation source (`conversations.py`) adds
`messages`, `response` and `response_harmful` last; a job without one has exactly the columns above.

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

import logging
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from guardray.datasets import categories, packaged
from guardray.datasets.conversations import CONVERSATION_COLUMNS
from guardray.datasets.counts import count_table, empty_dataset_problem, format_counts
from guardray.datasets.keys import PromptKeys, first_occurrence, hex_ids, prompt_keys
from guardray.datasets.sources import expected_rows, load_source
from guardray.datasets.splitting import assign_split, groups_straddling, subsample
from guardray.columns import HARMFUL, ID, PROMPT, REASON, RESPONSE_HARMFUL, SOURCE, SPLIT
from guardray.errors import InputError
from guardray.jobspec import DatasetSpec, JobSpec
from guardray.storage import Location

log = logging.getLogger(__name__)

DATASET_FILE = "dataset.parquet"
REJECTS_FILE = "rejects.parquet"
CONFLICTS_FILE = "conflicts.parquet"
CONFLICTS_SCHEMA = pa.schema([(PROMPT, pa.string()), ("sources", pa.list_(pa.string())),
                              ("labels", pa.list_(pa.bool_())), ("kept_label", pa.bool_())])
#: Small row groups: the features stage reads dataset.parquet by row ranges and decodes only what it needs.
DATASET_ROW_GROUP_ROWS = 1024
_NO_TEXT = pa.scalar(None, pa.string())


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
        "labels": [HARMFUL, *extra, *_response_label(final)],
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

_LOADED_CORE = [SOURCE, "row", PROMPT, HARMFUL, "split_given", "reject", *CONVERSATION_COLUMNS]


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
        if source.split is not None:  # a held-out (or train-only) source: every row on one side
            table = _drop(table, SPLIT).append_column(SPLIT, pa.repeat(pa.scalar(source.split, pa.string()),
                                                                       table.num_rows))
        expected[name] = expected_rows(source)
        log.info("source %s: %d rows", name, table.num_rows)
        tables.append((name, table))
    extra = list(dict.fromkeys(c for _, t in tables for c in t.column_names if c not in _SOURCE_COLUMNS))
    missing = {c: [name for name, t in tables if c not in t.column_names] for c in extra}
    conformed = [_conform(t, name, extra, spec.conversational) for name, t in tables]
    return pa.concat_tables(conformed), expected, missing


def _drop(table: pa.Table, column: str) -> pa.Table:
    return table.drop_columns([column]) if column in table.column_names else table


def _with_categories(source: Any, table: pa.Table) -> pa.Table:
    """A packaged corpus's table with its category columns (row for row); other sources unchanged."""
    corpus = packaged.CORPORA.get(source.type)
    if corpus is None:
        return table
    cats = corpus.category_table(table.num_rows)
    for column in cats.column_names:
        table = table.append_column(column, cats[column])
    return table


_SOURCE_COLUMNS = {PROMPT, HARMFUL, SPLIT, "reject", "row", *CONVERSATION_COLUMNS}


def _conform(table: pa.Table, name: str, extra: list[str], conversational: bool) -> pa.Table:
    """One source's table in the shared column order and types; absent columns are null (never False). The
    conversation columns are there only in a job with a conversation source (`DatasetSpec.conversational`)."""
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
        **({c: column(c, typ) for c, typ in CONVERSATION_COLUMNS.items()} if conversational else {}),
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
        **{c: rows[c] for c in CONVERSATION_COLUMNS if c in rows.column_names},
    })


def _response_label(final: pa.Table) -> list[str]:
    """`response_harmful` when some kept row has it: a target like the others."""
    has = RESPONSE_HARMFUL in final.column_names and final[RESPONSE_HARMFUL].null_count < final.num_rows
    return [RESPONSE_HARMFUL] if has else []


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



def run_dataset(spec: JobSpec, inputs: dict[str, Location], out: Location) -> dict[str, Any]:
    """The dataset stage's entry point (`guardray.stages.dataset`): it reads no other stage."""
    return build_dataset(spec.dataset, out)
