"""What a well-formed conversation is (`guardray.chats`): the rules dataset rows and served requests share."""
from __future__ import annotations

import pytest

from guardray.chats import Chat, chat_from_messages, chats_from_rows, message_problem, request_chat
from guardray.errors import InputError

TALK = [{"role": "system", "content": "You are Maris."}, {"role": "user", "content": "Hello."},
        {"role": "assistant", "content": "Ahoy."}, {"role": "user", "content": "Which stars?"}]


@pytest.mark.parametrize("messages, problem", [
    ("hello", "messages must be a list of {role, content}, not str"),
    ([], "messages is an empty conversation"),
    (["hi"], "messages[0] must be a {role, content} mapping, not str"),
    ([{"role": "wizard", "content": "x"}], "messages[0].role 'wizard' is not one of system, user, assistant"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
     "messages[1]: a system turn may only come first"),
    ([{"role": "user", "content": "  "}], "messages[0].content must be non-empty text"),
    ([{"role": "user", "content": None}], "messages[0].content must be non-empty text"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
     "messages: the last turn must be the user's, not 'assistant'"),
])
def test_each_broken_rule_has_its_one_line_reason(messages: object, problem: str) -> None:
    assert message_problem(messages) == problem


def test_a_conversation_becomes_its_last_turn_history_and_persona() -> None:
    chat = chat_from_messages(TALK)
    assert chat == Chat("Which stars?", (("user", "Hello."), ("assistant", "Ahoy.")), "You are Maris.")
    assert chat.messages("spec default") == TALK  # the row's own persona wins over the spec's
    assert Chat("hi").messages("spec default")[0] == {"role": "system", "content": "spec default"}
    assert Chat("hi", system="").messages("spec default") == [{"role": "user", "content": "hi"}]
    assert chat_from_messages(TALK, system="Be brief.").system == "Be brief."  # a source's persona replaces it
    assert not Chat("hi").has_context and chat.has_context and Chat("hi", system="x").has_context


def test_dropping_the_oldest_turns_keeps_the_history_opening_with_a_user_turn() -> None:
    chat = Chat("q3", (("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")), "P")
    assert chat.without_oldest_turns(1).history == (("user", "q2"), ("assistant", "a2"))  # a1 goes with q1
    assert chat.without_oldest_turns(4) == Chat("q3", (), "P")  # the persona and the last turn always stay


def test_rows_with_broken_messages_get_their_error_in_place_and_neighbours_are_kept() -> None:
    rows = chats_from_rows(["a", "b", "c"], [None, [{"role": "bot", "content": "x"}], TALK])
    assert rows[0] == Chat("a") and isinstance(rows[1], InputError) and rows[2] == chat_from_messages(TALK)


def test_a_served_request_is_read_with_the_same_rules() -> None:
    assert request_chat(tuple((m["role"], m["content"]) for m in TALK)) == chat_from_messages(TALK)
    with pytest.raises(InputError, match="last message must be the user's"):
        request_chat((("user", "a"), ("assistant", "b")))
    with pytest.raises(InputError, match="system message may only come first"):
        request_chat((("user", "a"), ("system", "b"), ("user", "c")))
