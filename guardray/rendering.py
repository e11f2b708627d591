"""Rendering prompts into token ids with the model's own chat template.

Rendering keeps the chat template intact under truncation: the template is rendered around a sentinel, split
into the part before and after the user's text, and only the user's tokens are cut. So every rendered prompt
ends with the template's generation prompt and the `last` token means the same thing for every prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from guardray.errors import InputError
from guardray.spec import ModelSpec

_SENTINEL = "\ue000GUARDRAY_USER_TEXT\ue000"


@dataclass(frozen=True)
class Encoded:
    """A rendered prompt: token ids, where the user's text sits in them, and whether it was cut."""

    ids: list[int]
    user_start: int
    user_end: int
    n_tokens: int  # length before truncation
    truncated: bool


class PromptRenderer:
    """Renders prompts with a template around the user's text and truncates only the user's text.

    `template(text)` returns the full rendered string for one user text; it is called once with a sentinel to
    learn the text before and after the user's text (which must appear exactly once).
    """

    def __init__(self, tokenizer: Any, template: Callable[[str], str], max_length: int, truncation: str = "middle"):
        rendered = template(_SENTINEL)
        if rendered.count(_SENTINEL) != 1:
            raise InputError("the chat template must contain the user's text exactly once")
        before, after = rendered.split(_SENTINEL)
        self.tokenizer = tokenizer
        self.prefix = self._encode(before, first=True)
        self.suffix = self._encode(after, first=False)
        self.max_length = max_length
        self.truncation = truncation
        budget = max_length - len(self.prefix) - len(self.suffix)
        if budget < 2:
            raise InputError(
                f"max_length {max_length} leaves no room for the prompt: the template alone takes "
                f"{len(self.prefix) + len(self.suffix)} tokens"
            )
        self.user_budget = budget

    def _encode(self, text: str, first: bool) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        bos = self.tokenizer.bos_token_id
        # Raw text (no template) still gets the BOS a tokenizer would add; templates carry their own.
        if first and not text and bos is not None and getattr(self.tokenizer, "add_bos_token", False):
            ids = [bos]
        return ids

    def encode(self, text: str) -> Encoded:
        user = self._encode(text, first=False)
        n_tokens = len(self.prefix) + len(user) + len(self.suffix)
        truncated = len(user) > self.user_budget
        if truncated:
            if self.truncation == "middle":
                head = (self.user_budget + 1) // 2
                user = user[:head] + user[len(user) - (self.user_budget - head):]
            else:
                user = user[: self.user_budget]
        start = len(self.prefix)
        return Encoded(self.prefix + user + self.suffix, start, start + len(user), n_tokens, truncated)


def chat_template(tokenizer: Any, system_prompt: str | None) -> Callable[[str], str]:
    """The tokenizer's chat template with the text as the user turn and the generation prompt appended."""

    def render(text: str) -> str:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": text}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    return render


def chat_renderer(tokenizer: Any, spec: ModelSpec) -> PromptRenderer:
    """The renderer for activation capture, per the model spec (chat template or raw text)."""
    if spec.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(f"model.chat_template: {spec.id} has no chat template; set chat_template: false")
        template = chat_template(tokenizer, spec.system_prompt)
    else:
        template = lambda text: text  # noqa: E731
    return PromptRenderer(tokenizer, template, spec.max_length, spec.truncation)
