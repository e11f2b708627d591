"""Per-category scores: after the verdict, force "unsafe\\nS" and read which category code comes next.

`guard_cat_<code> = P(code | unsafe) × P(unsafe)`, with P(unsafe) the two-way softmax of `guard_p_unsafe`, so the
category columns of a row sum to its `guard_p_unsafe`. It is the distribution of the FIRST category the guard
would list after "unsafe", not independent per-category probabilities: a response that is both violent and
hateful splits its mass between S1 and S10 rather than scoring high on both.

Codes are token SEQUENCES, and tokenizers split them differently (SmolLM2: "S", "1", "0"; Llama-3: "S", "10").
Each continuation is built from the unsafe label's own spelling (the decoded unsafe token, e.g. " unsafe") +
"\\n" + code + a terminator, tokenised as one string; the terminators (newline, comma, end of turn) make "S1"
and "S10" disjoint events: P(code) = Σ_terminators P(code + terminator), normalised over the codes. Only each
string's own tokenisation is counted (other segmentations of the same text are not).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from guardray.columns import guard_category_column
from guardray.errors import InputError
from guardray.rendering import common_prefix

#: Text that may follow a code in LlamaGuard's answer ("S1,S10" or "S1\n"); end of turn is added as token ids.
TERMINATOR_TEXTS = ("\n", ",")
#: End-of-turn tokens of common chat templates, used where the tokenizer has them (besides its eos token).
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


@dataclass(frozen=True)
class CategoryContinuations:
    """The token sequences whose probabilities give the category scores, split into the part every sequence
    shares (`shared`, starting with the unsafe label: computed once per row) and each sequence's `remainder`."""

    codes: tuple[str, ...]
    shared: tuple[int, ...]
    remainders: tuple[tuple[int, ...], ...]
    code_of: tuple[int, ...]  # sequence → index into `codes`

    @classmethod
    def build(cls, tokenizer: Any, unsafe_id: int, codes: Sequence[str]) -> "CategoryContinuations":
        label = tokenizer.decode([unsafe_id])
        enders = end_of_turn_ids(tokenizer)
        sequences, code_of = [], []
        for index, code in enumerate(codes):
            stem = label + "\n" + code
            ended = [_ids(tokenizer, stem + t) for t in TERMINATOR_TEXTS] + [_ids(tokenizer, stem) + [e] for e in enders]
            for ids in ended:
                if ids[0] != unsafe_id:
                    raise InputError(f"guard.categories: {stem!r} does not tokenise to the unsafe label's token "
                                     f"{unsafe_id} first ({ids[:3]}...): this tokenizer cannot force the categories")
                sequences.append(tuple(ids))
                code_of.append(index)
        _check_disjoint(sequences)
        n = common_prefix(sequences)
        if n == len(min(sequences, key=len)):
            n -= 1  # every sequence keeps a remainder of at least one token
        return cls(tuple(codes), sequences[0][:n], tuple(s[n:] for s in sequences), tuple(code_of))

    @property
    def single_token(self) -> bool:
        """Whether every remainder is one token: then one next-token distribution gives all of them."""
        return all(len(r) == 1 for r in self.remainders)

    def columns(self, logprobs: np.ndarray, p_unsafe: np.ndarray) -> dict[str, np.ndarray]:
        """(rows, sequences) log-probabilities of the remainders → {guard_cat_<code>: P(code | unsafe) ×
        P(unsafe)}."""
        per_code = np.stack([_logsumexp(logprobs[:, [s for s, c in enumerate(self.code_of) if c == i]])
                             for i in range(len(self.codes))], axis=1)
        conditional = np.exp(per_code - _logsumexp(per_code)[:, None])
        return {guard_category_column(code): (conditional[:, i] * p_unsafe).astype(np.float32)
                for i, code in enumerate(self.codes)}


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The eos token and the known end-of-turn tokens this tokenizer has, each once."""
    vocab = tokenizer.get_vocab()
    found = [tokenizer.eos_token_id] + [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    return list(dict.fromkeys(i for i in found if i is not None))


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_disjoint(sequences: list[tuple[int, ...]]) -> None:
    """No sequence may be another's prefix (or equal it): their probabilities are summed as disjoint events."""
    ordered = sorted(set(sequences))
    if len(ordered) != len(sequences) or any(b[:len(a)] == a for a, b in zip(ordered, ordered[1:])):
        raise InputError("guard.categories: two category continuations overlap in this tokenizer (a code and its "
                         "terminator merge into one token); the category scores would double count")


def _logsumexp(values: np.ndarray) -> np.ndarray:
    """log Σ exp over the last axis, stable for very negative values."""
    top = values.max(axis=-1)
    return top + np.log(np.exp(values - top[..., None]).sum(axis=-1))
