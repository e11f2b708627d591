"""The features stage: Ray Data actors run the chat model (activation hooks) and the guard model.

Data flow: the dataset stage's parquet is cut into shards of `rows_per_shard` prompts with deterministic names;
a Ray Data dataset of the shards still missing goes through `map_batches(FeatureActor, ActorPoolStrategy)`;
each actor processes one shard per call and writes `parts/part-<shard>.parquet` itself, so results stream to
disk or GCS while the job runs and the driver only sees a one-row summary per shard (never activations).

Resume: a shard is finished when its part file exists (written in one go, last). A rerun after a crash lists
`parts/` and submits only the missing shards. Prompts that fail are written to `errors/` with the reason, so
every input id lands exactly once in parts ∪ errors; the stage checks that before it commits.

Chat model and guard share one actor (one model after the other on the same batch): with the guard being the
chat model itself it is one load, and otherwise both fit on one 80 GB GPU for 7–8B models, which keeps a
prompt's features and scores in one row written once. See README for when two actor stages would be better.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from guardray.activations import Batch, capture, resolve_layers
from guardray.datasets.assemble import DATASET_FILE
from guardray.errors import InputError
from guardray.guard import GUARD_BACKENDS, GUARD_COLUMNS, Guard, guard_renderer, resolve_label_tokens
from guardray.models import Encoded, LoadedModel, PromptRenderer, chat_renderer, load_model
from guardray.spec import ExtractSpec, JobSpec
from guardray.storage import Location, resolve

log = logging.getLogger(__name__)

PARTS_DIR, ERRORS_DIR = "parts", "errors"
META_COLUMNS = ["id", "harmful", "source", "split"]
STORE_DTYPES = {"float16": (np.float16, pa.float16()), "float32": (np.float32, pa.float32())}


def feature_column(pooling: str, layer: int) -> str:
    """Public column name of an activation: act_<pooling>_L<layer> with the resolved (non-negative) layer."""
    return f"act_{pooling}_L{layer}"


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted), each within `batch_size` rows and, when set,
    `max_tokens` padded tokens (a prompt longer than the budget gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        widest = max(lengths[i], max((lengths[j] for j in current), default=0))
        over_budget = max_tokens is not None and current and widest * (len(current) + 1) > max_tokens
        if current and (len(current) >= batch_size or over_budget):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@dataclass
class ExtractStats:
    prompts: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0


@dataclass
class FeatureExtractor:
    """Turns prompts into activation and guard columns. Used by the Ray actors, the tests and the benchmark."""

    chat: LoadedModel
    renderer: PromptRenderer
    layers: list[int]
    poolings: tuple[str, ...]
    extract: ExtractSpec
    guard: Guard | None = None
    stats: ExtractStats = field(default_factory=ExtractStats)

    @classmethod
    def from_spec(cls, spec: JobSpec) -> "FeatureExtractor":
        chat = load_model(spec.model)
        guard = GUARD_BACKENDS[spec.guard.backend](chat, spec) if spec.guard.enabled else None
        layers = resolve_layers(spec.extract.layers, chat.num_layers)
        return cls(chat, chat_renderer(chat), layers, spec.extract.poolings, spec.extract, guard)

    @property
    def columns(self) -> list[str]:
        return [feature_column(p, layer) for layer in self.layers for p in self.poolings]

    def process(self, prompts: Sequence[str]) -> tuple[dict[str, Any], dict[int, str]]:
        """Columns for every prompt that succeeded (in input order) and {index: reason} for the rest."""
        errors: dict[int, str] = {}
        results: dict[int, dict[str, Any]] = {}
        encoded = _encode(self.renderer, prompts, range(len(prompts)), errors, "render")
        self._run(encoded, self._activations, results, errors)
        if self.guard is not None:
            live = [i for i in encoded if i not in errors]
            self._run(_encode(self.guard.renderer, prompts, live, errors, "guard render"), self._guard_scores,
                      results, errors)
        ok = [i for i in range(len(prompts)) if i not in errors]
        columns = {
            "n_tokens": np.array([encoded[i].n_tokens for i in ok], dtype=np.int32),
            "truncated": np.array([encoded[i].truncated for i in ok], dtype=bool),
        }
        hidden = int(self.chat.model.config.hidden_size)
        for name in self.columns:  # a shard where every prompt failed keeps the [0, hidden] shape
            columns[name] = np.stack([results[i][name] for i in ok]) if ok else np.zeros((0, hidden))
        for name in GUARD_COLUMNS if self.guard is not None else ():
            columns[name] = np.array([results[i][name] for i in ok], dtype=np.float32)
        return {"_index": ok, **columns}, errors

    def _run(self, encoded: dict[int, Encoded], step: Callable, results: dict, errors: dict[int, str]) -> None:
        """Run `step` over length-sorted batches; a failing batch is retried prompt by prompt."""
        keys = list(encoded)
        batches = length_batches([len(encoded[k].ids) for k in keys], self.extract.batch_size,
                                 self.extract.max_tokens_per_batch)
        for batch in batches:
            rows = [keys[b] for b in batch]
            try:
                self._store(rows, step([encoded[r] for r in rows]), results)
            except Exception:  # noqa: BLE001 - isolate the prompt that fails
                for r in rows:
                    try:
                        self._store([r], step([encoded[r]]), results)
                    except Exception as e:  # noqa: BLE001
                        errors[r] = f"{step.__name__.strip('_')}: {type(e).__name__}: {' '.join(str(e).split())[:300]}"

    @staticmethod
    def _store(rows: list[int], columns: dict[str, np.ndarray], results: dict[int, dict[str, Any]]) -> None:
        for position, r in enumerate(rows):
            results.setdefault(r, {}).update({name: values[position] for name, values in columns.items()})

    def _activations(self, encoded: list[Encoded]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        batch = Batch.build(encoded, self.chat.tokenizer.pad_token_id, self.chat.device)
        pooled = capture(self.chat.model, batch, self.layers, self.poolings)
        np_dtype = STORE_DTYPES[self.extract.store_dtype][0]
        self.stats.prompts += len(encoded)
        self.stats.tokens += int(batch.attention_mask.sum())
        self.stats.padded_tokens += batch.attention_mask.numel()
        self.stats.seconds += time.perf_counter() - started
        return {feature_column(p, layer): v.cpu().numpy().astype(np_dtype) for (p, layer), v in pooled.items()}

    def _guard_scores(self, encoded: list[Encoded]) -> dict[str, np.ndarray]:
        return self.guard.score(encoded)


def _encode(renderer: PromptRenderer, prompts: Sequence[str], indices: Sequence[int], errors: dict[int, str],
            what: str) -> dict[int, Encoded]:
    """Render the given prompts; a prompt that cannot be rendered is recorded in `errors`, never dropped."""
    encoded: dict[int, Encoded] = {}
    for i in indices:
        try:
            encoded[i] = renderer.encode(prompts[i])
        except Exception as e:  # noqa: BLE001
            errors[i] = f"{what}: {type(e).__name__}: {e}"
    return encoded


def to_table(meta: dict[str, list[Any]], columns: dict[str, Any], store_dtype: str) -> pa.Table:
    """The public column layout: meta columns, n_tokens, truncated, act_* as fixed-size lists, guard_*."""
    # explicit types: an empty shard (every prompt failed) must still match the other parts' schema
    arrays: dict[str, pa.Array] = {
        name: pa.array(values, pa.string() if name in ("id", "source", "split") else pa.bool_())
        for name, values in meta.items()
    }
    arrays["n_tokens"] = pa.array(columns["n_tokens"], pa.int32())
    arrays["truncated"] = pa.array(columns["truncated"], pa.bool_())
    np_dtype, arrow_dtype = STORE_DTYPES[store_dtype]
    for name, values in columns.items():
        if name.startswith("act_"):
            values = np.asarray(values, dtype=np_dtype)
            arrays[name] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), arrow_dtype), values.shape[1])
        elif name.startswith("guard_"):
            arrays[name] = pa.array(np.asarray(values, dtype=np.float32), pa.float32())
    return pa.table(arrays)


class FeatureActor:
    """Ray Data UDF: one actor per model replica; each call gets one shard and writes its part file."""

    def __init__(self, spec_json: dict[str, Any], out_uri: str, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        spec = JobSpec.model_validate(spec_json)
        self.extractor = FeatureExtractor.from_spec(spec)
        self.out = resolve(out_uri)
        self.store_dtype = spec.extract.store_dtype
        from guardray.metrics import ActorMetrics

        self.metrics = ActorMetrics(model=spec.model.id)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        summaries = [self.process_shard(batch, k) for k in range(len(batch["shard"]))]
        return {key: [s[key] for s in summaries] for key in summaries[0]}

    def process_shard(self, batch: dict[str, np.ndarray], k: int) -> dict[str, Any]:
        shard = int(batch["shard"][k])
        extra = sorted(name for name in batch if name not in (*META_COLUMNS, "shard", "prompt"))
        meta = {name: list(batch[name][k]) for name in [*META_COLUMNS, *extra]}
        prompts = list(batch["prompt"][k])
        before = (self.extractor.stats.tokens, time.perf_counter())
        columns, errors = self.extractor.process(prompts)
        ok = columns.pop("_index")
        table = to_table({name: [values[i] for i in ok] for name, values in meta.items()}, columns, self.store_dtype)
        error_table = pa.table({
            "id": [meta["id"][i] for i in sorted(errors)],
            "source": [meta["source"][i] for i in sorted(errors)],
            "reason": [errors[i] for i in sorted(errors)],
        }, schema=pa.schema([("id", pa.string()), ("source", pa.string()), ("reason", pa.string())]))
        # errors first, part last: an existing part file means the whole shard (errors included) is done.
        self.out.join(ERRORS_DIR, f"errors-{shard:05d}.parquet").write_table(error_table)
        self.out.join(PARTS_DIR, f"part-{shard:05d}.parquet").write_table(table)
        tokens = self.extractor.stats.tokens - before[0]
        seconds = time.perf_counter() - before[1]
        self.metrics.record(len(prompts), tokens, seconds)
        return {"shard": shard, "rows": table.num_rows, "errors": len(errors), "tokens": tokens, "seconds": seconds}


def preflight(spec: JobSpec) -> None:
    """Fail on the driver, in one line, for what would otherwise kill every actor at start-up: layers out of
    range, a template longer than max_length, guard labels that are not single tokens. Loads only configs
    and tokenizers."""
    from guardray.models import load_config, load_tokenizer

    resolve_layers(spec.extract.layers, int(load_config(spec.model).num_hidden_layers))
    chat = LoadedModel(spec.model, None, load_tokenizer(spec.model), None)  # type: ignore[arg-type]
    chat_renderer(chat)
    if spec.guard.enabled:
        tokenizer = chat.tokenizer if spec.guard_is_chat else load_tokenizer(spec.guard_model)
        guard_renderer(tokenizer, spec.guard_model, spec.guard)
        resolve_label_tokens(tokenizer, spec.guard)


def shard_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def run_features(spec: JobSpec, inputs: dict[str, Location], out: Location) -> dict[str, Any]:
    """The features stage: submit the missing shards to the actor pool, then check exactly-once output."""
    preflight(spec)
    dataset = inputs["dataset"].join(DATASET_FILE).read_table().to_pandas()
    rows_per_shard = spec.extract.rows_per_shard
    label_columns = [c for c in dataset.columns if c not in ("id", "prompt", "source", "split")]
    n_shards = (len(dataset) + rows_per_shard - 1) // rows_per_shard
    done = set(out.join(PARTS_DIR).list(".parquet"))
    todo = []
    for shard in range(n_shards):
        if shard_name(shard) in done:
            continue
        chunk = dataset.iloc[shard * rows_per_shard : (shard + 1) * rows_per_shard]
        item = {"shard": shard, "id": list(chunk["id"]), "prompt": list(chunk["prompt"]),
                "source": list(chunk["source"]), "split": list(chunk["split"])}
        item.update({c: [bool(v) for v in chunk[c]] for c in label_columns})
        todo.append(item)
    log.info("features: %d prompts in %d shards, %d already done, %d to run",
             len(dataset), n_shards, n_shards - len(todo), len(todo))
    started = time.perf_counter()
    summaries = _run_actor_pool(spec, out, todo, n_shards) if todo else []
    wall = time.perf_counter() - started
    return _finish(spec, dataset, out, summaries, n_shards - len(todo), wall)


def _run_actor_pool(spec: JobSpec, out: Location, todo: list[dict[str, Any]], n_shards: int) -> list[dict[str, Any]]:
    import ray

    from guardray.metrics import StageProgress

    gpus = int(ray.cluster_resources().get("GPU", 0))
    extract = spec.extract
    actors = (gpus or 1) if extract.actors == "auto" else extract.actors
    actors = max(1, min(actors, len(todo)))
    resources = {"num_gpus": extract.num_gpus_per_actor} if gpus else {"num_cpus": extract.num_cpus_per_actor}
    threads = int(extract.num_cpus_per_actor) if not gpus else 1
    ds = ray.data.from_items(todo, override_num_blocks=len(todo))
    ds = ds.map_batches(
        FeatureActor,
        fn_constructor_kwargs={"spec_json": spec.model_dump(mode="json"), "out_uri": out.uri, "threads": threads},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        **resources,
    )
    progress = StageProgress("features", total=n_shards, done=n_shards - len(todo))
    summaries = []
    for summary in ds.iter_rows():  # one row per finished shard, as they finish
        summaries.append(summary)
        progress.advance()
    return summaries


def _finish(spec: JobSpec, dataset: Any, out: Location, summaries: list[dict[str, Any]], skipped: int,
            wall: float) -> dict[str, Any]:
    """Merge the per-shard error files and check that every input id appears exactly once."""
    parts = out.join(PARTS_DIR)
    ids = parts.read_table(columns=["id"]).column("id").to_pylist() if parts.list(".parquet") else []
    errors_dir = out.join(ERRORS_DIR)
    errors = errors_dir.read_table() if errors_dir.list(".parquet") else pa.table({"id": [], "source": [], "reason": []})
    out.join("errors.parquet").write_table(errors)
    seen = ids + errors.column("id").to_pylist()
    missing = set(dataset["id"]) - set(seen)
    if len(seen) != len(set(seen)) or missing:
        raise RuntimeError(f"features: exactly-once check failed: {len(seen) - len(set(seen))} repeated ids, "
                           f"{len(missing)} missing")
    processed = sum(s["rows"] + s["errors"] for s in summaries)
    tokens = sum(s["tokens"] for s in summaries)
    return {
        "rows": len(ids),
        "errors": errors.num_rows,
        "processed_this_run": processed,
        "shards_skipped": skipped,
        "tokens": tokens,
        "prompts_per_s": round(processed / wall, 2) if wall and processed else None,
        "tokens_per_s": round(tokens / wall, 1) if wall and tokens else None,
        "columns": _schema_names(parts) if ids else [],
    }


def _schema_names(parts: Location) -> list[str]:
    first = parts.join(parts.list(".parquet")[0])
    with first.fs.open_input_file(first.path) as f:
        return pq.ParquetFile(f).schema_arrow.names


def matrix(table: pa.Table, column: str) -> np.ndarray:
    """A fixed-size-list column as a float32 [rows, dim] array."""
    col = table.column(column).combine_chunks()
    dim = col.type.list_size
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)


def read_features(stage: Location, columns: list[str] | None = None) -> pa.Table:
    """All part files of a features stage as one table."""
    return stage.join(PARTS_DIR).read_table(columns=columns)
