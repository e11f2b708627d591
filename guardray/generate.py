"""The responses stage (`generate:`): the chat model answers every prompt with its own chat template.

Each prompt is rendered exactly as the features stage renders it (`chat_renderer(tokenizer, spec.model)`, same
truncation), and those ids are what the model continues: no backend re-templates or re-tokenises. Decoding is
greedy at `temperature: 0`, else nucleus sampling with `seed`; it stops at an end-of-sequence id (the
tokenizer's and the generation config's) or after `max_new_tokens`.

Output columns: `response` (decoded without special tokens), `response_tokens` (the generated ids as int32,
without the stop token) and `finish_reason` ('stop' at an end-of-sequence id, 'length' at `max_new_tokens`).
They are written per row-range shard exactly like the features stage (`guardray.sharded`: parts, errors,
resume, exactly-once, error budget, numerics), then joined in dataset order onto the dataset stage's columns
into this stage's own `dataset.parquet` (only the rows that generated; failed rows are in `errors.parquet`),
which the features stage reads as its dataset when `generate` is on.

Backends (`GENERATE_BACKENDS`): 'hf' runs `model.generate` on a Ray Data actor pool (left-padded, length-sorted
batches, KV cache); 'vllm' hands the same ids to Ray's own LLM batch layer (`guardray.generate_vllm`).

Sampling with 'hf' seeds each batch from `seed` and the batch's row ids, so a rerun with the same batching
draws the same tokens, but a row's draws depend on which rows share its batch (`batch_size`, the shard cut):
sampled responses are reproducible for a fixed setup, not across batch sizes. Greedy responses do not depend
on the batching (up to floating-point near-ties between padded and unpadded shapes).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from guardray.cache import stable_hash
from guardray.datasets.assemble import DATASET_FILE, DATASET_ROW_GROUP_ROWS
from guardray.errors import StageError, one_line, ray_get
from guardray.features import _encode as encode_prompts
from guardray.features import length_batches
from guardray.models import LoadedModel, load_model, numerics
from guardray.rendering import Encoded, PromptRenderer, chat_renderer
from guardray.sharded import ShardActor, ShardedStage, raise_device_failure, run_sharded
from guardray.columns import FINISH_REASON, ID, PARTS_DIR, PROMPT, RESPONSE, RESPONSE_TOKENS
from guardray.shards import RangeReader, finished_shards
from guardray.spec import GenerateSpec, JobSpec
from guardray.storage import DEFAULT_FILE_MODE, Location, resolve

log = logging.getLogger(__name__)

RESPONSE_SCHEMA = pa.schema([(RESPONSE, pa.string()), (RESPONSE_TOKENS, pa.list_(pa.int32())),
                             (FINISH_REASON, pa.string())])
RESPONSE_COLUMNS = tuple(RESPONSE_SCHEMA.names)
#: A part: the row's id (checked against the dataset) and the response columns.
PART_SCHEMA = pa.schema([(ID, pa.string()), *RESPONSE_SCHEMA])


@dataclass(frozen=True)
class Generation:
    """One prompt's answer: generated ids without the stop token, and why generation ended."""

    tokens: list[int]
    finish_reason: str


