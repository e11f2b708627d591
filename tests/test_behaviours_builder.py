"""The persona-experiment builder (jobs/data/build_behaviours.py): seeded and byte-for-byte reproducible, every
row a well-formed persona conversation, each behaviour's classes balanced, the three variations holding what
they claim (one character in fixed_character, one history in fixed_history, both unseen in varied), no request
text twice, and the committed jobs/data/behaviours_*.jsonl exactly its default output."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from guardray.chats import ASSISTANT, SYSTEM, USER, message_problem

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "jobs" / "data" / "build_behaviours.py"
VARIATIONS = ("varied", "fixed_character", "fixed_history")
BEHAVIOURS = ("politics", "expert_opinion", "meet_in_person")
PER_CLASS = {"varied": 60, "fixed_character": 30, "fixed_history": 30}
KEYS = {"messages", "variation", "behaviour", "asks_behaviour", *BEHAVIOURS, "character", "history_turns"}


def build(out_dir: Path, *args: str) -> dict[str, bytes]:
    """Run the builder as a user would (its own process, so no state is shared between runs)."""
    subprocess.run([sys.executable, str(SCRIPT), "--out-dir", str(out_dir), *args], cwd=ROOT, check=True,
                   timeout=120)
    return {v: (out_dir / f"behaviours_{v}.jsonl").read_bytes() for v in VARIATIONS}


@pytest.fixture(scope="module")
def default_output(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return build(tmp_path_factory.mktemp("behaviours"))


@pytest.fixture(scope="module")
def files(default_output: dict[str, bytes]) -> dict[str, list[dict]]:
    return {v: [json.loads(line) for line in data.decode("utf-8").splitlines()] for v, data in default_output.items()}


def history(row: dict) -> tuple[tuple[str, str], ...]:
    """The turns between the system turn and the last user turn."""
    return tuple((m["role"], m["content"]) for m in row["messages"][1:-1])


def test_same_seed_same_bytes_other_seed_differs(default_output: dict[str, bytes], tmp_path: Path) -> None:
    assert build(tmp_path / "again") == default_output
    other = build(tmp_path / "seed1", "--seed", "1")
    assert all(other[v] != default_output[v] for v in VARIATIONS)


def test_committed_files_are_the_default_output(default_output: dict[str, bytes]) -> None:
    for variation, data in default_output.items():
        committed = ROOT / "jobs" / "data" / f"behaviours_{variation}.jsonl"
        assert committed.read_bytes() == data, "rerun: python jobs/data/build_behaviours.py"


def test_every_row_is_a_well_formed_persona_conversation(files: dict[str, list[dict]]) -> None:
    for variation, rows in files.items():
        for i, row in enumerate(rows):
            where = (variation, i)
            assert set(row) == KEYS and row["variation"] == variation, where
            messages = row["messages"]
            assert message_problem(messages) is None, (where, message_problem(messages))
            assert messages[0]["role"] == SYSTEM and row["character"] in messages[0]["content"], where
            turns = [m["role"] for m in messages[1:]]
            assert turns == [USER, ASSISTANT] * (len(turns) // 2) + [USER], where
            assert row["history_turns"] == len(turns) - 1 and row["history_turns"] in (0, 2, 4), where


def test_labels_follow_the_behaviour_and_classes_balance(files: dict[str, list[dict]]) -> None:
    for variation, rows in files.items():
        for row in rows:
            expected = {b: row["asks_behaviour"] and b == row["behaviour"] for b in BEHAVIOURS}
            assert {b: row[b] for b in BEHAVIOURS} == expected, row
        n = PER_CLASS[variation]
        cells = Counter((row["behaviour"], row["asks_behaviour"]) for row in rows)
        assert cells == {(b, asks): n for b in BEHAVIOURS for asks in (True, False)}, variation
        # Each behaviour's target: n positives against everything else (its harmless rows and the other areas).
        assert all(sum(row[b] for row in rows) == n for b in BEHAVIOURS), variation


def test_history_lengths_are_crossed_with_the_classes(files: dict[str, list[dict]]) -> None:
    for variation in ("varied", "fixed_character"):
        cells = Counter((r["behaviour"], r["asks_behaviour"], r["history_turns"]) for r in files[variation])
        n = PER_CLASS[variation] // 3
        assert cells == {(b, a, h): n for b in BEHAVIOURS for a in (True, False) for h in (0, 2, 4)}, variation


def test_variations_hold_what_they_claim(files: dict[str, list[dict]]) -> None:
    varied, fixed_character, fixed_history = (files[v] for v in VARIATIONS)
    # fixed_character: one system prompt, one name, never a character of `varied`; histories still vary.
    assert len({r["messages"][0]["content"] for r in fixed_character}) == 1
    assert len({r["character"] for r in fixed_character}) == 1
    assert not {r["character"] for r in fixed_character} & {r["character"] for r in varied}
    assert len({history(r) for r in fixed_character}) > 50
    # fixed_history: one history (two exchanges) in every row, never a history of `varied`; characters vary.
    histories = {history(r) for r in fixed_history}
    assert len(histories) == 1 and len(next(iter(histories))) == 4
    assert not histories & {history(r) for r in varied}
    assert len({r["character"] for r in fixed_history}) > 10
    # varied: everything varies.
    assert len({r["character"] for r in varied}) > 10 and len({history(r) for r in varied}) > 100


def test_no_request_occurs_twice(files: dict[str, list[dict]]) -> None:
    """A held-out row's request is never a training row's request in another context."""
    def request(row: dict) -> str:
        text = row["messages"][-1]["content"]
        greeting = f"Hey {row['character']}! "
        return text[len(greeting):] if text.startswith(greeting) else text

    requests = [request(r) for rows in files.values() for r in rows]
    assert len(set(requests)) == len(requests) == 720
