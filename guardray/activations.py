"""Residual-stream capture with forward hooks: several layers and poolings in ONE forward pass.

Layer L is the output of decoder block L (0-based; negative counts from the end). For every block but the
last this equals transformers' `hidden_states[L + 1]`; for the last block `hidden_states[-1]` has the final
norm applied, while we capture the block's raw output (before the norm).

When only activations are needed the forward pass stops after the deepest requested block (no upper blocks,
no lm_head), which saves most of the compute when probing middle layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from guardray.columns import EMA_HALF_LIFE_TOKENS, POOLINGS
from guardray.encoding import pad
from guardray.errors import InputError
from guardray.rendering import Encoded

#: Attribute paths of the decoder block list in common architectures (Llama/Mistral/Qwen/Gemma, GPT-2, NeoX...).
LAYER_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers",
               "model.decoder.layers", "transformer.layers")


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM, or an error naming the model class."""
    for path in LAYER_PATHS:
        node = model
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, torch.nn.ModuleList) and len(node) > 0:
            return node
    raise InputError(f"cannot find decoder blocks in {type(model).__name__} (looked for {', '.join(LAYER_PATHS)})")


def resolve_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """Non-negative, sorted, unique block indices; out-of-range layers name the model's layer count."""
    resolved = []
    for layer in layers:
        index = layer + num_layers if layer < 0 else layer
        if not 0 <= index < num_layers:
            raise InputError(f"extract.layers: layer {layer} out of range: model has {num_layers} layers")
        resolved.append(index)
    return sorted(set(resolved))


class _StopForward(Exception):
    """Raised by the deepest hook to end the forward pass early."""


@dataclass(frozen=True)
class Packing:
    """A batch's rows laid end to end in one sequence (no padding): `position_ids` restart at 0 for each row,
    from which transformers keeps the rows apart (flash-attention's varlen kernels; a block-diagonal mask for
    the others). `gather` maps each position of the right-padded layout to its packed position, so the pooling
    functions read every layer's output as if it had been padded."""

    input_ids: torch.Tensor  # [1, total tokens]
    position_ids: torch.Tensor  # [1, total tokens]
    gather: torch.Tensor  # [rows, longest row]: packed index of each padded position (pads read position 0)


@dataclass
class Batch:
    """A padded batch plus each row's user-text span (positions in the padded rows). The features stage and the
    guard pad on the right; serving pads on the left (`left`: generation continues every row from its end),
    which shifts each row's span by its padding. A packed batch (`pack`) runs as one unpadded sequence and keeps
    the right-padded layout for pooling."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    user_start: torch.Tensor
    user_end: torch.Tensor
    packing: Packing | None = None

    @classmethod
    def build(cls, encoded: Sequence[Encoded], pad_id: int, device: torch.device, left: bool = False) -> "Batch":
        ids, mask = pad([e.ids for e in encoded], pad_id, left)
        shift = ids.shape[1] - torch.tensor([len(e.ids) for e in encoded]) if left else 0
        starts = torch.tensor([e.user_start for e in encoded]) + shift
        ends = torch.tensor([e.user_end for e in encoded]) + shift
        return cls(ids.to(device), mask.to(device), starts.to(device), ends.to(device))

    @classmethod
    def pack(cls, encoded: Sequence[Encoded], pad_id: int, device: torch.device) -> "Batch":
        """The rows packed into one sequence (`Packing`), with the right-padded layout's mask and spans."""
        padded = cls.build(encoded, pad_id, torch.device("cpu"))
        lengths = torch.tensor([len(e.ids) for e in encoded])
        starts = torch.cumsum(lengths, 0) - lengths
        columns = torch.arange(padded.input_ids.shape[1])[None, :]
        gather = torch.where(padded.attention_mask.bool(), starts[:, None] + columns, torch.zeros((), dtype=torch.long))
        packing = Packing(torch.tensor([[t for e in encoded for t in e.ids]], dtype=torch.long, device=device),
                          torch.cat([torch.arange(n) for n in lengths.tolist()])[None, :].to(device),
                          gather.to(device))
        return cls(padded.input_ids.to(device), padded.attention_mask.to(device), padded.user_start.to(device),
                   padded.user_end.to(device), packing)


def _last(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The last non-pad position, with right padding (features) or left (serving)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None, :]
    return hidden[rows, (batch.attention_mask * positions).max(dim=1).values]


