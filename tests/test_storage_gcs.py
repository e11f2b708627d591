"""The same code paths against a real GCS emulator (fake-gcs-server on 127.0.0.1)."""
from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest

from guardray.datasets.sources import load_source
from guardray.runner import run_job, stage_states
from guardray.jobspec import DatasetSpec, validate_spec
from guardray.storage import resolve
from tests.conftest import small_spec


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_file_source_on_gcs(gcs_bucket: str, fmt: str) -> None:
    frame = pd.DataFrame({"text": ["a", "b", "c"], "is_bad": [True, False, True]})
    buf = io.BytesIO()
    {"parquet": lambda: frame.to_parquet(buf), "jsonl": lambda: frame.to_json(buf, orient="records", lines=True),
     "csv": lambda: frame.to_csv(buf, index=False)}[fmt]()
    resolve(f"{gcs_bucket}/in/part-0.{fmt}").write_bytes(buf.getvalue())
    spec = DatasetSpec.model_validate({"sources": [
        {"type": "file", "name": "g", "path": f"{gcs_bucket}/in", "text_column": "text", "label_column": "is_bad"}]})
    table = load_source(spec.sources[0])
    assert list(zip(table["prompt"].to_pylist(), table["harmful"].to_pylist())) == [("a", True), ("b", False), ("c", True)]


def test_dataset_stage_writes_to_gcs_and_is_cached(gcs_bucket: str) -> None:
    spec = validate_spec(small_spec(f"{gcs_bucket}/runs/tiny"))
    first = run_job(spec, ["dataset"])
    assert first["dataset"]["status"] == "ran"
    stage_dir = resolve(first["dataset"]["dir"])
    assert stage_dir.uri.startswith(f"{gcs_bucket}/runs/tiny/dataset-")
    assert set(stage_dir.list()) >= {"_SUCCESS", "spec.json", "dataset.parquet", "rejects.parquet", "counts.txt"}
    table = stage_dir.join("dataset.parquet").read_table()
    assert table.column_names == ["id", "prompt", "harmful", "source", "split"]
    assert table.num_rows == first["dataset"]["rows"] > 50
    assert resolve(f"{gcs_bucket}/runs/tiny/latest.json").read_json()["stages"]["dataset"] == stage_dir.uri
    assert run_job(spec, ["dataset"])["dataset"]["status"] == "cached"
    assert stage_states(spec)[0][1] == "done"


def test_local_and_gcs_outputs_are_identical(gcs_bucket: str, tmp_path: Path) -> None:
    local = run_job(validate_spec(small_spec(str(tmp_path / "out"))), ["dataset"])["dataset"]
    remote = run_job(validate_spec(small_spec(f"{gcs_bucket}/out")), ["dataset"])["dataset"]
    assert local["dir"].rsplit("/", 1)[1] == remote["dir"].rsplit("/", 1)[1]  # same hash
    a = resolve(local["dir"]).join("dataset.parquet").read_table()
    b = resolve(remote["dir"]).join("dataset.parquet").read_table()
    assert a.equals(b)
