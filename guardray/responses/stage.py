"""The responses stage (spec section `generate:`): the chat model answers every prompt with its own chat template.

Each prompt is rendered exactly as the features stage renders it (`chat_renderer(tokenizer, spec.model)`, same
truncation), and those ids are what the model continues: no backend re-templates or re-tokenises. Decoding is
greedy at `temperature: 0`, else nucleus sampling with `seed`; it stops at an end-of-sequence id (the
tokenizer's and the generation config's) or after `max_new_tokens` (`guardray.decoding`, shared with serving).

Output columns: `response` (decoded without special tokens), `response_tokens` (the generated ids as int32,
without the stop token) and `finish_reason` ('stop' at an end-of-sequence id, 'length' at `max_new_tokens`).
They are written per row-range shard exactly like the features stage (`guardray.sharded`: parts, errors,
resume, exactly-once, error budget, numerics), then joined in dataset order onto the dataset stage's columns
into this stage's own `dataset.parquet` (only the rows that generated; failed rows are in `errors.parquet`),
which the features stage reads as its dataset when `generate` is on.

Backends (`RESPONSE_BACKENDS`, by `generate.backend`): 'hf' runs `model.generate` on a Ray Data actor pool
(`guardray.responses.hf`); 'vllm' hands the same ids to Ray's own LLM batch layer (`guardray.responses.vllm`,
imported only when a spec asks for it).
"""
from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from guardray.columns import FINISH_REASON, ID, PARTS_DIR, RESPONSE_TOKENS
from guardray.datasets.assemble import DATASET_FILE, DATASET_ROW_GROUP_ROWS
from guardray.decoding import RESPONSE_COLUMNS, RESPONSE_SCHEMA
from guardray.errors import StageError, ray_get
from guardray.rendering import chat_renderer, check_personas
from guardray.responses.hf import ResponseActor
from guardray.sharded import ShardedStage, run_sharded
from guardray.shards import RangeReader, finished_shards
from guardray.jobspec import JobSpec
from guardray.storage import DEFAULT_FILE_MODE, Location, resolve


def _vllm_pool(*args: Any) -> Any:
    from guardray.responses.vllm import run_vllm_shards  # needs vllm; imported only for backend: vllm

    return run_vllm_shards(*args)


#: Backend name → the responses stage it runs as (its actor, or its own way of running the missing shards).
RESPONSE_BACKENDS: dict[str, ShardedStage] = {
    "hf": ShardedStage("responses", "generate", ResponseActor),
    "vllm": ShardedStage("responses", "generate", None, run_pool=_vllm_pool),
}


def preflight(spec: JobSpec) -> None:
    """Fail on the driver, in one line, for a template longer than max_length (loads only the tokenizer)."""
    from guardray.models import load_tokenizer

    tokenizer = load_tokenizer(spec.model)
    chat_renderer(tokenizer, spec.model)
    check_personas(tokenizer, spec)


def run_responses(spec: JobSpec, inputs: dict[str, Location], out: Location) -> dict[str, Any]:
    """The responses stage: generate the missing shards, check exactly-once, then write `dataset.parquet`."""
    preflight(spec)
    dataset = inputs["dataset"].join(DATASET_FILE)
    summary = run_sharded(RESPONSE_BACKENDS[spec.generate.backend], spec, dataset, out)
    summary["backend"] = spec.generate.backend
    summary.update(write_responses_dataset_remote(dataset, out))
    return summary


def write_responses_dataset_remote(dataset: Location, out: Location) -> dict[str, Any]:
    """`write_responses_dataset` in a Ray task, so the driver never holds prompts or responses."""
    import ray

    task = ray.remote(num_cpus=0.5, max_retries=2, retry_exceptions=True)(write_responses_dataset)
    return ray_get(task.remote(dataset.uri, out.uri, out.file_mode))


def write_responses_dataset(dataset_uri: str, out_uri: str, file_mode: int = DEFAULT_FILE_MODE) -> dict[str, Any]:
    """Write `<out>/dataset.parquet`: the input's columns plus the response columns, rows in dataset order,
    only rows that generated, in row groups of DATASET_ROW_GROUP_ROWS (so `RangeReader` reads ranges cheaply).

    Streams one part at a time; parts are checked to hold their range's generated ids in dataset order."""
    reader, out = RangeReader(resolve(dataset_uri)), resolve(out_uri, file_mode)
    shards = finished_shards(out)
    reasons: dict[str, int] = {}
    counts = {"generated_tokens": 0}

    def rows_of(shard: Any) -> pa.Table:
        part = out.join(PARTS_DIR, shard.part_name).read_table()
        rows = reader.read(shard)
        rows = rows.filter(pc.is_in(rows.column(ID), value_set=part.column(ID)))
        if rows.column(ID).to_pylist() != part.column(ID).to_pylist():
            raise StageError(f"responses: {shard.part_name} does not hold its rows in dataset order")
        for reason in part.column(FINISH_REASON).to_pylist():
            reasons[reason] = reasons.get(reason, 0) + 1
        lengths = pc.list_value_length(part.column(RESPONSE_TOKENS))
        counts["generated_tokens"] += int(pc.sum(lengths).as_py() or 0)
        rows = _without_reply_columns(rows)
        for name in RESPONSE_COLUMNS:
            rows = rows.append_column(part.schema.field(name), part.column(name))
        return rows

    def write(f: Any) -> None:
        writer: pq.ParquetWriter | None = None
        pending: list[pa.Table] = []
        for shard in shards:
            table = rows_of(shard)
            writer = writer or pq.ParquetWriter(f, table.schema)
            pending.append(table)
            if sum(t.num_rows for t in pending) >= DATASET_ROW_GROUP_ROWS:
                pending = _flush(writer, pa.concat_tables(pending), final=False)
        if writer is None:  # no shards at all: an empty dataset keeps the input's columns
            writer = pq.ParquetWriter(f, _empty_schema(reader))
        _flush(writer, pa.concat_tables(pending) if pending else None, final=True)
        writer.close()

    out.join(DATASET_FILE).write_with(write)
    return {"finish_reasons": reasons, **counts}


def _flush(writer: pq.ParquetWriter, table: pa.Table | None, final: bool) -> list[pa.Table]:
    """Write whole row groups of `table`; return the remainder (written too when `final`)."""
    if table is None:
        return []
    whole = table.num_rows if final else table.num_rows - table.num_rows % DATASET_ROW_GROUP_ROWS
    if whole:
        writer.write_table(table.slice(0, whole), row_group_size=DATASET_ROW_GROUP_ROWS)
    return [table.slice(whole)] if whole < table.num_rows else []


def _without_reply_columns(rows: pa.Table) -> pa.Table:
    """The dataset's rows less its own (all-null) `response` column: a dataset with conversation sources has
    one, and validation refuses given replies beside generated ones, so the generated reply takes its place."""
    return rows.drop_columns([name for name in RESPONSE_COLUMNS if name in rows.column_names])


def _empty_schema(reader: RangeReader) -> pa.Schema:
    schema = reader.schema
    for name in RESPONSE_COLUMNS:
        if name in schema.names:
            schema = schema.remove(schema.get_field_index(name))
    for field in RESPONSE_SCHEMA:
        schema = schema.append(field)
    return schema

