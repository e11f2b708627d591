"""The features stage: Ray Data actors run the chat model (activation hooks) and the guard model.

Data flow: the dataset stage's parquet is cut into row-range shards (`guardray.shards`); a Ray Data dataset of
the ranges still missing goes through `map_batches(FeatureActor, ActorPoolStrategy)`; each actor reads its own
rows from the parquet, processes them and writes `parts/part-<start>-<end>.parquet` itself, so results stream
to disk or GCS while the job runs and the driver only sees a one-row summary per shard (never prompts or
activations).

Crash safety: every file is written atomically (storage.Location.write_bytes); a part is written last, so its
existence means the shard is done. On resume, leftover parts are verified against the dataset (in Ray tasks)
and any that cannot be read or do not hold exactly their range are redone. Actor restarts and task retries are
bounded by the spec; a CUDA error kills the actor so that Ray restarts it and retries the shard. Prompts that
fail are written to `errors/` with the reason, under an error budget: past `max_error_fraction` the stage stops
and never commits. Before committing, every part is checked to hold exactly the ids of its range and the ranges
are checked to tile the dataset: every input id lands exactly once in parts ∪ errors. That machinery is shared
with the responses stage and lives in `guardray.sharded`; this module holds what is particular to features.

Chat model and guard share one actor (one model after the other on the same batch): with the guard being the
chat model itself it is one load, and otherwise both fit on one 80 GB GPU for 7–8B models, which keeps a
prompt's features and scores in one row written once. See README for when two actor stages would be better.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from guardray.activations import Batch, capture, packing_problem, resolve_layers
from guardray.chats import Chat, as_chat, table_chats
from guardray.columns import (DATASET_COLUMNS, DROPPED_TURNS, GUARD_PREFIX, HISTORY_TURNS, MESSAGES, META_COLUMNS,
                              N_TOKENS, PERSONA, POOLINGS, PROMPT, RESPONSE, RESPONSE_POOLINGS, RESPONSE_TOKENS, TRUNCATED, feature_column,
                              parts_dataset, require, with_feature_metadata)
from guardray.datasets.assemble import DATASET_FILE
from guardray.encoding import encode_rows, length_batches
from guardray.errors import InputError, StageError
from guardray.guard import Guard, build_guards, output_columns, preflight_guard, renamed
from guardray.models import LoadedModel, load_model, numerics
from guardray.rendering import (ConversationRenderer, Encoded, PromptRenderer, chat_conversation_renderer, chat_renderer,
                                check_personas)
from guardray.isolation import CrashMemory, run_isolating
from guardray.sharded import ShardActor, ShardedStage, run_sharded
from guardray.shards import footer
from guardray.jobspec import ExtractSpec, JobSpec
from guardray.storage import Location

log = logging.getLogger(__name__)

STORE_DTYPES = {"float16": (np.float16, pa.float16()), "float32": (np.float32, pa.float32())}
TORCH_STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class ExtractStats:
    prompts: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0


#: Default (rows, padded tokens) per forward pass by device type: 8-16k tokens keep a GPU's matmuls large; a
#: CPU gains nothing from more than a few thousand and holds the activations in host memory.
FORWARD_BUDGETS = {"cuda": (512, 16384), "cpu": (16, 4096)}


def forward_budget(extract: ExtractSpec, device: Any) -> tuple[int, int]:
    """(rows, padded tokens) per forward pass: the spec's values where given, else the device type's defaults."""
    rows, tokens = FORWARD_BUDGETS.get(torch.device(device).type, FORWARD_BUDGETS["cpu"])
    return extract.batch_size or rows, extract.max_tokens_per_batch or tokens


def uses_packing(extract: ExtractSpec, chat: LoadedModel, renderer: PromptRenderer) -> bool:
    """Whether the chat model's batches run packed (`extract.packing`): 'auto' packs with flash-attention, whose
    varlen kernels skip the padding; 'on' packs with any attention. Either way two short prompts are run packed
    and padded first, and a model whose attention would mix packed rows is refused in one line."""
    attention = chat.model.config._attn_implementation
    wanted = extract.packing == "on" or (extract.packing == "auto" and attention == "flash_attention_2")
    if not wanted:
        return False
    probe_rows = [renderer.encode(text) for text in PACKING_CHECK_PROMPTS]
    problem = packing_problem(chat.model, probe_rows, chat.tokenizer.pad_token_id, chat.device)
    if problem:
        raise InputError(f"extract.packing: {problem}; set extract.packing: off")
    return True


#: Two prompts of different lengths the packing check runs both ways.
PACKING_CHECK_PROMPTS = ("Hello there!", "Write three sentences about the sea, the wind and the harbour at night.")


#: `process`'s per-row flag (not a part column): the row has a reply, so its response columns are not null.
WITH_RESPONSE = "_with_response"

#: Dataset columns a features part does not carry: the texts (the responses stage keeps them) and token ids.
NOT_CARRIED = (PROMPT, MESSAGES, RESPONSE, RESPONSE_TOKENS)


@dataclass
class FeatureExtractor:
    """Turns prompts (and their responses) into activation and guard columns. Used by the Ray actors, the tests
    and the benchmark.

    Per prompt, each in its own forward passes over length-sorted batches: the chat model on the prompt
    (`poolings`), the chat model on the (prompt, response) chat (`resp_last`, `resp_mean`), the guard on the
    prompt, the guard on the (prompt, response) pair (`guard_response_*`). A prompt failing any of them is an
    error row of its own.
    """

    chat: LoadedModel
    renderer: PromptRenderer
    layers: list[int]
    poolings: tuple[str, ...]
    extract: ExtractSpec
    guard: Guard | None = None
    response_guard: Guard | None = None
    conversation: ConversationRenderer | None = None
    guard_columns: tuple[str, ...] = ()
    packed: bool = False  # the chat model's batches run as one unpadded sequence (`extract.packing`)
    stats: ExtractStats = field(default_factory=ExtractStats)
    #: rows that broke the device on an earlier attempt (the actor shares its own, per shard)
    crashes: CrashMemory = field(default_factory=CrashMemory)

    @classmethod
    def from_spec(cls, spec: JobSpec, device: str | None = None) -> "FeatureExtractor":
        """`device`: the one the actor was given (`device: auto` resolves to it); None outside an actor."""
        chat = load_model(spec.model, device)
        judges = guard_judges(spec)
        guards = build_guards(chat, spec, judges, device)
        names = tuple(name for judge in judges for name in output_columns(spec.guard, judge))
        conversation = (chat_conversation_renderer(chat.tokenizer, chat.spec)
                        if "response" in spec.extract.on else None)
        renderer = chat_renderer(chat.tokenizer, chat.spec)
        return cls(chat, renderer, resolve_layers(spec.extract.layers, chat.num_layers),
                   spec.extract.poolings if "prompt" in spec.extract.on else (), spec.extract, guards.get("prompt"),
                   guards.get("response"), conversation, names, uses_packing(spec.extract, chat, renderer))

    @property
    def columns(self) -> dict[str, tuple[str, int]]:
        """Activation column → (pooling, layer): the parts' field metadata records them (`to_table`)."""
        poolings = (*self.poolings, *(RESPONSE_POOLINGS if self.conversation else ()))
        return {feature_column(p, layer): (p, layer) for layer in self.layers for p in poolings}

    @property
    def numerics(self) -> str:
        """The resolved device, dtype and attention of the chat model and the guard, as one JSON string."""
        resolved = {"chat": numerics(self.chat), "guard": self.guard.numerics() if self.guard else None}
        return json.dumps(resolved, sort_keys=True)

    def process(self, prompts: Sequence[str | Chat | Exception], responses: Sequence[str] | None = None
                ) -> tuple[dict[str, Any], dict[int, str]]:
        """Columns for every row that succeeded (in input order) and {index: reason} for the rest. A row is a
        prompt or a conversation (`Chat`); an exception in its place (messages that break a rule) is its error."""
        if responses is None and (self.conversation or self.response_guard):
            raise StageError("features: response activations or the response guard need a `response` column "
                             "(the responses stage's, or a source's given responses)")
        pairs = list(zip(prompts, responses)) if responses is not None else []
        errors: dict[int, str] = {i: str(p) for i, p in enumerate(prompts) if isinstance(p, Exception)}
        results: dict[int, dict[str, Any]] = {}
        live = [i for i in range(len(prompts)) if i not in errors]
        encoded = encode_rows(self.renderer, prompts, live, errors, "render")
        steps = [(self.renderer, prompts, self._activations, "render") if self.poolings else None,
                 (self.conversation, pairs, self._response_activations, "response render") if self.conversation else None,
                 (self.guard.renderer, prompts, self._guard_scores, "guard render") if self.guard else None,
                 (self.response_guard.renderer, pairs, self._response_guard_scores, "response guard render")
                 if self.response_guard else None]
        # a row with no reply (beside sources that give one) has no response columns: null, not an error
        answered = {i for i, r in enumerate(responses or ()) if r is not None}
        for renderer, items, step, what in filter(None, steps):
            live = [i for i in encoded if i not in errors and (items is not pairs or i in answered)]
            inputs = encoded if renderer is self.renderer else encode_rows(renderer, items, live, errors, what)
            self._run({i: inputs[i] for i in live if i in inputs}, step, results, errors)
        ok = [i for i in range(len(prompts)) if i not in errors]
        columns = {
            N_TOKENS: np.array([encoded[i].n_tokens for i in ok], dtype=np.int32),
            TRUNCATED: np.array([encoded[i].truncated for i in ok], dtype=bool),
            DROPPED_TURNS: np.array([encoded[i].dropped_turns for i in ok], dtype=np.int32),
            HISTORY_TURNS: np.array([len(as_chat(prompts[i]).history) for i in ok], dtype=np.int32),
            PERSONA: np.array([bool(as_chat(prompts[i]).system) for i in ok], dtype=bool),
        }
        for name in self.columns:
            columns[name] = self._to_host([results[i].get(name) for i in ok])
        for name in self.guard_columns:
            columns[name] = np.array([results[i].get(name, np.nan) for i in ok], dtype=np.float32)
        with_response = np.array([i in answered for i in ok], dtype=bool)
        return {"_index": ok, WITH_RESPONSE: with_response, **columns}, errors

    def _run(self, encoded: dict[int, Encoded], step: Callable, results: dict, errors: dict[int, str]) -> None:
        """Run `step` over length-sorted batches; a failing batch is split (`isolation.run_isolating`)."""
        keys = list(encoded)
        rows, tokens = forward_budget(self.extract, self.chat.device)
        packed = self.packed and step in (self._activations, self._response_activations)
        judge = {self._guard_scores: self.guard, self._response_guard_scores: self.response_guard}.get(step)
        if judge is not None and judge.schedules_itself:  # vLLM batches the whole shard itself
            batches = [list(range(len(keys)))] if keys else []
        else:
            batches = length_batches([len(encoded[k].ids) for k in keys], rows, tokens, packed)
        run_isolating([[keys[b] for b in batch] for batch in batches],
                      lambda rows: self._store(rows, step([encoded[r] for r in rows]), results),
                      errors, step.__name__.strip("_"), self.crashes)

    @staticmethod
    def _store(rows: list[int], columns: dict[str, np.ndarray], results: dict[int, dict[str, Any]]) -> None:
        for position, r in enumerate(rows):
            results.setdefault(r, {}).update({name: values[position] for name, values in columns.items()})

    def _activations(self, encoded: list[Encoded]) -> dict[str, np.ndarray]:
        return self._pooled(encoded, self.poolings)

    def _response_activations(self, encoded: list[Encoded]) -> dict[str, np.ndarray]:
        """The chat with its response: the conversation renderer's user span is the response."""
        return self._pooled(encoded, RESPONSE_POOLINGS)

    def _pooled(self, encoded: list[Encoded], poolings: Sequence[str]) -> dict[str, torch.Tensor]:
        """Pooled activations of one batch, left on the model's device in the storage dtype: the shard's rows
        are copied to the host once, at its end (`_to_host`), so a GPU never waits on a copy per batch. Token
        counts come from the CPU-side lengths (no device sync)."""
        started = time.perf_counter()
        build = Batch.pack if self.packed else Batch.build
        batch = build(encoded, self.chat.tokenizer.pad_token_id, self.chat.device)
        pooled = capture(self.chat.model, batch, self.layers, poolings)
        dtype = TORCH_STORE_DTYPES[self.extract.store_dtype]
        lengths = [len(e.ids) for e in encoded]
        self.stats.prompts += len(encoded)
        self.stats.tokens += sum(lengths)
        self.stats.padded_tokens += sum(lengths) if self.packed else max(lengths) * len(lengths)
        self.stats.seconds += time.perf_counter() - started
        return {feature_column(p, layer): v.to(dtype) for (p, layer), v in pooled.items()}

    def _to_host(self, rows: list[torch.Tensor | None]) -> np.ndarray:
        """One activation column of a shard as a [rows, hidden] array: the rows' device tensors stacked and
        copied in one transfer; a row that failed this step (None) is NaN. A shard where every prompt failed
        keeps the [0, hidden] shape."""
        hidden = int(self.chat.model.config.hidden_size)
        np_dtype = STORE_DTYPES[self.extract.store_dtype][0]
        present = [r for r in rows if r is not None]
        if not present:
            return np.full((len(rows), hidden), np.nan, np_dtype)
        stacked = torch.stack(present).cpu().numpy()
        if len(present) == len(rows):
            return stacked
        out = np.full((len(rows), hidden), np.nan, np_dtype)
        out[[i for i, r in enumerate(rows) if r is not None]] = stacked
        return out

    def _guard_scores(self, encoded: list[Encoded]) -> dict[str, np.ndarray]:
        return self.guard.score(encoded)

    def _response_guard_scores(self, encoded: list[Encoded]) -> dict[str, np.ndarray]:
        return renamed(self.response_guard.score(encoded), "response")