def stop_ids(tokenizer: Any, generation_config: Any) -> tuple[int, ...]:
    """End-of-sequence ids: the tokenizer's eos and every id the model's generation config lists."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return tuple(sorted(i for i in ids if i is not None))


def split_stop(tokens: Sequence[int], stops: Sequence[int], max_new_tokens: int) -> Generation:
    """Cut generated ids at the first stop id ('stop'); without one, generation ran to `max_new_tokens`."""
    tokens = list(tokens)[:max_new_tokens]
    for position, token in enumerate(tokens):
        if token in stops:
            return Generation(tokens[:position], "stop")
    return Generation(tokens, "length" if len(tokens) >= max_new_tokens else "stop")


def batch_seed(seed: int, keys: Sequence[str]) -> int:
    """The sampling seed of one batch: from the spec's seed and the batch's row ids (in order)."""
    return int(stable_hash([seed, list(keys)], 15), 16)


def generation_config(stops: Sequence[int], pad_id: int | None, max_new_tokens: int, temperature: float,
                      top_p: float) -> Any:
    """A GenerationConfig that depends on these settings alone: greedy at temperature 0, else nucleus sampling.

    Every logits processor the model's own generation_config could switch on is set to off explicitly
    (transformers fills unset fields from it), so the answer depends on the settings alone, as with vLLM's.
    """
    from transformers import GenerationConfig

    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} \
        if temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    neutral = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_p": None, "typical_p": None,
               "encoder_repetition_penalty": 1.0, "length_penalty": 1.0, "min_new_tokens": 0,
               "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
               "epsilon_cutoff": None, "eta_cutoff": None}
    return GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=list(stops), pad_token_id=pad_id,
                            use_cache=True, **neutral, **sampling)


def left_padded(encoded: Sequence[Encoded], pad_id: int) -> tuple[Any, Any]:
    """(input_ids, attention_mask) with left padding: every prompt ends where generation starts."""
    import torch

    width = max(len(e.ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, width - len(e.ids):] = torch.tensor(e.ids)
        mask[row, width - len(e.ids):] = 1
    return ids, mask


class HFGenerator:
    """transformers `generate` over left-padded batches of rendered ids, with the KV cache on."""

    def __init__(self, chat: LoadedModel, spec: GenerateSpec):
        self.chat, self.spec = chat, spec
        self.stops = stop_ids(chat.tokenizer, chat.model.generation_config)
        self.pad_id = chat.tokenizer.pad_token_id
        self.config = generation_config(self.stops, self.pad_id, spec.max_new_tokens, spec.temperature, spec.top_p)

    def numerics(self) -> dict[str, Any]:
        return {"backend": "hf", **numerics(self.chat)}

    def generate(self, encoded: Sequence[Encoded], keys: Sequence[str]) -> list[Generation]:
        """One `generate` call for the batch; `keys` (row ids) seed it when sampling."""
        import torch

        ids, mask = left_padded(encoded, self.pad_id)
        width = ids.shape[1]
        if self.spec.temperature > 0:
            torch.manual_seed(batch_seed(self.spec.seed, keys))
        with torch.inference_mode():
            out = self.chat.model.generate(input_ids=ids.to(self.chat.device),
                                           attention_mask=mask.to(self.chat.device), generation_config=self.config)
        return [split_stop(row, self.stops, self.spec.max_new_tokens) for row in out[:, width:].tolist()]


@dataclass
class Responder:
    """Renders prompts and answers them in length-sorted batches; a failing batch is retried prompt by prompt,
    so a failing prompt becomes an error row and never sinks its neighbours."""

    renderer: PromptRenderer
    generator: HFGenerator
    spec: GenerateSpec
    tokenizer: Any

    @classmethod
    def from_spec(cls, spec: JobSpec) -> "Responder":
        chat = load_model(spec.model)
        return cls(chat_renderer(chat.tokenizer, chat.spec), HFGenerator(chat, spec.generate), spec.generate,
                   chat.tokenizer)

    @property
    def numerics(self) -> str:
        return json.dumps({"chat": self.generator.numerics()}, sort_keys=True)

    def process(self, prompts: Sequence[str], keys: Sequence[str]) -> tuple[dict[int, Generation], dict[int, str]]:
        """Generations of the prompts that succeeded and {index: reason} for the rest."""
        errors: dict[int, str] = {}
        encoded = encode_prompts(self.renderer, prompts, range(len(prompts)), errors, "render")
        rows = list(encoded)
        done: dict[int, Generation] = {}
        for batch in length_batches([len(encoded[r].ids) for r in rows], self.spec.batch_size, None):
            members = [rows[b] for b in batch]
            try:
                done.update(zip(members, self._generate(encoded, keys, members)))
            except Exception as e:  # noqa: BLE001 - isolate the prompt that fails
                raise_device_failure(e)
                for r in members:
                    try:
                        done.update(zip([r], self._generate(encoded, keys, [r])))
                    except Exception as e:  # noqa: BLE001
                        raise_device_failure(e)
                        errors[r] = f"generate: {type(e).__name__}: {one_line(e)}"
        return done, errors

    def _generate(self, encoded: dict[int, Encoded], keys: Sequence[str], rows: list[int]) -> list[Generation]:
        return self.generator.generate([encoded[r] for r in rows], [keys[r] for r in rows])

    def table(self, ids: pa.Array | pa.ChunkedArray, generations: Sequence[Generation]) -> pa.Table:
        """A part: ids and response columns, with explicit types so an empty shard keeps the schema."""
        return response_table(ids, generations, self.tokenizer)


def response_table(ids: Any, generations: Sequence[Generation], tokenizer: Any) -> pa.Table:
    """ids plus response, response_tokens (int32) and finish_reason, typed as PART_SCHEMA."""
    texts = tokenizer.batch_decode([g.tokens for g in generations], skip_special_tokens=True) if generations else []
    return pa.table({
        ID: ids,
        RESPONSE: pa.array(texts, pa.string()),
        RESPONSE_TOKENS: pa.array([g.tokens for g in generations], pa.list_(pa.int32())),
        FINISH_REASON: pa.array([g.finish_reason for g in generations], pa.string()),
    }).cast(PART_SCHEMA)


class ResponseActor(ShardActor):
    """The 'hf' backend's Ray Data actor: one chat model per actor, one part per shard."""

    stage = "responses"

    def load(self, spec: JobSpec) -> str:
        self.responder = Responder.from_spec(spec)
        return self.responder.numerics

    def compute(self, rows: pa.Table) -> tuple[pa.Table, dict[int, str], int]:
        keys = rows.column(ID).to_pylist()
        generations, errors = self.responder.process(rows.column(PROMPT).to_pylist(), keys)
        ok = sorted(generations)
        part = self.responder.table(rows.column(ID).take(pa.array(ok, pa.int64())), [generations[i] for i in ok])
        return part, errors, sum(len(g.tokens) for g in generations.values())