def _span_end(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The user span's last token; an empty span (an empty response) has none of its own: the one before it."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, (batch.user_end - 1).clamp(min=0)]


def _mean(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    weights = weights[:, :, None]  # where, not a product: a padded position's NaN (some SDPA kernels) stays out
    total = torch.where(weights, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)).sum(dim=1)
    return total / weights.float().sum(dim=1).clamp(min=1.0)


def _in_span(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[batch, seq] bool: the positions of each row's user span."""
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None, :]
    return (positions >= batch.user_start[:, None]) & (positions < batch.user_end[:, None])


def _span(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The mean over the user span (the user's text; the response on a conversation)."""
    return _mean(hidden, _in_span(hidden, batch))


def _span_or_before(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The user span's positions; a row whose span is empty gets the token before it instead (as `_span_end`),
    so a max or a normalised weighting always has one position to read."""
    inside = _in_span(hidden, batch)
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None, :]
    before = positions == (batch.user_end - 1).clamp(min=0)[:, None]
    return torch.where(inside.any(dim=1, keepdim=True), inside, before)


def _span_max(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The per-dimension max over the user span. Positions outside it (padding included) are replaced by -inf
    with `where` before the max, so neither their values nor a padded position's NaN can win; an empty span
    reads the token before it, never -inf."""
    inside = _span_or_before(hidden, batch)[:, :, None]
    return torch.where(inside, hidden, torch.full((), -torch.inf, dtype=hidden.dtype, device=hidden.device)).amax(1)


def _span_ema(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The exponentially weighted mean over the user span: a token k positions before the span's last one
    weighs 2^(-k / EMA_HALF_LIFE_TOKENS), and the weights sum to 1 over the span (an empty span: the token
    before it).

    Why for a linear probe: w·ema(h) + b = Σ_t a_t (w·h_t + b) with Σ_t a_t = 1, so the probe's score on this
    pooling IS the exponential moving average of its per-token scores, read at the span's last token: what a
    streaming monitor that smooths a per-token probe computes (two running sums, s ← βs + score, n ← βn + 1,
    β = 2^(-1/half-life), reported as s/n: the bias-corrected EMA). Unlike `mean` it weights the end of the turn,
    where a request is usually stated, while still reading all of it; unlike `max` it stays linear, so the score
    splits into per-token contributions. What it cannot do: the half-life is fixed (not learned, not per
    dimension), and a turn much longer than a few half-lives is in effect cut to its last few (64 tokens back
    weigh 1/16, 160 back 1/1024), however much intent its start holds."""
    inside = _span_or_before(hidden, batch)
    zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None, :]
    back = ((batch.user_end - 1).clamp(min=0)[:, None] - positions).clamp(min=0).to(hidden.dtype)
    weights = torch.where(inside, torch.exp2(-back / EMA_HALF_LIFE_TOKENS), zero)
    weights = weights / weights.sum(dim=1, keepdim=True)  # the span's last token weighs 1 before this: no 0/0
    # where, not a product alone: a padded position's NaN (some SDPA kernels) times a zero weight would be NaN
    return (torch.where(inside[:, :, None], hidden, zero) * weights[:, :, None]).sum(dim=1)


def _all(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The mean over every non-pad token."""
    return _mean(hidden, batch.attention_mask.bool())


#: The pooling math, by the positions a pooling reads (`columns.Pooling.positions`); which pooling name reads
#: which positions of which rendering is `columns.POOLINGS`.
POOL_FUNCTIONS: dict[str, Callable[[torch.Tensor, Batch], torch.Tensor]] = {
    "last": _last, "span": _span, "span_end": _span_end, "span_max": _span_max, "span_ema": _span_ema, "all": _all,
}
assert {p.positions for p in POOLINGS.values()} <= set(POOL_FUNCTIONS), "a pooling's positions have no function"


def pool(hidden: torch.Tensor, batch: Batch, pooling: str) -> torch.Tensor:
    """[batch, seq, dim] → [batch, dim] in float32, by `columns.POOLINGS[pooling]`: `last`: last non-pad token;
    `mean`: over the user's text; `max`: the per-dimension max over it; `ema`: its exponentially weighted mean,
    weighted towards its end (`_span_ema`); `mean_all`: over every non-pad token. On conversations
    (`ConversationRenderer`, whose user span is the response): `resp_last`: the response's last token;
    `resp_mean`: over the response's tokens."""
    if pooling not in POOLINGS:
        raise InputError(f"extract.poolings: unknown pooling '{pooling}'; known: {', '.join(POOLINGS)}")
    return POOL_FUNCTIONS[POOLINGS[pooling].positions](hidden.float(), batch)


@torch.inference_mode()
def capture(
    model: Any, batch: Batch, layers: Sequence[int], poolings: Sequence[str], stop_early: bool = True
) -> dict[tuple[str, int], torch.Tensor]:
    """{(pooling, layer): [batch, dim] float32} from one forward pass; `layers` must be resolved (>= 0)."""
    blocks = decoder_layers(model)
    deepest = max(layers)
    pooled: dict[tuple[str, int], torch.Tensor] = {}

    def hook_for(layer: int):
        def hook(module: Any, args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            if batch.packing is not None:  # [1, tokens, d] → the right-padded [rows, longest, d]
                hidden = hidden[0][batch.packing.gather]
            for pooling in poolings:
                pooled[(pooling, layer)] = pool(hidden, batch, pooling)
            if stop_early and layer == deepest:
                raise _StopForward

        return hook

    handles = [blocks[layer].register_forward_hook(hook_for(layer)) for layer in layers]
    inputs = ({"input_ids": batch.packing.input_ids, "position_ids": batch.packing.position_ids}
              if batch.packing is not None else
              {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return pooled


#: How far a packed forward may stray from the padded one before packing is refused (relative, float32 or not:
#: the check runs in the model's own dtype, where two kernels differ by rounding only).
PACKING_TOLERANCE = 2e-2


def packing_problem(model: Any, encoded: Sequence[Encoded], pad_id: int, device: torch.device) -> str | None:
    """Why packing cannot be used with this model, or None: the same rows, packed and padded, must give the same
    last-block activations. A model whose attention does not read `position_ids` as sequence boundaries (it would
    let rows attend to each other) fails here, once, at load time, instead of writing mixed activations."""
    layer = [len(decoder_layers(model)) - 1]
    padded = capture(model, Batch.build(encoded, pad_id, device), layer, ["last", "mean_all"])
    packed = capture(model, Batch.pack(encoded, pad_id, device), layer, ["last", "mean_all"])
    worst = max(float(((packed[k] - padded[k]).abs().max() / padded[k].abs().max().clamp(min=1e-6)))
                for k in padded)
    if worst > PACKING_TOLERANCE:
        return (f"packed rows differ from padded ones by {worst:.3g} (relative) with attention "
                f"'{model.config._attn_implementation}': its masks do not keep packed rows apart")
    return None
