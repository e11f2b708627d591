"""The features stage on a real Ray runtime: column contract, exactly-once, errors, resume, GCS."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet  # noqa: F401 - pa.parquet
import pytest

from guardray.columns import FeatureInfo, feature_infos
from guardray.runner import run_job
from guardray.jobspec import validate_spec
from guardray.storage import resolve
from tests.conftest import small_spec, write_spec
from tests.models import build_tiny


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny(tmp_path_factory.mktemp("m") / "llama")


def _spec(output: str, model_id: str, **extract):
    return validate_spec(small_spec(
        output,
        model={"id": model_id, "max_length": 128},
        extract={"layers": [1, -1], "poolings": ["last", "mean"], "actors": 2, "batch_size": 8,
                 "rows_per_shard": 16, **extract},
        guard={"enabled": True},
    ))


def _check_contract(result: dict, dataset_dir: str) -> pa.Table:
    stage = resolve(result["dir"])
    table = stage.join("parts").read_table()
    dataset = resolve(dataset_dir).join("dataset.parquet").read_table()
    errors = stage.join("errors.parquet").read_table()
    assert sorted(table.column("id").to_pylist() + errors.column("id").to_pylist()) == sorted(dataset.column("id").to_pylist())
    return table


def test_column_contract_and_exactly_once(ray_local: None, tmp_path: Path, tiny_llama: str) -> None:
    results = run_job(_spec(str(tmp_path), tiny_llama), ["features"])
    table = _check_contract(results["features"], results["dataset"]["dir"])
    assert table.column_names == ["id", "harmful", "source", "split", "n_tokens", "truncated",
                                  "act_last_L1", "act_mean_L1", "act_last_L3", "act_mean_L3",
                                  "guard_logit_safe", "guard_logit_unsafe", "guard_score", "guard_p_unsafe"]
    assert table.schema.field("act_last_L3").type == pa.list_(pa.float16(), 64)
    # readers take layer and pooling from the field metadata the stage writes, not from the name
    assert feature_infos(table.schema, "parts")["act_mean_L1"] == FeatureInfo("act_mean_L1", 1, "mean", 64)
    assert table.num_rows == results["dataset"]["rows"] and results["features"]["errors"] == 0
    assert table.column("truncated").to_pylist().count(True) > 0  # ShareGPT has prompts over 128 tokens
    # a second run reuses the stage entirely
    assert run_job(_spec(str(tmp_path), tiny_llama, actors=1), ["features"])["features"]["status"] == "cached"


def test_failing_prompts_go_to_errors(ray_local: None, tmp_path: Path) -> None:
    # GPT-2 has learned positions: with 48 of them, prompts rendering to more tokens fail inside the model.
    model = build_tiny(tmp_path / "gpt2", kind="gpt2", n_positions=48)
    spec = validate_spec(small_spec(str(tmp_path / "out"), model={"id": model, "max_length": 128},
                                    extract={"layers": [-1], "rows_per_shard": 16, "max_error_fraction": 1.0},
                                    guard={"enabled": False}))
    results = run_job(spec, ["features"])
    table = _check_contract(results["features"], results["dataset"]["dir"])
    errors = resolve(results["features"]["dir"]).join("errors.parquet").read_table().to_pylist()
    assert table.num_rows > 0 and len(errors) > 0
    assert all(e["reason"].startswith("activations: IndexError") for e in errors)
    assert max(table.column("n_tokens").to_pylist()) <= 48


def test_features_stream_to_gcs(ray_local: None, gcs_bucket: str, tiny_llama: str) -> None:
    results = run_job(_spec(f"{gcs_bucket}/run", tiny_llama), ["features"])
    stage = resolve(results["features"]["dir"])
    assert stage.uri.startswith(gcs_bucket)
    assert "_SUCCESS" in stage.list() and len(stage.join("parts").list(".parquet")) == 6
    _check_contract(results["features"], results["dataset"]["dir"])


@pytest.mark.slow
def test_killed_run_resumes_with_another_rows_per_shard(tmp_path: Path) -> None:
    """Kill the whole job mid-stage, resume with a different `rows_per_shard` (outside the stage hash): the
    finished row ranges are kept, only the gaps run, and every id still lands exactly once."""
    raw = small_spec(str(tmp_path / "out"), model={"id": "smollm2-135m-instruct", "max_length": 96},
                     extract={"layers": [-1], "poolings": ["last"], "actors": 1, "batch_size": 4, "rows_per_shard": 4},
                     guard={"enabled": False})
    raw["dataset"]["sources"] = [{"type": "advbench", "limit": 10}, {"type": "normal_instructions"},
                                 {"type": "sharegpt", "limit": 10}]
    path = write_spec(tmp_path / "job.yaml", raw)
    command = [sys.executable, "-m", "guardray", "run", str(path), "--stages", "features"]
    first = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts_glob = lambda: list((tmp_path / "out").glob("features-*/parts/part-*.parquet"))  # noqa: E731
    deadline = time.time() + 240
    while len(parts_glob()) < 2 and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done_before = len(parts_glob())
    assert done_before >= 2
    assert not list((tmp_path / "out").glob("features-*/_SUCCESS"))
    second = subprocess.run([*command, "--set", "extract.rows_per_shard=3"], capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    (stage,) = (tmp_path / "out").glob("features-*")  # same directory: rows_per_shard is not in the hash
    summary = resolve(str(stage)).join("summary.json").read_json()
    assert done_before < len(parts_glob()), "the first run should have been killed part way through"
    assert summary["shards_skipped"] >= done_before
    assert summary["processed_this_run"] < summary["rows"] + summary["errors"]
    sizes = {int(p.name[18:30]) - int(p.name[5:17]) for p in parts_glob()}
    assert 4 in sizes and 3 in sizes, sizes  # both runs' shards, tiling the dataset
    table = resolve(str(stage)).join("parts").read_table(columns=["id"])
    ids = table.column("id").to_pylist() + resolve(str(stage)).join("errors.parquet").read_table().column("id").to_pylist()
    dataset = next((tmp_path / "out").glob("dataset-*")) / "dataset.parquet"
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(pa.parquet.read_table(dataset).column("id").to_pylist())


def test_a_shard_where_every_prompt_fails_keeps_the_schema(tmp_path: Path) -> None:
    from guardray.features import FeatureExtractor, to_table

    def table_for(n_positions: int) -> tuple[pa.Table, dict[int, str]]:
        model = build_tiny(tmp_path / f"gpt2-{n_positions}", kind="gpt2", n_positions=n_positions)
        spec = validate_spec(small_spec(str(tmp_path), model={"id": model, "max_length": 64},
                                        extract={"layers": [-1]}, guard={"enabled": False}))
        extractor = FeatureExtractor.from_spec(spec)
        columns, errors = extractor.process(["hi", "hello there"])
        ok = columns.pop("_index")
        meta = pa.table({"id": [f"id{i}" for i in ok], "harmful": [True for _ in ok],
                         "source": ["s" for _ in ok], "split": ["train" for _ in ok]},
                        schema=pa.schema([("id", pa.string()), ("harmful", pa.bool_()), ("source", pa.string()),
                                          ("split", pa.string())]))
        return to_table(meta, columns, "float16", extractor.columns), errors

    failed, errors = table_for(16)  # the chat template alone is longer than 16 positions
    fine, no_errors = table_for(64)
    assert failed.num_rows == 0 and len(errors) == 2 and not no_errors
    assert failed.schema == fine.schema
    # layer and pooling in the field metadata, empty shard or not
    assert feature_infos(failed.schema, "failed") == feature_infos(fine.schema, "fine") != {}
