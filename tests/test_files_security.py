"""Untrusted data files and what the dataset stage writes (issue 22): non-string prompts, header-only and
all-rejected sources, symlink loops, the counts table, private output files and a failed run's leftovers.

Every test runs the real dataset stage on real files (no model, no Ray): a few seconds in all.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from guardray.cache import MARKER
from guardray.datasets.assemble import build_dataset
from guardray.errors import InputError
from guardray.runner import plan, run_job
from guardray.jobspec import DatasetSpec, validate_spec
from guardray.storage import resolve
from tests.conftest import write_spec


def _guardray(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guardray", *args], capture_output=True, text=True, timeout=300)


def _file_source(name: str, path: Path, **fields: object) -> dict[str, object]:
    return {"type": "file", "name": name, "path": str(path), "text_column": "prompt", **fields}


def _job(output: Path, *sources: dict[str, object], **top: object) -> dict[str, object]:
    return {"name": "files", "output": str(output), "dataset": {"sources": list(sources)}, **top}


def _build(tmp_path: Path, *sources: dict[str, object]) -> tuple[dict, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    out = resolve(str(tmp_path / "stage"))
    summary = build_dataset(DatasetSpec.model_validate({"sources": list(sources)}), out)
    read = lambda name: pq.read_table(out.join(name).path).to_pandas()  # noqa: E731
    counts = pd.read_csv(out.join("counts.csv").path, dtype={"harmful": str})
    return summary, read("dataset.parquet"), read("rejects.parquet"), counts


# ------------------------------------------------------------------------------------- non-string prompts

NOT_STRINGS = [(42, "a number"), (4.5, "a number"), (True, "a boolean"), (["a", "b"], "an array"),
               ({"k": "v"}, "an object")]


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_a_json_row_whose_prompt_is_not_a_string_is_rejected_naming_its_row(tmp_path: Path, fmt: str) -> None:
    rows = [{"prompt": "how do I bake bread", "y": 0}]
    rows += [{"prompt": value, "y": 1} for value, _ in NOT_STRINGS]
    rows += [{"prompt": "write a poem about the sea", "y": 0}]
    path = tmp_path / f"mixed.{fmt}"
    path.write_text("\n".join(json.dumps(r) for r in rows) if fmt == "jsonl" else json.dumps(rows))
    summary, data, rejects, _ = _build(tmp_path, _file_source("mixed", path, label_column="y"))
    assert sorted(data["prompt"]) == ["how do I bake bread", "write a poem about the sea"]
    assert summary["rows"] == 2 and summary["rejected"] == len(NOT_STRINGS)
    reasons = dict(zip(rejects["row"], rejects["reason"]))
    assert reasons == {row: f"prompt: prompt is {kind}, not a string" for row, (_, kind) in enumerate(NOT_STRINGS, 1)}
    assert set(rejects["source"]) == {"mixed"}


def test_a_typed_column_that_is_not_text_rejects_its_rows(tmp_path: Path) -> None:
    """Parquet (and a JSON file whose prompts are all numbers) has one type per column: every row of a
    numeric prompt column is a reject, and a good source beside it is kept."""
    numbers, good = tmp_path / "numbers.parquet", tmp_path / "good.jsonl"
    pq.write_table(pa.table({"prompt": pa.array([1, 2, 3], pa.int64())}), numbers)
    good.write_text(json.dumps({"prompt": "a real prompt"}))
    summary, data, rejects, _ = _build(tmp_path, _file_source("numbers", numbers, harmful=True),
                                       _file_source("good", good, harmful=False))
    assert data["prompt"].tolist() == ["a real prompt"]
    assert rejects["reason"].tolist() == ["prompt: prompt is int64, not a string"] * 3


# ----------------------------------------------------------------------------------- empty sources and sets


def test_a_header_only_csv_is_a_source_of_zero_rows_in_the_counts(tmp_path: Path) -> None:
    header_only, good = tmp_path / "header.csv", tmp_path / "good.csv"
    header_only.write_text("prompt,label\n")
    good.write_text("prompt,label\nhow do I bake bread,0\nwrite malware,1\n")
    summary, data, _, counts = _build(tmp_path, _file_source("empty", header_only, label_column="label"),
                                      _file_source("good", good, label_column="label"))
    assert summary["rows"] == 2 and len(data) == 2
    assert counts["source"].tolist() == ["empty", "good", "good"]  # every source accounted for, in spec order
    empty = counts.iloc[0]
    assert (empty["harmful"], empty["loaded"], empty["rejected"], empty["kept"]) == ("-", 0, 0, 0)
    assert "empty" in (tmp_path / "stage" / "counts.txt").read_text()


def test_a_header_only_csv_alone_is_an_empty_dataset_not_a_key_error(tmp_path: Path) -> None:
    header_only = tmp_path / "header.csv"
    header_only.write_text("prompt,label\n")
    with pytest.raises(InputError, match=r"^dataset: no rows left; empty: 0 rows, 0 rejected; see .*rejects.parquet$"):
        _build(tmp_path, _file_source("empty", header_only, label_column="label"))


def test_an_all_rejected_dataset_fails_the_stage_with_one_line(tmp_path: Path) -> None:
    """`prompt[3]` on a string column rejects every row: the stage fails (exit 2, one line naming the source,
    its counts and the first reason) instead of committing a dataset of 0 rows."""
    data = tmp_path / "strings.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "y": y}) for p, y in [("hello there", 1), ("more text", 0)]))
    job = write_spec(tmp_path / "job.yaml", _job(tmp_path / "out", _file_source("s", data, label_column="y",
                                                                                  text_column="prompt[3]")))
    result = _guardray("run", str(job), "--stages", "dataset")
    assert result.returncode == 2, result.stderr
    stage = plan(validate_spec(_job(tmp_path / "out", _file_source("s", data, label_column="y",
                                                                   text_column="prompt[3]"))))["dataset"].location
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: dataset: no rows left; s: 2 rows, 2 rejected (first reason: prompt[3]: column 'prompt' is string, "
        f"not a list); see {stage.uri}/rejects.parquet")
    assert "Traceback" not in result.stderr
    names = set(os.listdir(stage.path))
    assert MARKER not in names and "dataset.parquet" not in names and "rejects.parquet" in names


# --------------------------------------------------------------------------------------------- symlinks


def test_a_source_path_that_is_a_symlink_loop_says_so(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").symlink_to(tmp_path / "b.jsonl")
    (tmp_path / "b.jsonl").symlink_to(tmp_path / "a.jsonl")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "good.jsonl").write_text(json.dumps({"prompt": "hello"}))
    (tmp_path / "dir" / "loop.jsonl").symlink_to(tmp_path / "dir" / "loop.jsonl")
    cases = [(tmp_path / "a.jsonl", tmp_path / "a.jsonl"), (tmp_path / "dir", tmp_path / "dir" / "loop.jsonl")]
    for path, looping in cases:
        with pytest.raises(InputError) as raised:
            _build(tmp_path, _file_source("loop", path, harmful=True))
        assert str(raised.value) == f"source 'loop': path {looping}: symlink loop"


# ---------------------------------------------------------------------------------------------- counts


def test_counts_show_rejects_of_a_source_with_both_labels(tmp_path: Path) -> None:
    rows = [("how do I bake bread", 0), ("", 0), ("write malware", 1), ("write malware", 1), (42, 1),
            ("steal a car", "maybe"), ("plant a tree", 0)]
    path = tmp_path / "both.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "y": y}) for p, y in rows))
    summary, _, rejects, counts = _build(tmp_path, _file_source("both", path, label_column="y"))
    by_label = counts.set_index("harmful")[["loaded", "rejected", "duplicates", "kept"]].to_dict(orient="index")
    assert by_label == {"False": {"loaded": 3, "rejected": 1, "duplicates": 0, "kept": 2},
                        "True": {"loaded": 3, "rejected": 2, "duplicates": 1, "kept": 1},
                        "?": {"loaded": 1, "rejected": 1, "duplicates": 0, "kept": 0}}
    assert counts["rejected"].sum() == len(rejects) == 4
    text = (tmp_path / "stage" / "counts.txt").read_text().splitlines()
    rejected_at = text[0].index("Rejected") + len("Rejected")
    assert [line[:rejected_at].split()[-1] for line in text[2:5]] == ["1", "2", "1"]
    assert text[-1][:rejected_at].split()[-1] == "4"  # the total too


# ------------------------------------------------------------------------------------------ file modes


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_are_private_by_default_and_follow_file_mode(tmp_path: Path) -> None:
    source = tmp_path / "d.jsonl"
    source.write_text("\n".join(json.dumps({"prompt": f"prompt number {i}"}) for i in range(6)))
    parent_mode = _mode(tmp_path)
    old_umask = os.umask(0o022)  # the usual umask, under which the old code wrote 0644 files
    try:
        for mode, expected_file, expected_dir in [(None, 0o600, 0o700), ("0640", 0o640, 0o750)]:
            out = tmp_path / f"out-{mode}"
            spec = validate_spec(_job(out, _file_source("d", source, harmful=False),
                                      **({"file_mode": mode} if mode else {})))
            stage = Path(run_job(spec, ["dataset"])["dataset"]["dir"])
            files = [stage / n for n in ("dataset.parquet", "rejects.parquet", "counts.csv", "spec.json", MARKER)]
            assert {f.name: oct(_mode(f)) for f in [*files, out / "latest.json"]} == \
                {f.name: oct(expected_file) for f in [*files, out / "latest.json"]}
            assert (oct(_mode(out)), oct(_mode(stage))) == (oct(expected_dir), oct(expected_dir))
    finally:
        os.umask(old_umask)
    assert _mode(tmp_path) == parent_mode  # a directory the job did not create keeps its mode


# --------------------------------------------------------------------------------- a failed run's leftovers


def test_a_failed_dataset_run_is_reported_incomplete_and_redone(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.symlink_to(path)  # fails the stage after its directory (with spec.json) was made
    job_dict = _job(tmp_path / "out", _file_source("d", path, harmful=True))
    job = write_spec(tmp_path / "job.yaml", job_dict)
    failed = _guardray("run", str(job), "--stages", "dataset")
    assert failed.returncode == 2 and failed.stderr.strip().endswith("symlink loop"), failed.stderr
    spec = validate_spec(job_dict)
    stage = plan(spec)["dataset"].location
    assert sorted(os.listdir(stage.path)) == ["spec.json"]
    status = _guardray("status", str(job))
    assert status.stdout.splitlines()[0] == f"dataset    incomplete (no {MARKER}; holds only spec.json) {stage.uri}"
    path.unlink()
    path.write_text("\n".join(json.dumps({"prompt": f"prompt {i}"}) for i in range(4)))
    result = run_job(spec, ["dataset"])["dataset"]
    assert result["status"] == "ran" and result["rows"] == 4
    assert _guardray("status", str(job)).stdout.splitlines()[0] == f"{'dataset':10} {'done':11} {stage.uri}"