def _vllm_pool(*args: Any) -> Any:
    from guardray.generate_vllm import run_vllm_shards  # needs vllm; imported only for backend: vllm

    return run_vllm_shards(*args)


#: Backend name → the responses stage it runs as (its actor, or its own way of running the missing shards).
GENERATE_BACKENDS: dict[str, ShardedStage] = {
    "hf": ShardedStage("responses", "generate", ResponseActor),
    "vllm": ShardedStage("responses", "generate", None, run_pool=_vllm_pool),
}


def preflight(spec: JobSpec) -> None:
    """Fail on the driver, in one line, for a template longer than max_length (loads only the tokenizer)."""
    from guardray.models import load_tokenizer

    chat_renderer(load_tokenizer(spec.model), spec.model)


def run_responses(spec: JobSpec, inputs: dict[str, Location], out: Location) -> dict[str, Any]:
    """The responses stage: generate the missing shards, check exactly-once, then write `dataset.parquet`."""
    preflight(spec)
    dataset = inputs["dataset"].join(DATASET_FILE)
    summary = run_sharded(GENERATE_BACKENDS[spec.generate.backend], spec, dataset, out)
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
        lengths = pc.list_value_length(part.column("response_tokens"))
        counts["generated_tokens"] += int(pc.sum(lengths).as_py() or 0)
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


def _empty_schema(reader: RangeReader) -> pa.Schema:
    schema = reader.schema
    for field in RESPONSE_SCHEMA:
        schema = schema.append(field)
    return schema

