"""The transformers guard backend: one forward pass, label logits at each row's last token; optionally the
category continuations after it (`guardray.guard.categories`)."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from guardray.guard.categories import CategoryContinuations
from guardray.guard.labels import guard_columns, resolve_label_tokens
from guardray.guard.prompt import Judge, guard_renderer
from guardray.label_head import LabelHead, VocabHead
from guardray.models import LoadedModel, numerics
from guardray.rendering import ConversationRenderer, Encoded, PromptRenderer
from guardray.spec import GuardSpec


@dataclass
class HFGuard:
    """Scores prompts (or (prompt, response) pairs) with a transformers model.

    Every guard input starts with the same tokens (the moderation prompt up to the user's text: 206 tokens with
    SmolLM2 and the built-in prompt), so their key/value cache is computed once and each batch only runs the
    tokens after it (benchmarks/guard_prefix_cache.py). `prefix_cache=False` runs the whole sequence (the tests
    compare both). The label logits come from `head` in fp32 with the model's post-head transform, checked at
    creation against the model's own forward (tests/test_guard_precision.py).

    With `categories` set, `score` adds `guard_cat_<code>` columns: per row, the rendering plus the shared part
    of the category continuations ("unsafe\\nS") runs once on top of the prefix cache, that cache is expanded
    over the continuations, and their remainders are teacher-forced in one forward (full-vocabulary fp32
    log-probabilities from `vocab`). The category pass continues from the verdict pass's own cache (each row's
    slice), so it only runs the continuation tokens.
    """

    loaded: LoadedModel
    renderer: PromptRenderer | ConversationRenderer
    safe_id: int
    unsafe_id: int
    head: LabelHead
    prefix_cache: bool = True
    categories: CategoryContinuations | None = None
    vocab: VocabHead | None = None
    _prefix: Any = None

    #: The start-up check of the label head runs the first tokens of this input's rendering (one short forward).
    CHECK_PROMPT, CHECK_RESPONSE, CHECK_TOKENS = "How do I bake bread?", "Mix flour, water and yeast.", 32

    @classmethod
    def create(cls, loaded: LoadedModel, spec: GuardSpec, judge: Judge = "prompt") -> "HFGuard":
        safe_id, unsafe_id = resolve_label_tokens(loaded.tokenizer, spec)
        renderer = guard_renderer(loaded.tokenizer, loaded.spec, spec, judge)
        head = LabelHead.create(loaded.model, (safe_id, unsafe_id))
        check = (renderer.encode(cls.CHECK_PROMPT) if isinstance(renderer, PromptRenderer)
                 else renderer.encode(cls.CHECK_PROMPT, cls.CHECK_RESPONSE))
        head.verify(loaded.model, check.ids[: cls.CHECK_TOKENS])
        categories = vocab = None
        if spec.categories:
            categories = CategoryContinuations.build(loaded.tokenizer, unsafe_id, spec.category_codes)
            vocab = VocabHead.create(loaded.model)
        return cls(loaded, renderer, safe_id, unsafe_id, head, categories=categories, vocab=vocab)

    def judging(self, renderer: PromptRenderer | ConversationRenderer) -> "HFGuard":
        """The same model and heads judging what `renderer` renders (one loaded guard serves prompts and
        responses); the shared-prefix cache is the new renderer's own."""
        return dataclasses.replace(self, renderer=renderer, _prefix=None)

    @torch.inference_mode()
    def score(self, encoded: Sequence[Encoded]) -> dict[str, np.ndarray]:
        columns, cache = self._verdict(encoded, keep_cache=self.categories is not None)
        if self.categories is not None:
            logprobs = self.category_logprobs(encoded, cache=cache)
            columns.update(self.categories.columns(logprobs, columns["guard_p_unsafe"].astype(np.float64)))
        return columns

    def _verdict(self, encoded: Sequence[Encoded], keep_cache: bool = False) -> tuple[dict[str, np.ndarray], Any]:
        """The verdict columns, and (`keep_cache`) the batch's key/value cache, which the category pass
        continues from instead of running each row's tokens again."""
        from guardray.activations import Batch

        shared = len(self.renderer.prefix) if self.prefix_cache else 0
        tails = [Encoded(e.ids[shared:], 0, 0, e.n_tokens, e.truncated) for e in encoded]
        batch = Batch.build(tails, self.loaded.tokenizer.pad_token_id, self.loaded.device)
        kwargs: dict[str, Any] = {"attention_mask": batch.attention_mask, "use_cache": keep_cache}
        if shared:
            cache = copy.deepcopy(self._prefix_kv())
            cache.batch_repeat_interleave(len(encoded))
            prefix_mask = torch.ones((len(encoded), shared), dtype=batch.attention_mask.dtype,
                                     device=batch.attention_mask.device)
            kwargs = {"attention_mask": torch.cat([prefix_mask, batch.attention_mask], dim=1),
                      "past_key_values": cache, "use_cache": True}
        output = self.loaded.model.base_model(input_ids=batch.input_ids, **kwargs)
        last = batch.attention_mask.sum(dim=1) - 1
        hidden = output.last_hidden_state[torch.arange(len(encoded), device=last.device), last]
        logits = self.head(hidden).cpu().numpy()
        return guard_columns(logits[:, 0], logits[:, 1]), output.past_key_values if keep_cache else None

    @torch.inference_mode()
    def category_logprobs(self, encoded: Sequence[Encoded], fast: bool = True, cache: Any = None) -> np.ndarray:
        """(rows, continuations) fp32 log-probabilities of each continuation's remainder given the row's input
        and the shared continuation. `fast=False` takes the multi-token path even where every remainder is one
        token (the tests compare the two). `cache`: the verdict pass's right-padded batch cache over these
        rows (each row's own slice is taken); without it each row's tokens run again from the prefix cache."""
        return np.stack([self._row_logprobs(e.ids, fast, _row_cache(cache, row, len(e.ids)) if cache is not None else None)
                         for row, e in enumerate(encoded)]).astype(np.float64)

    def _row_logprobs(self, ids: list[int], fast: bool, row_cache: Any = None) -> np.ndarray:
        continuations, model = self.categories, self.loaded.model.base_model
        device = self.loaded.device
        shared = len(self.renderer.prefix) if self.prefix_cache else 0
        if row_cache is not None:
            cache, context = row_cache, list(continuations.shared[:-1])
        else:
            cache = copy.deepcopy(self._prefix_kv()) if shared else None
            context = ids[shared:] + list(continuations.shared[:-1])
        cache = model(input_ids=torch.tensor([context], device=device), past_key_values=cache,
                      use_cache=True).past_key_values
        length = len(ids) + len(continuations.shared) - 1
        if fast and continuations.single_token:
            hidden = model(input_ids=torch.tensor([[continuations.shared[-1]]], device=device), past_key_values=cache,
                           use_cache=True).last_hidden_state[0]
            targets = torch.tensor([[r[0] for r in continuations.remainders]])
            return self.vocab.log_probs(hidden, targets)[0].cpu().numpy()
        return self._teacher_forced(cache, length)

    def _teacher_forced(self, cache: Any, length: int) -> np.ndarray:
        """The remainders' summed log-probabilities, all continuations in one forward over the expanded cache."""
        remainders = self.categories.remainders
        inputs, row_of = _maximal_inputs([(self.categories.shared[-1],) + r[:-1] for r in remainders])
        width = max(len(i) for i in inputs)
        pad = self.loaded.tokenizer.pad_token_id or 0
        ids = torch.tensor([list(i) + [pad] * (width - len(i)) for i in inputs], device=self.loaded.device)
        mask = torch.tensor([[1] * (length + len(i)) + [0] * (width - len(i)) for i in inputs],
                            device=self.loaded.device)
        cache.batch_repeat_interleave(len(inputs))
        hidden = self.loaded.model.base_model(input_ids=ids, attention_mask=mask, past_key_values=cache,
                                              use_cache=True).last_hidden_state
        sequence = torch.tensor([k for k, r in enumerate(remainders) for _ in r])
        rows = torch.tensor([row_of[k] for k in sequence.tolist()], device=hidden.device)
        positions = torch.tensor([j for r in remainders for j in range(len(r))], device=hidden.device)
        targets = torch.tensor([[t] for r in remainders for t in r])
        logprobs = self.vocab.log_probs(hidden[rows, positions], targets)[:, 0].cpu()
        return torch.zeros(len(remainders)).index_add_(0, sequence, logprobs).numpy()

    def numerics(self) -> dict[str, str]:
        """What the guard computes with, recorded in every part beside the chat model's numerics."""
        return {"backend": "hf", **numerics(self.loaded)}

    def _prefix_kv(self) -> Any:
        """The key/value cache of the shared prefix for one row, computed on first use."""
        if self._prefix is None:
            ids = torch.tensor([self.renderer.prefix], device=self.loaded.device)
            self._prefix = self.loaded.model.base_model(input_ids=ids, use_cache=True).past_key_values
        return self._prefix


