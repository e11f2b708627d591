"""The chat-logs builder (jobs/data/build_chat_logs.py): seeded and byte-for-byte reproducible, every row a
well-formed conversation, the factors a report compares (history length, persona, label) all present, and the
committed jobs/data/chat_logs.jsonl exactly its default output, so the file cannot drift from its script."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from guardray.chats import SYSTEM, message_problem

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "jobs" / "data" / "build_chat_logs.py"
COMMITTED = ROOT / "jobs" / "data" / "chat_logs.jsonl"
HARMFUL_KINDS = {"advbench", "harmbench", "past_tense"}


def build(out: Path, *args: str) -> bytes:
    """Run the builder as a user would (its own process, so no state is shared between runs)."""
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], cwd=ROOT, check=True, timeout=120)
    return out.read_bytes()


@pytest.fixture(scope="module")
def default_output(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return build(tmp_path_factory.mktemp("chat_logs") / "default.jsonl")


@pytest.fixture(scope="module")
def rows(default_output: bytes) -> list[dict]:
    return [json.loads(line) for line in default_output.decode("utf-8").splitlines()]


def bucket(history_turns: int) -> str:
    return "0" if history_turns == 0 else "1-2" if history_turns <= 2 else "3+"


def test_same_seed_same_bytes_other_seed_differs(default_output: bytes, tmp_path: Path) -> None:
    assert build(tmp_path / "again.jsonl", "--seed", "0") == default_output
    assert build(tmp_path / "seed1.jsonl", "--seed", "1") != default_output


def test_committed_file_is_the_default_output(default_output: bytes) -> None:
    assert COMMITTED.read_bytes() == default_output, "rerun: python jobs/data/build_chat_logs.py"


def test_every_row_is_a_well_formed_conversation(rows: list[dict]) -> None:
    assert len(rows) == 576
    for i, row in enumerate(rows):
        assert set(row) == {"messages", "harmful", "kind", "persona", "history_turns"}, i
        messages = row["messages"]
        assert message_problem(messages) is None, (i, message_problem(messages))
        assert all(set(m) == {"role", "content"} for m in messages), i
        has_system = messages[0]["role"] == SYSTEM
        turns = messages[1:] if has_system else messages
        assert row["persona"] is has_system, i
        assert row["history_turns"] == len(turns) - 1, i
        assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2) + ["user"], i
        assert row["harmful"] is (row["kind"] in HARMFUL_KINDS), i
        assert all(len(m["content"]) <= 400 for m in turns), i


def test_rows_cover_what_a_report_compares(rows: list[dict]) -> None:
    cells = Counter((row["harmful"], bucket(row["history_turns"]), row["persona"]) for row in rows)
    # Each label meets each history bucket with and without a persona.
    assert set(cells) == {(h, b, p) for h in (False, True) for b in ("0", "1-2", "3+") for p in (False, True)}
    assert Counter(row["harmful"] for row in rows) == {True: 288, False: 288}
    assert Counter(row["kind"] for row in rows) == {"sharegpt": 288, "advbench": 96, "harmbench": 96, "past_tense": 96}
    assert Counter(bucket(row["history_turns"]) for row in rows) == {"0": 144, "1-2": 144, "3+": 288}
    assert len({row["messages"][-1]["content"] for row in rows}) == len(rows)  # no last turn twice
    personas = {row["messages"][0]["content"] for row in rows if row["persona"]}
    assert len(personas) == 8