def guard_judges(spec: JobSpec) -> tuple[str, ...]:
    """What the guard judges: the prompt (`guard.enabled`) and the (prompt, response) turn (`judges_responses`)."""
    return (("prompt",) if spec.guard.enabled else ()) + (("response",) if spec.judges_responses else ())


def to_table(meta: pa.Table, columns: dict[str, Any], store_dtype: str,
             features: dict[str, tuple[str, int]], conversations: bool = False) -> pa.Table:
    """The public column layout: meta columns (as the dataset types them, extra labels nullable), n_tokens,
    truncated, dropped_turns (`conversations`: the dataset has conversation rows), act_* as fixed-size lists with their (pooling, layer) from `features` as field metadata, guard_*.
    Explicit types, so a shard where every prompt failed still matches the other parts' schema."""
    arrays: dict[str, pa.Array] = {name: meta.column(name) for name in meta.column_names if name != MESSAGES}
    arrays[N_TOKENS] = pa.array(columns[N_TOKENS], pa.int32())
    arrays[TRUNCATED] = pa.array(columns[TRUNCATED], pa.bool_())
    if MESSAGES in meta.column_names or conversations:
        arrays[DROPPED_TURNS] = pa.array(columns[DROPPED_TURNS], pa.int32())
        arrays[HISTORY_TURNS] = pa.array(columns[HISTORY_TURNS], pa.int32())
        arrays[PERSONA] = pa.array(columns[PERSONA], pa.bool_())
    np_dtype, arrow_dtype = STORE_DTYPES[store_dtype]
    unanswered = ~np.asarray(columns.get(WITH_RESPONSE, []), dtype=bool)
    no_response = pa.array(unanswered) if unanswered.any() else None  # all answered: no validity bitmap
    for name, values in columns.items():
        if name in features:
            values = np.asarray(values, dtype=np_dtype)
            on_response = no_response is not None and POOLINGS[features[name][0]].reads == "response"
            arrays[name] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), arrow_dtype), values.shape[1],
                                                             mask=no_response if on_response else None)
        elif name.startswith(GUARD_PREFIX):
            arrays[name] = pa.array(np.asarray(values, dtype=np.float32), pa.float32())
    return with_feature_metadata(pa.table(arrays), features)


