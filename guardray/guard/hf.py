"""The transformers guard backend: one forward pass, label logits at each row's last token; optionally the
category continuations after it (`guardray.guard.category_scores`)."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from guardray.columns import GUARD_P_UNSAFE
from guardray.encoding import pad
from guardray.guard.category_scores import CategoryContinuations
from guardray.guard.labels import guard_columns, resolve_label_tokens
from guardray.guard.prompt import Judge, guard_renderer
from guardray.label_head import LabelHead, VocabHead
from guardray.models import LoadedModel, numerics
from guardray.rendering import ConversationRenderer, Encoded, PromptRenderer
from guardray.jobspec import GuardSpec


@dataclass
class HFGuard:
    """Scores prompts (or (prompt, response) pairs) with a transformers model.

    Every guard input starts with the same tokens (the moderation prompt up to the user's text: 206 tokens with
    SmolLM2 and the built-in prompt), so their key/value cache is computed once and each batch only runs the
    tokens after it (benchmarks/guard_prefix_cache.py). `prefix_cache=False` runs the whole sequence (the tests
    compare both). The label logits come from `head` in fp32 with the model's post-head transform, checked at
    creation against the model's own forward (tests/test_guard_precision.py).

    With `categories` set, `score` adds `guard_cat_<code>` columns. The category pass continues from the verdict
    pass's own right-padded batch cache, so it only runs the continuation tokens, for the rows of a batch
    together (in chunks within `category_tokens`). With `category_packing` (and an attention that takes a 4D
    mask: sdpa or eager, no sliding-window layers) the continuations' distinct prefixes, a tree (" unsafe",
    "\\n", "S", then "1".."9", then "0".."5" after "1"), are packed after each row's tokens and run in one
    forward, each attending to the row's tokens and its own ancestors: the cache is never expanded. Otherwise
    the rows run "unsafe\\nS" but its last token, their cache is expanded over the teacher-forced inputs
    (`_maximal_inputs`) and those run in one forward. Either way the tokens sit after the padding of the shorter
    rows, so the padding is masked and each token's position is given (its row's own length onwards), and the
    full-vocabulary fp32 log-probabilities (`vocab`) are taken once per distinct continuation prefix.
    """

    loaded: LoadedModel
    renderer: PromptRenderer | ConversationRenderer
    schedules_itself: ClassVar[bool] = False
    safe_id: int
    unsafe_id: int
    head: LabelHead
    prefix_cache: bool = True
    categories: CategoryContinuations | None = None
    vocab: VocabHead | None = None
    #: The category pass's memory bound: the rows of a batch run in chunks whose cache holds at most this many
    #: positions (rows × expansion × (longest row + continuation tokens); expansion 1 when packed, the number of
    #: teacher-forced inputs, 14 for SmolLM2's codes, when not), a row at least. 16384 positions are 0.7 GiB of
    #: fp32 keys and values for SmolLM2-135M (45 KiB a position), 2 GiB of bf16 for an 8B Llama (128 KiB).
    category_tokens: int = 16384
    #: Pack the continuations as a tree after each row (one forward, cache not expanded) where the attention
    #: takes a 4D mask; False: always the expanded cache (the tests compare the two).
    category_packing: bool = True
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
            columns.update(self.categories.columns(logprobs, columns[GUARD_P_UNSAFE].astype(np.float64)))
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
            cache = _broadcast(self._prefix_kv(), len(encoded))
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
        and the shared continuation. `cache`: the verdict pass's right-padded batch cache over these rows (left
        as it was: each chunk's rows are copied out of it); without it the rows' tokens run again from the
        prefix cache (the verdict pass's forward). `fast` is kept for callers: both paths read each distinct
        prefix once, so single-token remainders take one forward over one input either way."""
        if cache is None:
            _, cache = self._verdict(encoded, keep_cache=True)
        lengths = [len(e.ids) for e in encoded]
        if cache.get_seq_length() != max(lengths):
            raise ValueError(f"category_logprobs: a cache of {cache.get_seq_length()} positions for rows of at "
                             f"most {max(lengths)} tokens is not these rows' verdict cache")
        continuations = self.categories
        reads = _read_prefixes(continuations)
        packed = self.category_packing and self._takes_4d_mask(cache)
        if packed:
            nodes = sorted({read[:n] for read in reads for n in range(1, len(read) + 1)}, key=lambda n: (len(n), n))
            expand, extra = 1, len(nodes)
        else:  # single-token remainders: one input, the shared continuation's last token
            inputs = _maximal_inputs([(continuations.shared[-1],) + r[:-1] for r in continuations.remainders])[0]
            expand, extra = len(inputs), len(continuations.shared) - 1 + max(len(i) for i in inputs)
        out = []
        for rows in _chunks(lengths, expand, extra, self.category_tokens):
            part, own = _rows_cache(cache, rows, max(lengths[r] for r in rows)), [lengths[r] for r in rows]
            states = self._packed(part, own, nodes, reads) if packed else self._expanded(part, own, inputs, reads)
            out.append(self._remainder_logprobs(states, reads))
        return np.concatenate(out).astype(np.float64)

    def _takes_4d_mask(self, cache: Any) -> bool:
        """Whether the attention takes a custom 4D additive mask (flash attention does not) and no layer has a
        sliding window (a 4D mask is used as it is by every layer)."""
        attention = getattr(self.loaded.model.config, "_attn_implementation", None)
        return attention in ("sdpa", "eager") and not any(getattr(cache, "is_sliding", ()))

    def _packed(self, cache: Any, lengths: list[int], nodes: list[tuple[int, ...]],
                reads: list[tuple[int, ...]]) -> torch.Tensor:
        """(rows, reads, d): the final hidden states at `reads` with the continuation tree `nodes` (every prefix
        of a read, each once) packed after each row's own `lengths` tokens of its right-padded `cache`: a node
        attends to its row's tokens and to the nodes that are its prefixes, at position row length + depth."""
        model, device = self.loaded.model.base_model, self.loaded.device
        rows, width = len(lengths), cache.get_seq_length()
        own = torch.tensor(lengths, device=device)[:, None]
        seen = (torch.arange(width, device=device)[None, :] < own)[:, None, :].expand(rows, len(nodes), width)
        tree = torch.tensor([[node[:len(other)] == other for other in nodes] for node in nodes], device=device)
        allowed = torch.cat([seen, tree[None].expand(rows, -1, -1)], dim=2)[:, None]  # (rows, 1, nodes, width + nodes)
        dtype = self.loaded.model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
        depth = torch.tensor([len(node) - 1 for node in nodes], device=device)[None, :]
        ids = torch.tensor([[node[-1] for node in nodes]] * rows, device=device)
        hidden = model(input_ids=ids, attention_mask=mask, position_ids=own + depth, past_key_values=cache,
                       use_cache=True).last_hidden_state
        return hidden[:, [nodes.index(read) for read in reads]]

    def _expanded(self, cache: Any, lengths: list[int], inputs: list[tuple[int, ...]],
                  reads: list[tuple[int, ...]]) -> torch.Tensor:
        """(rows, reads, d): the final hidden states at `reads`, the rows' right-padded `cache` (`lengths`: each
        row's own tokens) having run the shared continuation but its last token and then been expanded over the
        teacher-forced `inputs` (each starting with that last token), which run in one forward."""
        model, device = self.loaded.model.base_model, self.loaded.device
        context = list(self.categories.shared[:-1])
        rows, width, expand = len(lengths), cache.get_seq_length(), len(inputs)
        own = torch.tensor(lengths, device=device)[:, None]
        mask = (torch.arange(width, device=device)[None, :] < own).long()  # (rows, width): the rows' own tokens
        if context:
            mask = torch.cat([mask, torch.ones((rows, len(context)), dtype=mask.dtype, device=device)], dim=1)
            cache = model(input_ids=torch.tensor([context] * rows, device=device), attention_mask=mask,
                          position_ids=own + torch.arange(len(context), device=device)[None, :],
                          past_key_values=cache, use_cache=True).past_key_values
        ids, tail = pad(inputs, self.loaded.tokenizer.pad_token_id or 0)  # right-padded, then one copy per row
        ids, tail, longest = ids.repeat(rows, 1).to(device), tail.repeat(rows, 1).to(device), ids.shape[1]
        if expand > 1:
            cache.batch_repeat_interleave(expand)  # row r's copies: sequences r * expand ... (r + 1) * expand - 1
        mask = torch.cat([mask.repeat_interleave(expand, dim=0), tail.to(mask.dtype)], dim=1)
        positions = (own + len(context)).repeat_interleave(expand, dim=0) + torch.arange(longest, device=device)
        hidden = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True).last_hidden_state.view(rows, expand, longest, -1)
        at = []  # (input, position) of each read: its tokens after the context, in the first input holding them
        for read in reads:
            forced = read[len(context):]
            at.append((next(n for n, i in enumerate(inputs) if i[:len(forced)] == forced), len(forced) - 1))
        return hidden[:, [n for n, _ in at], [j for _, j in at]]

    def _remainder_logprobs(self, states: torch.Tensor, reads: list[tuple[int, ...]]) -> np.ndarray:
        """(rows, reads, d) final hidden states after each of `reads` → (rows, continuations) summed fp32
        log-probabilities of the remainders: one full-vocabulary log-softmax per (row, read)."""
        shared, remainders = self.categories.shared, self.categories.remainders
        targets = sorted({t for r in remainders for t in r})
        column, at = {t: n for n, t in enumerate(targets)}, {read: n for n, read in enumerate(reads)}
        rows = states.shape[0]
        flat = states.reshape(rows * len(reads), -1)
        table = self.vocab.log_probs(flat, torch.tensor([targets] * len(flat))).view(rows, len(reads), -1).cpu()
        index = torch.tensor([at[shared + r[:j]] for r in remainders for j in range(len(r))])
        token = torch.tensor([column[t] for r in remainders for t in r])
        sequence = torch.tensor([k for k, r in enumerate(remainders) for _ in r])
        return torch.zeros(rows, len(remainders)).index_add_(1, sequence, table[:, index, token]).numpy()

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


