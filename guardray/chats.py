"""A conversation as guardray reads it: the last user turn, the turns before it, and the row's own system turn.

Dataset rows, the features stage, the guard, the responses stage and the server all pass conversations around as
`Chat` values, built from OpenAI-style `{role, content}` messages by `chat_from_messages`, which is also the one
place that says what a well-formed conversation is (a dataset row that breaks a rule is a reject with its
reason; a served request, a 400). A prompt-only row is a `Chat` with no history and no system turn of its own,
and renders exactly as before conversations existed.

Every text of a `Chat` is user data: renderers read the history and the row's own system turn as plain text,
never as template tokens, just like the prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from guardray.columns import MESSAGES, PROMPT
from guardray.errors import InputError

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
ROLES = (SYSTEM, USER, ASSISTANT)

Turn = tuple[str, str]  # (role, content), role "user" or "assistant"


@dataclass(frozen=True)
class Chat:
    """What a chat model is asked: `prompt` (the last user turn) after `history`, under `system`.

    `system` None means the model's own `system_prompt` (the spec's); a string overrides it for this row (a
    persona), "" means no system turn at all.
    """

    prompt: str
    history: tuple[Turn, ...] = ()
    system: str | None = None

    @property
    def has_context(self) -> bool:
        """Whether anything but the prompt is the row's own (then it cannot share a prompt-only rendering)."""
        return bool(self.history) or self.system is not None

    def without_oldest_turns(self, count: int) -> "Chat":
        """The chat with its `count` oldest history turns gone, and any assistant turns that would then open
        the history (templates that insist on user/assistant alternation refuse a history opening with one)."""
        history = self.history[count:]
        while history and history[0][0] == ASSISTANT and self.history and self.history[0][0] == USER:
            history = history[1:]
        return Chat(self.prompt, history, self.system)

    def messages(self, default_system: str | None = None) -> list[dict[str, str]]:
        """The OpenAI-style messages a chat template renders (`default_system` unless the row has its own)."""
        system = default_system if self.system is None else self.system
        head = [{"role": SYSTEM, "content": system}] if system else []
        return head + [{"role": r, "content": c} for r, c in self.history] + [{"role": USER, "content": self.prompt}]


def as_chat(item: "str | Chat") -> Chat:
    """A plain prompt as a `Chat` with no context; a `Chat` as it is."""
    return item if isinstance(item, Chat) else Chat(item)


def message_problem(messages: Any) -> str | None:
    """Why `messages` is not a conversation guardray can read (one line), or None when it is.

    Rules: a non-empty list of `{role, content}` mappings; roles among system/user/assistant; a system turn only
    first; every content a non-empty string; the last turn the user's. Whether the roles alternate as a given
    model's template wants is the template's call, at rendering.
    """
    if not isinstance(messages, (list, tuple)):
        return f"messages must be a list of {{role, content}}, not {type(messages).__name__}"
    if not messages:
        return "messages is an empty conversation"
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            return f"messages[{i}] must be a {{role, content}} mapping, not {type(message).__name__}"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}"
        if role == SYSTEM and i != 0:
            return f"messages[{i}]: a system turn may only come first"
        if not isinstance(content, str) or not content.strip():
            return f"messages[{i}].content must be non-empty text"
    if messages[-1]["role"] != USER:
        return f"messages: the last turn must be the user's, not {messages[-1]['role']!r}"
    return None


def chat_from_messages(messages: Sequence[Mapping[str, Any]], system: str | None = None) -> Chat:
    """The `Chat` of well-formed messages (`message_problem`, else InputError). `system` (a persona from the
    row or the source) replaces the messages' own system turn, or adds one."""
    problem = message_problem(messages)
    if problem:
        raise InputError(problem)
    own = messages[0]["content"] if messages[0]["role"] == SYSTEM else None
    turns = [(m["role"], m["content"]) for m in messages if m["role"] != SYSTEM]
    return Chat(turns[-1][1], tuple(turns[:-1]), system if system is not None else own)


def table_chats(rows: Any) -> list[Chat | InputError]:
    """`chats_from_rows` over a dataset table's `prompt` and (when it has one) `messages` columns."""
    messages = rows.column(MESSAGES).to_pylist() if MESSAGES in rows.column_names else None
    return chats_from_rows(rows.column(PROMPT).to_pylist(), messages)


def chats_from_rows(prompts: Sequence[str], messages: Iterable[Any] | None) -> list[Chat | InputError]:
    """One `Chat` per row: from its `messages` when it has them (a dataset's `messages` column), else its prompt
    alone. A row whose messages break a rule gets its InputError in its place."""
    if messages is None:
        return [Chat(p) for p in prompts]
    out: list[Chat | InputError] = []
    for prompt, row in zip(prompts, messages):
        if row is None:
            out.append(Chat(prompt))
            continue
        try:
            out.append(chat_from_messages(row))
        except InputError as e:
            out.append(e)
    return out


def request_chat(messages: Sequence[tuple[str, str]]) -> Chat:
    """The `Chat` of a served request's (role, content) messages: a system turn only first, the last turn the
    user's (InputError otherwise; the API has checked the roles). Empty texts are the template's business."""
    if not messages or messages[-1][0] != USER:
        raise InputError(f"messages: the last message must be the user's, not {messages[-1][0] if messages else None!r}")
    own = messages[0][1] if messages[0][0] == SYSTEM else None
    turns = messages[1:] if own is not None else messages
    if any(role == SYSTEM for role, _ in turns):
        raise InputError("messages: a system message may only come first")
    return Chat(turns[-1][1], tuple((role, content) for role, content in turns[:-1]), own)
