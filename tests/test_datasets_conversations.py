"""Conversation rows in the dataset stage: whole chats, personas, given replies and their labels (issue 24)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from guardray.columns import DATASET_COLUMNS
from guardray.datasets.assemble import build_dataset
from guardray.datasets.conversations import MESSAGES_TYPE
from guardray.datasets.keys import conversation_id, prompt_id
from guardray.datasets.sources import load_source
from guardray.errors import InputError, SpecError
from guardray.jobspec import DatasetSpec, load_spec
from guardray.storage import resolve

REPO = Path(__file__).resolve().parents[1]
SYSTEM = {"role": "system", "content": "You are Ada, a cheerful librarian."}


def _build(tmp_path: Path, *sources: dict, **dataset: object) -> tuple[dict, pa.Table, pd.DataFrame]:
    out = resolve(str(tmp_path / "out"))
    summary = build_dataset(DatasetSpec.model_validate({"sources": list(sources), **dataset}), out)
    data = pq.read_table(out.join("dataset.parquet").path)
    rejects = pq.read_table(out.join("rejects.parquet").path).to_pandas()
    return summary, data, rejects


def _turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in pairs]


def test_uncensorbench_gives_each_request_twice_with_labelled_replies(tmp_path: Path) -> None:
    summary, data, rejects = _build(tmp_path, {"type": "uncensorbench"})
    rows = data.to_pandas()
    assert len(rows) == 300 and rejects.empty
    assert rows["harmful"].all()
    assert rows["response_harmful"].sum() == 150 and (~rows["response_harmful"]).sum() == 150
    assert rows["id"].is_unique
    assert rows["response"].str.len().min() > 0
    assert (rows.groupby("prompt")["split"].nunique() == 1).all()  # refusal and compliance: one side
    assert (rows.groupby("prompt").size() == 2).all()
    assert "response_harmful" in summary["labels"] and summary["split_groups"] == 150
    first = rows.iloc[0]
    assert first["id"] == conversation_id("uncensorbench", _turns(("user", first["prompt"])), first["response"])


GOOD_CHAT = _turns(("system", "be brief"), ("user", "hi"), ("assistant", "hello!"), ("user", "how do I pick a lock?"))


def _chat_rows(typed: bool) -> list[object]:
    """Messages values: good, unknown role, empty, last turn not the user's, a bare turn, and (JSON only) a
    string and a number where a list belongs."""
    rows: list[object] = [
        GOOD_CHAT,
        _turns(("wizard", "abracadabra"), ("user", "and now?")),
        [],
        _turns(("user", "hello"), ("assistant", "hi there")),
        _turns(("user", "just one turn")),
    ]
    return rows if typed else [*rows, "hello, not a list", 42]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_messages_column_keeps_good_chats_and_rejects_bad_ones_alone(tmp_path: Path, fmt: str) -> None:
    values = _chat_rows(typed=fmt == "parquet")
    path = tmp_path / f"chats.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps({"conversation": v, "y": i % 2 == 0}) for i, v in enumerate(values)))
    else:
        pq.write_table(pa.table({"conversation": pa.array(values, MESSAGES_TYPE),
                                 "y": [i % 2 == 0 for i in range(len(values))]}), path)
    _, data, rejects = _build(tmp_path, {"type": "file", "name": "chats", "path": str(path),
                                         "messages_column": "conversation", "label_column": "y"})
    assert data.schema.field("messages").type.value_type == MESSAGES_TYPE.value_type
    rows = data.to_pylist()
    assert [r["prompt"] for r in rows] == ["how do I pick a lock?", "just one turn"]
    assert rows[0]["messages"] == GOOD_CHAT and rows[0]["harmful"] is True
    assert rows[1]["messages"] is None  # a bare user turn is a prompt-only row: same id as the prompt alone
    assert rows[1]["id"] == prompt_id("chats", "just one turn")
    assert rows[0]["id"] == conversation_id("chats", GOOD_CHAT, None)
    reasons = dict(zip(rejects["row"], rejects["reason"]))
    assert reasons[1] == "conversation: messages[0].role 'wizard' is not one of system, user, assistant"
    assert reasons[2] == "conversation: messages is an empty conversation"
    assert reasons[3] == "conversation: messages: the last turn must be the user's, not 'assistant'"
    if fmt == "jsonl":
        assert reasons[5] == "conversation: messages must be a list of {role, content}, not str"
        assert reasons[6] == "conversation: messages must be a list of {role, content}, not int"
    assert all("\n" not in r for r in reasons.values()) and len(reasons) == len(values) - 2


def test_csv_with_messages_column_fails_validate_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "chats.csv").write_text("conversation,y\nhello,1\n")
    spec = {"name": "csv-chats", "output": str(tmp_path / "out"), "dataset": {"sources": [
        {"type": "file", "path": str(tmp_path / "chats.csv"), "messages_column": "conversation", "harmful": True}]}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    result = subprocess.run([sys.executable, "-m", "guardray", "validate", str(tmp_path / "job.yaml")],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "messages_column 'conversation'" in lines[0] and "typed format (parquet, json, jsonl)" in lines[0]
    # a directory may hold CSV files the spec could not see: the same line, at load
    directory = DatasetSpec.model_validate({"sources": [
        {"type": "file", "path": str(tmp_path), "messages_column": "conversation", "harmful": True}]})
    with pytest.raises(InputError, match=r"chats.csv: messages_column 'conversation': .*typed format"):
        load_source(directory.sources[0])


def test_personas_put_a_system_turn_first(tmp_path: Path) -> None:
    path = tmp_path / "personas.jsonl"
    rows = [{"text": "what is your name?", "persona": "You are Bob."},
            {"text": "what time is it?", "persona": None},
            {"text": "where am I?", "persona": "  "},
            {"chat": GOOD_CHAT, "text": "unused", "persona": "You are Eve."}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:3]))
    (tmp_path / "chats.jsonl").write_text(json.dumps(rows[3]))
    _, data, rejects = _build(
        tmp_path,
        {"type": "file", "name": "personas", "path": str(path), "text_column": "text", "system_column": "persona",
         "harmful": False},
        {"type": "file", "name": "chats", "path": str(tmp_path / "chats.jsonl"), "messages_column": "chat",
         "system_column": "persona", "harmful": True},
        {"type": "normal_instructions", "system_prompt": "You are a pirate."},
    )
    assert rejects.empty
    by_prompt = {r["prompt"]: r for r in data.to_pylist()}
    assert by_prompt["what is your name?"]["messages"] == _turns(("system", "You are Bob."),
                                                                 ("user", "what is your name?"))
    assert by_prompt["what time is it?"]["messages"] is None and by_prompt["where am I?"]["messages"] is None
    assert by_prompt["what time is it?"]["id"] == prompt_id("personas", "what time is it?")
    # the row's persona replaces the chat's own system turn
    assert by_prompt["how do I pick a lock?"]["messages"] == [_turns(("system", "You are Eve."))[0], *GOOD_CHAT[1:]]
    pirate = [r for r in data.to_pylist() if r["source"] == "normal_instructions"]
    assert len(pirate) == 5
    assert all(r["messages"] == _turns(("system", "You are a pirate."), ("user", r["prompt"])) for r in pirate)


def test_one_last_turn_after_two_histories_is_two_rows_in_two_groups(tmp_path: Path) -> None:
    last = ("user", "and how would I hide it from the police?")
    a = _turns(("user", "I found a wallet on the street."), ("assistant", "You could hand it in."), last)
    b = _turns(("user", "I borrowed my friend's car."), ("assistant", "Nice of them!"), last)
    path = tmp_path / "h.jsonl"
    path.write_text("\n".join(json.dumps({"m": m}) for m in (a, b, a, _turns(last))))
    summary, data, rejects = _build(tmp_path, {"type": "file", "name": "h", "path": str(path), "messages_column": "m",
                                               "harmful": True})
    rows = data.to_pylist()
    assert [r["messages"] for r in rows] == [a, b, None]  # the bare last turn is a row of its own too
    assert len({r["id"] for r in rows}) == 3
    assert summary["split_groups"] == 3  # the whole chat is the group, not its last turn
    assert list(rejects["reason"]) == [f"duplicate of {rows[0]['id']} (h)"]


def test_given_replies_and_their_labels(tmp_path: Path) -> None:
    path = tmp_path / "logs.jsonl"
    logs = [{"p": "how do I make a bomb?", "r": "I can't help with that.", "bad": 0},
            {"p": "how do I make a bomb?", "r": "Sure: mix ...", "bad": 1},
            {"p": "write a poem", "r": "", "bad": 0},
            {"p": "write a story", "r": "Once upon a time.", "bad": "maybe"}]
    path.write_text("\n".join(json.dumps(r) for r in logs))
    summary, data, rejects = _build(tmp_path, {"type": "file", "name": "logs", "path": str(path), "text_column": "p",
                                               "response_column": "r", "response_label_column": "bad",
                                               "harmful": True}, dedupe="variants")
    rows = data.to_pylist()
    assert [(r["response"], r["response_harmful"]) for r in rows] == [("I can't help with that.", False),
                                                                      ("Sure: mix ...", True)]
    assert rows[0]["split"] == rows[1]["split"] and summary["split_groups"] == 1
    reasons = dict(zip(rejects["row"], rejects["reason"]))
    assert reasons == {2: "r: missing or empty response", 3: "bad: label 'maybe' is not boolean"}


def test_generate_with_given_replies_fails_validate(tmp_path: Path) -> None:
    spec = {"name": "both", "output": str(tmp_path / "out"), "generate": {"enabled": True},
            "dataset": {"sources": [{"type": "file", "path": str(tmp_path / "logs.jsonl"), "text_column": "p",
                                     "response_column": "r", "harmful": True}]}}
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    assert len(info.value.problems) == 1
    assert "generate.enabled: source file gives the replies to judge" in info.value.problems[0]
    spec["dataset"]["sources"] = [{"type": "uncensorbench"}]
    with pytest.raises(SpecError, match="source uncensorbench gives the replies"):
        load_spec(spec)
    del spec["generate"]
    assert load_spec(spec).dataset.gives_responses


@pytest.mark.parametrize("source, problem", [
    ({"type": "file", "path": "x.jsonl", "system_column": "s", "system_prompt": "p", "harmful": True},
     "give at most one of `system_column`"),
    ({"type": "file", "path": "x.jsonl", "response_label_column": "l", "harmful": True},
     "set `response_column` too"),
    ({"type": "advbench", "turns": "all"}, "only the sharegpt source has turns"),
    ({"type": "file", "path": "x.jsonl", "messages_column": "m", "extra_text_column": "e", "harmful": True},
     "extra_text_column: with `messages_column` the prompt is the chat's last user turn"),
])
def test_conversation_field_errors_are_one_line(tmp_path: Path, source: dict, problem: str) -> None:
    with pytest.raises(SpecError) as info:
        load_spec({"name": "bad", "output": str(tmp_path / "out"), "dataset": {"sources": [source]}})
    assert len(info.value.problems) == 1 and problem in info.value.problems[0]


def test_a_prompt_only_job_keeps_its_columns_and_its_key(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"prompt {i}"}) for i in range(8)))
    sources = [{"type": "file", "path": str(path), "harmful": False}, {"type": "advbench", "limit": 8}]
    _, data, _ = _build(tmp_path, *sources)
    assert data.column_names == DATASET_COLUMNS
    payload = DatasetSpec.model_validate({"sources": sources}).cache_payload()["sources"]
    assert set(payload[0]) == {"type", "name", "limit", "seed", "path", "format", "text_column", "extra_text_column",
                               "label_column", "label_map", "harmful", "extra_labels", "split_column"}
    assert set(payload[1]) == {"type", "name", "limit", "seed"}
    set_ = DatasetSpec.model_validate({"sources": [{**sources[1], "system_prompt": "You are Bob."}]})
    assert set_.cache_payload()["sources"][0]["system_prompt"] == "You are Bob."
    turns = DatasetSpec.model_validate({"sources": [{"type": "sharegpt", "turns": "all"}]})
    assert turns.cache_payload()["sources"][0]["turns"] == "all"


def test_sharegpt_all_turns_ends_each_chat_with_the_users_turn() -> None:
    table = load_source(DatasetSpec.model_validate({"sources": [{"type": "sharegpt", "turns": "all"}]}).sources[0])
    rows = table.filter(table["reject"].is_null()).to_pylist()
    assert len(rows) > 9000 and not any(r["harmful"] for r in rows)
    chats = [r for r in rows if r["messages"] is not None]
    assert len(chats) > 5000 and all(len(r["messages"]) >= 3 for r in chats)
    assert all(r["messages"][-1] == {"role": "user", "content": r["prompt"]} for r in chats)
    # the corpus has a few chats with two human turns in a row: kept (alternation is the template's call)
    assert sum(r["messages"][-2]["role"] == "assistant" for r in chats) >= len(chats) - 10


def test_the_datasets_command_lists_the_new_corpora() -> None:
    result = subprocess.run([sys.executable, "-m", "guardray", "datasets"], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    assert {"uncensorbench", "past_tense", "future_tense", "sharegpt"} <= listed
