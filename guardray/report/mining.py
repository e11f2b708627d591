"""Mined prompts (a Ray task): the rows whose response the guard flags, written to `mined_prompts.parquet` with
their prompt and response text, whether they slipped through the input guard, and the best response_unsafe
probe's score. Each input is scanned with a pushed-down filter, so only the mined rows are ever held."""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from guardray import targets
from guardray.columns import (GUARD_RESPONSE_SCORE, GUARD_SCORE, ID, PROMPT, RESPONSE, SOURCE, SPLIT, feature_schema,
                              require, scan_batches)
from guardray.report.tasks import SCORES_FILE
from guardray.jobspec import JobSpec
from guardray.storage import Location

MINED_FILE = "mined_prompts.parquet"
MINED_SCHEMA = pa.schema([(ID, pa.string()), (SOURCE, pa.string()), (SPLIT, pa.string()),
                          (GUARD_SCORE, pa.float64()), (GUARD_RESPONSE_SCORE, pa.float64()),
                          ("slipped_through", pa.bool_())])


def mine_prompts(spec: JobSpec, features: Location, responses: Location, out: Location,
                 probe: str | None) -> dict[str, Any]:
    """Runs on a worker: the rows whose response the guard flags (`response_unsafe`), with `slipped_through`,
    the guard scores, the prompt and response text (joined by id from the responses stage) and the best
    response_unsafe probe's score. Each input is scanned with a pushed-down filter (the label, then the ids),
    so only the mined rows are held."""
    schema = feature_schema(features)
    unsafe = targets.resolve("response_unsafe", schema, spec.feedback)
    has_guard = GUARD_SCORE in schema.names  # the response guard without the input guard: no slipped_through
    slipped = (targets.resolve("slipped_through", schema, spec.feedback).expression if has_guard
               else pc.scalar(pa.scalar(None, pa.bool_())))
    guard = pc.field(GUARD_SCORE).cast(pa.float64()) if has_guard else pc.scalar(pa.scalar(None, pa.float64()))
    projection = {ID: pc.field(ID), SOURCE: pc.field(SOURCE), SPLIT: pc.field(SPLIT),
                  GUARD_SCORE: guard, GUARD_RESPONSE_SCORE: pc.field(GUARD_RESPONSE_SCORE).cast(pa.float64()),
                  "slipped_through": slipped}
    mined = pa.Table.from_batches(list(scan_batches(features, projection, unsafe.expression)),
                                  schema=MINED_SCHEMA)
    mined = mined.append_column("order", pa.array(np.arange(mined.num_rows), pa.int64()))
    ids = mined.column(ID)
    texts = _by_id(responses.join("dataset.parquet"), [PROMPT, RESPONSE], ids, written_by="responses")
    table = mined.join(texts, ID, join_type="left outer")
    if probe is not None:
        scores = _by_id(out.join(SCORES_FILE), [probe], ids, written_by="report").rename_columns([ID, "probe_score"])
        table = table.join(scores, ID, join_type="left outer")
    table = table.sort_by("order").drop_columns(["order"])
    order = [ID, SOURCE, SPLIT, PROMPT, RESPONSE, GUARD_SCORE, GUARD_RESPONSE_SCORE,
             "slipped_through", *(["probe_score"] if probe is not None else [])]
    out.join(MINED_FILE).write_table(table.select(order))
    return {"file": MINED_FILE, "rows": table.num_rows,
            "slipped_through": int(pc.sum(table.column("slipped_through").cast(pa.int64())).as_py() or 0),
            "probe": probe, "response_threshold": spec.feedback.response_threshold,
            "input_threshold": spec.feedback.input_threshold}


def _by_id(location: Location, columns: list[str], ids: pa.ChunkedArray, written_by: str) -> pa.Table:
    """`id` and `columns` of the rows of a parquet file (or directory) whose id is among `ids` (a pushed-down
    filter: only those rows are decoded into the result)."""
    location.refresh()
    dataset = pads.dataset(location.path, filesystem=location.fs, format="parquet")
    require(dataset.schema, [ID, *columns], stage="report", where=location.uri, written_by=written_by)
    batches = dataset.to_batches(columns=[ID, *columns], filter=pc.field(ID).isin(ids.combine_chunks()),
                                 batch_readahead=2, fragment_readahead=1)
    return pa.Table.from_batches(list(batches), schema=pa.schema([dataset.schema.field(c) for c in [ID, *columns]]))
