"""Chat templates as renderers use them: a function of a whole `Chat` (and, for a finished turn, its response).

A `ChatTemplate` called with a text renders it as a lone prompt (the spec's system prompt, no history), the form
`PromptRenderer` measures the template with; its `.chat(Chat)` renders a conversation row. `PairTemplate` is the
same for a chat followed by a finished assistant turn. Templates that know nothing of conversations (raw text, a
test's lambda) are plain callables; a renderer refuses a conversation row for them.
"""
from __future__ import annotations

from typing import Any, Callable

from guardray.chats import Chat

#: The date given to templates that print one (Llama 3.1-3.3: `date_string`, else `strftime_now`), the
#: default those templates ship with: today's date would change the rendering, the guard's cached prefix and
#: the features mid-run, and differ between actors started on different days.
TEMPLATE_DATE = "26 Jul 2024"


class ChatTemplate:
    """Renders a `Chat` (`.chat`); called with a text, renders that text as a lone prompt."""

    def __init__(self, render_chat: Callable[[Chat], str]):
        self.chat = render_chat

    def __call__(self, text: str) -> str:
        return self.chat(Chat(text))

    def then(self, suffix: str) -> "ChatTemplate":
        """The same template with `suffix` after it (a guard's forced answer prefix)."""
        return ChatTemplate(lambda chat: self.chat(chat) + suffix)


class PairTemplate:
    """Renders a `Chat` and a response to it (`.chat(chat, response)`); called with (prompt, response), a lone
    prompt and its response."""

    def __init__(self, render_chat: Callable[[Chat, str], str]):
        self.chat = render_chat

    def __call__(self, prompt: str, response: str) -> str:
        return self.chat(Chat(prompt), response)

    def then(self, suffix: str) -> "PairTemplate":
        return PairTemplate(lambda chat, response: self.chat(chat, response) + suffix)


def apply_template(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool, **extra: Any) -> str:
    """The tokenizer's chat template over `messages` as text, with the fixed `date_string`."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         date_string=TEMPLATE_DATE, **extra)


def chat_template(tokenizer: Any, system_prompt: str | None) -> ChatTemplate:
    """The tokenizer's chat template over the chat's messages (`system_prompt` unless the row has its own
    system turn) with the generation prompt appended: what the chat model reads before it answers."""
    return ChatTemplate(lambda chat: apply_template(tokenizer, chat.messages(system_prompt), True))


def conversation_template(tokenizer: Any, system_prompt: str | None) -> PairTemplate:
    """The tokenizer's chat template over the chat's messages and the response as a finished assistant turn (no
    generation prompt): what the chat model has read by the end of its answer."""
    return PairTemplate(lambda chat, response: apply_template(
        tokenizer, chat.messages(system_prompt) + [{"role": "assistant", "content": response}], False))


_PERSONA = "\ue000GUARDRAY_PERSONA\ue000"


def persona_problem(tokenizer: Any, model_id: str) -> str | None:
    """Why rows with a persona (a system turn of their own) cannot be rendered by this chat template, or None.
    A template without a system role either folds the system text into the first user turn (Gemma: fine) or
    raises, or drops it silently; the last two would lose the persona, so they are refused before any actor
    starts."""
    try:
        rendered = apply_template(tokenizer, [{"role": "system", "content": _PERSONA},
                                              {"role": "user", "content": "hi"}], True)
    except Exception as e:  # noqa: BLE001 - the template's own refusal, as it words it
        return f"model.id: {model_id}'s chat template refuses a system turn ({type(e).__name__}: {e}); " \
               "drop the persona (system_prompt / system_column) or use a model whose template takes one"
    if _PERSONA not in rendered:
        return f"model.id: {model_id}'s chat template drops the system turn, so a persona (system_prompt / " \
               "system_column) would be lost: drop it or use a model whose template keeps one"
    return None
