"""Guard scoring: the logits of the `safe` and `unsafe` tokens at the first generated position.

LlamaGuard models use their tokenizer's own chat template (which carries the policy); any other instruct model
gets a built-in LlamaGuard-3-style moderation prompt as the user turn. The configured forced prefix is appended
(LlamaGuard 3 emits "\\n\\n" before its verdict), so the next token is the verdict. One forward pass, no
sampling: `guard_score = logit(unsafe) - logit(safe)` is the log-odds of unsafe over safe.

A guard judges prompts (judge="prompt") or responses (judge="response": the (prompt, response) pair as
LlamaGuard moderates an agent turn, the user turn being context). With `guard.categories`, it also reads the
distribution of the first listed category code (`guardray.guard.category_scores`).

Modules: `prompt` (moderation prompts and renderers), `labels` (label tokens, output columns), `category_scores`,
`hf` (transformers backend), `vllm` (vLLM backend, optional extra), `backends` (the registry and preflight).
Backends share the renderer, the label tokens and the output columns: each has `.renderer` and
`.score(encoded) -> columns`.
"""
from guardray.guard.backends import GUARD_BACKENDS, Guard, build_guards, preflight_guard
from guardray.guard.category_scores import CategoryContinuations
from guardray.guard.hf import HFGuard
from guardray.guard.labels import category_columns, guard_columns, output_columns, renamed, resolve_label_tokens
from guardray.guard.prompt import (AGENT_MODERATION_PROMPT, HAZARDS, JUDGES, MODERATION_PROMPT, Judge, guard_renderer,
                                   hazards, is_llamaguard)

__all__ = ["AGENT_MODERATION_PROMPT", "GUARD_BACKENDS",
           "HAZARDS", "JUDGES", "build_guards", "MODERATION_PROMPT", "CategoryContinuations", "Guard", "HFGuard", "Judge",
           "category_columns", "guard_columns", "guard_renderer", "hazards", "is_llamaguard",
           "output_columns", "preflight_guard", "renamed", "resolve_label_tokens"]