class FeatureActor(ShardActor):
    """Ray Data UDF: one chat model (and guard) per actor; each call gets shard descriptors and writes their parts."""

    stage = "features"

    def load(self, spec: JobSpec) -> str:
        self.extractor = FeatureExtractor.from_spec(spec, self.device)
        self.extractor.crashes = self.crashes
        self.store_dtype = spec.extract.store_dtype
        return self.extractor.numerics

    def compute(self, rows: pa.Table) -> tuple[pa.Table, dict[int, str], int]:
        extra = [name for name in rows.column_names if name not in (*META_COLUMNS, *NOT_CARRIED)]
        responses = rows.column(RESPONSE).to_pylist() if RESPONSE in rows.column_names else None
        before = self.extractor.stats.tokens
        columns, errors = self.extractor.process(table_chats(rows), responses)
        ok = pa.array(columns.pop("_index"), pa.int64())
        part = to_table(rows.select([*META_COLUMNS, *extra]).take(ok), columns, self.store_dtype,
                        self.extractor.columns, conversations=MESSAGES in rows.column_names)
        return part, errors, self.extractor.stats.tokens - before


def preflight(spec: JobSpec) -> None:
    """Fail on the driver, in one line, for what would otherwise kill every actor at start-up: layers out of
    range, a template longer than max_length, guard labels that are not single tokens. Loads only configs
    and tokenizers."""
    from guardray.models import load_config, load_tokenizer

    resolve_layers(spec.extract.layers, int(load_config(spec.model).num_hidden_layers))
    chat_tokenizer = load_tokenizer(spec.model)
    chat_renderer(chat_tokenizer, spec.model)
    check_personas(chat_tokenizer, spec)
    if "response" in spec.extract.on:
        chat_conversation_renderer(chat_tokenizer, spec.model)
    if guard_judges(spec):
        tokenizer = chat_tokenizer if spec.guard_is_chat else load_tokenizer(spec.guard_model)
        preflight_guard(tokenizer, spec, guard_judges(spec))


