"""Conversation rows of the dataset stage: the whole chat (`messages`), a given reply and its label.

A source that carries conversations (`SourceBase.conversational`: `messages_column`, `system_column`,
`system_prompt`, `response_column`, or a corpus with replies or whole chats) adds three columns to its prompt
table: `messages` (`MESSAGES_TYPE`), `response` (string) and `response_harmful` (bool). `prompt` becomes the last
user turn. What a well-formed conversation is, is `guardray.chats`' rule (`message_problem`): a row that breaks
it is a reject with that reason, its neighbours kept.

`messages` is null when the chat is the prompt alone (no system turn, no earlier turn): such a row renders,
hashes and dedupes exactly as a prompt-only row, so a one-turn conversation and the same prompt from a packaged
corpus are the same row. Otherwise it holds the whole chat, the system turn first (the row's `system_column`
value, else the source's `system_prompt`, else the messages' own system turn) and the last user turn last.

Rows given as Python objects (the packaged corpora) and list-valued file columns go through Python per row (the
rule is per row, and such sources are small); a persona on a prompt-only source stays columnar.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from guardray.chats import SYSTEM, USER, Chat, chat_from_messages, message_problem
from guardray.columns import HARMFUL, MESSAGES, PROMPT, RESPONSE, RESPONSE_HARMFUL
from guardray.datasets.readers import RawTable, is_text
from guardray.datasets.tables import (AnyArray, decode_text, join_problems, not_a_string, parse_labels, prefixed,
                                      text_table)
from guardray.jobspec import LabelledColumns

TURN_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES_TYPE = pa.list_(TURN_TYPE)
#: The columns a conversation source adds, with their types (null where a row or source has no such value).
CONVERSATION_COLUMNS: dict[str, pa.DataType] = {MESSAGES: MESSAGES_TYPE, RESPONSE: pa.string(),
                                                RESPONSE_HARMFUL: pa.bool_()}
_NO_TEXT = pa.scalar(None, pa.string())


def stored_messages(chat: Chat | None) -> list[dict[str, str]] | None:
    """What the `messages` column holds for `chat`: None when it is the prompt alone."""
    return chat.messages() if chat is not None and chat.has_context else None


def parse_chats(values: Sequence[Any], systems: Sequence[str | None],
                field: str) -> tuple[list[Chat | None], list[str | None]]:
    """Per row, its `Chat` (the persona in `systems` replacing the messages' own system turn) or None and the
    one-line reason (`field: ...`) it is not a conversation."""
    chats: list[Chat | None] = []
    problems: list[str | None] = []
    for value, system in zip(values, systems):
        problem = "missing conversation" if value is None else message_problem(value)
        chats.append(None if problem else chat_from_messages(value, system))
        problems.append(f"{field}: {problem}" if problem else None)
    return chats, problems


def persona_messages(prompts: AnyArray, systems: AnyArray) -> pa.Array:
    """[system, user] per row where both are text (a blank persona is none), else null; built with Arrow kernels,
    so a large prompt-only source with a persona never becomes Python objects."""
    prompts = _one_chunk(prompts).cast(pa.string())
    systems = _one_chunk(systems).cast(pa.string())
    blank = pc.fill_null(pc.utf8_is_space(systems), False)
    systems = pc.if_else(pc.or_(blank, pc.equal(pc.binary_length(systems), 0)), _NO_TEXT, systems)
    n = len(prompts)
    order = np.stack([np.arange(n), np.arange(n) + n], axis=1).ravel()
    contents = pa.concat_arrays([systems, prompts]).take(pa.array(order))
    roles = pa.array([SYSTEM, USER]).take(pa.array(np.tile([0, 1], n)))
    turns = pa.StructArray.from_arrays([roles, contents], fields=list(TURN_TYPE))
    offsets = pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32))
    valid = pc.and_(pc.is_valid(prompts), pc.is_valid(systems))
    return pa.ListArray.from_arrays(offsets, turns, type=MESSAGES_TYPE, mask=pc.invert(valid))


def _one_chunk(values: AnyArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


# ------------------------------------------------------------------------------------------ file sources


def with_conversations(table: pa.Table, raw: RawTable, spec: LabelledColumns) -> pa.Table:
    """A file or Hugging Face source's prompt table (`tables.source_table`) with the conversation columns: with
    `messages_column` the prompt becomes each chat's last user turn; every problem becomes the row's reject."""
    n, kinds = table.num_rows, raw.kinds or {}
    problems: list[AnyArray | None] = [table["reject"]]
    systems = _systems(raw.table, spec, kinds, problems)
    if spec.messages_column:
        chats, chat_problems = parse_chats(_raw_messages(raw.table[spec.messages_column],
                                                         kinds.get(spec.messages_column)),
                                           systems.to_pylist(), spec.messages_column)
        problems.append(pa.array(chat_problems, pa.string()))
        table = table.set_column(table.column_names.index(PROMPT), PROMPT,
                                 pa.array([c.prompt if c else None for c in chats], pa.string()))
        messages: pa.Array = pa.array([stored_messages(c) for c in chats], MESSAGES_TYPE)
    else:
        messages = persona_messages(table[PROMPT], systems)
    columns = {MESSAGES: messages, RESPONSE: pa.nulls(n, pa.string()), RESPONSE_HARMFUL: pa.nulls(n, pa.bool_())}
    if spec.response_column:
        columns[RESPONSE] = _responses(raw.table, spec.response_column, kinds, problems)
    if spec.response_label_column:
        values, problem = decode_text(raw.table[spec.response_label_column], spec.response_label_column)
        columns[RESPONSE_HARMFUL], label_problem = parse_labels(values, spec.label_map)
        problems += [problem, prefixed(spec.response_label_column, label_problem)]
    table = table.set_column(table.column_names.index("reject"), "reject", join_problems(problems, n))
    for name, values in columns.items():
        table = table.append_column(name, values)
    return table


def _systems(table: pa.Table, spec: LabelledColumns, kinds: dict[str, pa.Array],
             problems: list[AnyArray | None]) -> pa.Array:
    """Each row's persona: the `system_column` value (null or blank: none), else the source's `system_prompt`."""
    n = table.num_rows
    if not spec.system_column:
        return pa.repeat(pa.scalar(spec.system_prompt, pa.string()), n)
    values = _text_values(table, spec.system_column, "system prompt", kinds, problems)
    blank = pc.fill_null(pc.or_(pc.equal(pc.binary_length(values), 0), pc.utf8_is_space(values)), True)
    return _one_chunk(pc.if_else(blank, _NO_TEXT, values))


def _responses(table: pa.Table, column: str, kinds: dict[str, pa.Array],
               problems: list[AnyArray | None]) -> AnyArray:
    """The given replies; a row whose reply is missing, blank or not text is a reject."""
    values = _text_values(table, column, "response", kinds, problems)
    blank = pc.fill_null(pc.or_(pc.equal(pc.binary_length(values), 0), pc.utf8_is_space(values)), True)
    problems.append(pc.if_else(blank, pa.scalar(f"{column}: missing or empty response"), _NO_TEXT))
    return values


def _text_values(table: pa.Table, column: str, what: str, kinds: dict[str, pa.Array],
                 problems: list[AnyArray | None]) -> AnyArray:
    """A text column decoded (its bad cells and non-string values become problems); a column that is not
    text at all is null in every row, each rejected naming its type."""
    values = table[column]
    if not is_text(values.type):
        problems.append(pa.repeat(pa.scalar(f"{column}: {what} is {values.type}, not a string"), len(values)))
        return pa.nulls(len(values), pa.string())
    text, problem = decode_text(values, column)
    problems += [problem, not_a_string(kinds.get(column), column, what)]
    return text


def _raw_messages(values: AnyArray, kinds: pa.Array | None) -> list[Any]:
    """Each row's messages as Python values. In a JSON column of mixed types (`RawTable.kinds`) the rows that
    were not strings were written back as JSON text: they are parsed again, so a list is a list and a number
    is a number (and rejected as one)."""
    rows = values.to_pylist()
    if kinds is None:
        return rows
    return [json.loads(v) if k is not None and v is not None else v for v, k in zip(rows, kinds.to_pylist())]


# ------------------------------------------------------------------------------------- packaged corpora


def records_table(rows: list[dict[str, Any]], harmful: bool, system: str | None) -> pa.Table:
    """A packaged corpus's rows (each a `prompt`, or whole `messages`; optionally a `response` and its
    `response_harmful`) as a prompt table with the conversation columns, under the source's persona `system`."""
    n = len(rows)
    chat_problems: list[str | None] = [None] * n
    if rows and MESSAGES in rows[0]:
        chats, chat_problems = parse_chats([r[MESSAGES] for r in rows], [system] * n, MESSAGES)
        table = text_table([c.prompt if c else None for c in chats], harmful)
        messages: pa.Array = pa.array([stored_messages(c) for c in chats], MESSAGES_TYPE)
    else:
        table = text_table([r[PROMPT] for r in rows], harmful)
        messages = persona_messages(table[PROMPT], pa.repeat(pa.scalar(system, pa.string()), n))
    responses = [r.get(RESPONSE) for r in rows]
    has_replies = bool(rows) and RESPONSE in rows[0]
    reply_problems = [None if not has_replies or (isinstance(v, str) and v.strip()) else "missing or empty response"
                      for v in responses]
    reject = join_problems([table["reject"], pa.array(chat_problems, pa.string()),
                            pa.array(reply_problems, pa.string())], n)
    return pa.table({
        PROMPT: table[PROMPT], HARMFUL: table[HARMFUL], "reject": reject, MESSAGES: messages,
        RESPONSE: pa.array(responses if has_replies else [None] * n, pa.string()),
        RESPONSE_HARMFUL: pa.array([r.get(RESPONSE_HARMFUL) for r in rows], pa.bool_()),
    })