def _maximal_inputs(inputs: list[tuple[int, ...]]) -> tuple[list[tuple[int, ...]], list[int]]:
    """The teacher-forced inputs that are no other input's prefix, and for each input the row that holds it.

    A causal model's hidden states over an input's positions are the same in any longer input starting with
    it, so "S1" + terminator and "S10" + terminator share the row "S", "1", "0": with SmolLM2's digit-split
    codes 56 continuations need 14 rows over the expanded cache, not 56.
    """
    rows: list[tuple[int, ...]] = []
    for candidate in sorted(set(inputs), key=len, reverse=True):
        if not any(row[:len(candidate)] == candidate for row in rows):
            rows.append(candidate)
    return rows, [next(n for n, row in enumerate(rows) if row[:len(i)] == i) for i in inputs]


def _row_cache(cache: Any, row: int, length: int) -> Any:
    """Row `row` of a right-padded batch cache, cut to its own `length` tokens (its padding dropped). The
    layers are copied before selecting, so the batch cache itself is left as it was."""
    own = copy.copy(cache)
    own.layers = [copy.copy(layer) for layer in cache.layers]
    own.batch_select_indices(torch.tensor([row], device=cache.layers[0].keys.device))
    extra = own.get_seq_length() - length
    if extra:
        own.crop(-extra)  # a negative value drops that many trailing positions
    return own