def _broadcast(prefix: Any, rows: int) -> Any:
    """A key/value cache that shows the one-row `prefix` cache to `rows` rows without copying it: its layers
    hold expanded views, and the forward's own concatenation with the rows' new tokens is the only copy (a
    deepcopy and `batch_repeat_interleave` would make two more, per batch). The prefix cache is left as it was:
    `update` rebinds the copied layer's tensors, it never writes into them."""
    cache = copy.copy(prefix)
    cache.layers = [copy.copy(layer) for layer in prefix.layers]
    for layer in cache.layers:
        layer.keys = layer.keys.expand(rows, *layer.keys.shape[1:])
        layer.values = layer.values.expand(rows, *layer.values.shape[1:])
    return cache


def _read_prefixes(continuations: CategoryContinuations) -> list[tuple[int, ...]]:
    """The distinct token sequences after which a remainder token is read (shared + a remainder's first j
    tokens): 16 for SmolLM2's 60 continuations ("S", then "S1".."S9", then "S10".."S15")."""
    return sorted({continuations.shared + r[:j] for r in continuations.remainders for j in range(len(r))},
                  key=lambda read: (len(read), read))


def _chunks(lengths: list[int], expand: int, extra: int, budget: int) -> list[list[int]]:
    """Consecutive rows, each run within `budget` expanded positions: rows × `expand` × (the longest row's
    length + `extra` appended tokens); a row longer than that gets a chunk of its own."""
    chunks: list[list[int]] = []
    for row, length in enumerate(lengths):
        if chunks:
            widest = max(length, *(lengths[r] for r in chunks[-1])) + extra
            if (len(chunks[-1]) + 1) * expand * widest <= budget:
                chunks[-1].append(row)
                continue
        chunks.append([row])
    return chunks


def _rows_cache(cache: Any, rows: list[int], length: int) -> Any:
    """Rows `rows` of a right-padded batch cache, cut to `length` positions (the longest of them: padding that
    only other rows needed is dropped). The layers are copied before selecting, so the batch cache itself is left
    as it was."""
    own = copy.copy(cache)
    own.layers = [copy.copy(layer) for layer in cache.layers]
    own.batch_select_indices(torch.tensor(rows, device=cache.layers[0].keys.device))
    extra = own.get_seq_length() - length
    if extra:
        own.crop(-extra)  # a negative value drops that many trailing positions
    return own
