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
from guardray.columns import feature_schema, scan_batches
from guardray.report.tasks import SCORES_FILE
from guardray.spec import JobSpec
from guardray.storage import Location
from guardray.targets import GUARD_RESPONSE_SCORE, GUARD_SCORE

MINED_FILE = "mined_prompts.parquet"
MINED_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("split", pa.string()),
                          ("guard_score", pa.float64()), ("guard_response_score", pa.float64()),
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
    projection = {"id": pc.field("id"), "source": pc.field("source"), "split": pc.field("split"),
                  "guard_score": guard, "guard_response_score": pc.field(GUARD_RESPONSE_SCORE).cast(pa.float64()),
                  "slipped_through": slipped}
    mined = pa.Table.from_batches(list(scan_batches(features, projection, unsafe.expression)),
                                  schema=MINED_SCHEMA)
    mined = mined.append_column("order", pa.array(np.arange(mined.num_rows), pa.int64()))
    ids = mined.column("id")
    texts = _by_id(responses.join("dataset.parquet"), ["prompt", "response"], ids)
    table = mined.join(texts, "id", join_type="left outer")
    if probe is not None:
        scores = _by_id(out.join(SCORES_FILE), [probe], ids).rename_columns(["id", "probe_score"])
        table = table.join(scores, "id", join_type="left outer")
    table = table.sort_by("order").drop_columns(["order"])
    order = ["id", "source", "split", "prompt", "response", "guard_score", "guard_response_score",
             "slipped_through", *(["probe_score"] if probe is not None else [])]
    out.join(MINED_FILE).write_table(table.select(order))
    return {"file": MINED_FILE, "rows": table.num_rows,
            "slipped_through": int(pc.sum(table.column("slipped_through").cast(pa.int64())).as_py() or 0),
            "probe": probe, "response_threshold": spec.feedback.response_threshold,
            "input_threshold": spec.feedback.input_threshold}


def _by_id(location: Location, columns: list[str], ids: pa.ChunkedArray) -> pa.Table:
    """`id` and `columns` of the rows of a parquet file (or directory) whose id is among `ids` (a pushed-down
    filter: only those rows are decoded into the result)."""
    location.refresh()
    dataset = pads.dataset(location.path, filesystem=location.fs, format="parquet")
    batches = dataset.to_batches(columns=["id", *columns], filter=pc.field("id").isin(ids.combine_chunks()),
                                 batch_readahead=2, fragment_readahead=1)
    return pa.Table.from_batches(list(batches), schema=pa.schema([dataset.schema.field(c) for c in ["id", *columns]]))