def run_features(spec: JobSpec, inputs: dict[str, Location], out: Location) -> dict[str, Any]:
    """The features stage: verify what an earlier run left, run the missing row ranges, check exactly-once.

    It reads the responses stage's `dataset.parquet` (prompts plus responses) when `generate` is on, else the
    dataset stage's; shards and the exactly-once check are relative to that file.
    """
    preflight(spec)
    source = inputs["responses"] if "responses" in inputs else inputs["dataset"]
    dataset = source.join(DATASET_FILE)
    needed = [*DATASET_COLUMNS, *([RESPONSE] if "response" in spec.extract.on or spec.judges_responses else [])]
    schema = footer(dataset).schema.to_arrow_schema()
    require(schema, needed, stage="features", where=dataset.uri,
            written_by="responses" if "responses" in inputs else "dataset")
    summary = run_sharded(FEATURES, spec, source.join(DATASET_FILE), out)
    if MESSAGES in schema.names:
        summary["rows_that_lost_turns"] = rows_that_lost_turns(out)
    return summary


def rows_that_lost_turns(out: Location) -> int:
    """Conversation rows whose oldest turns were left out to fit max_length (counted in the scan)."""
    return parts_dataset(out).count_rows(filter=pc.field(DROPPED_TURNS) > 0)


#: The features stage as a sharded stage (guardray.sharded): its actor and its spec section.
FEATURES = ShardedStage("features", "extract", FeatureActor)
