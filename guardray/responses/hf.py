"""The 'hf' backend of the responses stage: transformers `generate` on a Ray Data actor pool.

Each actor loads the chat model once, renders its shard's prompts exactly as the features stage does
(`chat_renderer`, same truncation) and answers them in length-sorted, left-padded batches with the KV cache on.
A batch that fails is split (`isolation.run_isolating`: halves when out of memory, else prompt by prompt), so a
failing prompt becomes an error row and never sinks its neighbours.

Sampling seeds each batch from `seed` and the batch's row ids, so a rerun with the same batching draws the same
tokens, but a row's draws depend on which rows share its batch (`batch_size`, the shard cut): sampled responses
are reproducible for a fixed setup, not across batch sizes. Greedy responses do not depend on the batching (up
to floating-point near-ties between padded and unpadded shapes).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import pyarrow as pa

from guardray.chats import Chat, table_chats
from guardray.columns import ID
from guardray.decoding import Generation, batch_seed, generation_config, response_table, split_stop, stop_ids
from guardray.encoding import encode_rows, length_batches, pad
from guardray.models import LoadedModel, load_model, numerics
from guardray.rendering import Encoded, PromptRenderer, chat_renderer
from guardray.isolation import CrashMemory, run_isolating
from guardray.sharded import ShardActor
from guardray.jobspec import GenerateSpec, JobSpec


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

        ids, mask = pad([e.ids for e in encoded], self.pad_id, left=True)
        width = ids.shape[1]
        if self.spec.temperature > 0:
            torch.manual_seed(batch_seed(self.spec.seed, keys))
        with torch.inference_mode():
            out = self.chat.model.generate(input_ids=ids.to(self.chat.device),
                                           attention_mask=mask.to(self.chat.device), generation_config=self.config)
        return [split_stop(row, self.stops, self.spec.max_new_tokens) for row in out[:, width:].tolist()]


@dataclass
class Responder:
    """Renders prompts and answers them in length-sorted batches; a failing batch is split (`run_isolating`)."""

    renderer: PromptRenderer
    generator: HFGenerator
    spec: GenerateSpec
    tokenizer: Any
    #: rows that broke the device on an earlier attempt (the actor shares its own, per shard)
    crashes: CrashMemory = field(default_factory=CrashMemory)

    @classmethod
    def from_spec(cls, spec: JobSpec, device: str | None = None) -> "Responder":
        chat = load_model(spec.model, device)  # `device`: the actor's (see FeatureExtractor.from_spec)
        return cls(chat_renderer(chat.tokenizer, chat.spec), HFGenerator(chat, spec.generate), spec.generate,
                   chat.tokenizer)

    @property
    def numerics(self) -> str:
        return json.dumps({"chat": self.generator.numerics()}, sort_keys=True)

    def process(self, prompts: Sequence[str | Chat | Exception], keys: Sequence[str]
                ) -> tuple[dict[int, Generation], dict[int, str]]:
        """Generations of the rows (prompts, or conversations: the reply to the last user turn) that succeeded
        and {index: reason} for the rest (a row whose messages break a rule included)."""
        errors: dict[int, str] = {i: str(p) for i, p in enumerate(prompts) if isinstance(p, Exception)}
        live = [i for i in range(len(prompts)) if i not in errors]
        encoded = encode_rows(self.renderer, prompts, live, errors, "render")
        rows = list(encoded)
        done: dict[int, Generation] = {}

        def generate(members: list[int]) -> None:
            answers = self.generator.generate([encoded[r] for r in members], [keys[r] for r in members])
            done.update(zip(members, answers))

        accelerator = "gpu" if self.generator.chat.device.type == "cuda" else "cpu"
        batches = length_batches([len(encoded[r].ids) for r in rows], self.spec.rows_per_batch(accelerator), None)
        run_isolating([[rows[b] for b in batch] for batch in batches], generate, errors, "generate", self.crashes)
        return done, errors


class ResponseActor(ShardActor):
    """The 'hf' backend's Ray Data actor: one chat model per actor, one part per shard."""

    stage = "responses"

    def load(self, spec: JobSpec) -> str:
        self.responder = Responder.from_spec(spec, self.device)
        self.responder.crashes = self.crashes
        return self.responder.numerics

    def compute(self, rows: pa.Table) -> tuple[pa.Table, dict[int, str], int]:
        keys = rows.column(ID).to_pylist()
        generations, errors = self.responder.process(table_chats(rows), keys)
        ok = sorted(generations)
        part = response_table(rows.column(ID).take(pa.array(ok, pa.int64())), [generations[i] for i in ok],
                              self.responder.tokenizer)
        return part, errors, sum(len(g.tokens) for g in generations.values())
