"""The Python API on a real finished run (`finished_run`: jobs/local-conversations.yaml, small): `guardray.open_run`
reads what the stages wrote, one column at a time, and a probe loaded from Python scores as the report did;
`guardray.run` runs a spec given as a mapping and returns the CLI's summary."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

import guardray
from guardray.errors import InputError, SpecError
from tests.conftest import CONVERSATIONS_TARGETS, small_spec


@pytest.fixture(scope="module")
def run(finished_run: dict[str, Any]) -> guardray.Run:
    return guardray.open_run(str(finished_run["out"]))


def test_features_read_one_column_of_one_split_with_labels_and_ids(run: guardray.Run) -> None:
    X, y, ids = run.features("act_last_L4", split="train")
    parts = pads.dataset(run.stage("features").join("parts").path).to_table(
        columns=["id", "harmful", "split", "act_last_L4"])
    train = parts.filter((pc.field("split") == "train") & pc.field("harmful").is_valid())
    assert X.dtype == np.float32 and X.shape == (train.num_rows, 576) and y.dtype == bool  # SmolLM2: d = 576
    assert list(ids) == train.column("id").to_pylist()
    np.testing.assert_array_equal(y, np.asarray(train.column("harmful").to_pylist(), dtype=bool))
    stored = np.stack([np.asarray(v, np.float32) for v in train.column("act_last_L4").to_pylist()])
    np.testing.assert_array_equal(X, stored)
    everything = run.features("act_last_L4")[0]
    assert len(everything) > len(X) > 0
    with pytest.raises(InputError, match=r"Run.features: 'guard_score' is not an activation column of \S+ "
                                         r"\(columns: act_last_L4, "):
        run.features("guard_score")


def test_the_headline_probe_scores_the_test_rows_as_the_report_did(run: guardray.Run) -> None:
    probe = run.probe()
    headline = run.report()["targets"]["harmful"]["best_probe"]
    assert probe.meta["name"] == headline and headline in run.probes()
    scores = run.scores(pandas=True)
    assert isinstance(scores, pd.DataFrame) and set(scores["split"]) == {"test"}
    assert {"id", "harmful", "guard_score", headline} <= set(scores.columns)
    X, _, ids = run.features(f"act_{probe.meta['pooling']}_L{probe.meta['layer']}", split="test")
    by_id = scores.set_index("id")[headline]
    np.testing.assert_allclose(probe.score(X), by_id.loc[list(ids)].to_numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="probe 'nope': not in"):
        run.probe("nope")


def test_dataset_and_report_are_the_stage_files(run: guardray.Run) -> None:
    table = run.dataset()
    assert table.equals(pq.read_table(run.stage("responses").join("dataset.parquet").path))
    assert run.dataset(pandas=True).shape == (table.num_rows, table.num_columns)
    assert list(run.report()["target_order"]) == CONVERSATIONS_TARGETS
    assert run.scores(split=None).num_rows > run.scores().num_rows


def test_open_run_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such run directory"):
        guardray.open_run(str(tmp_path / "nope"))
    with pytest.raises(InputError, match="no finished probes stage"):
        guardray.open_run(str(tmp_path)).probe()


def test_run_takes_a_mapping_with_overrides_and_leaves_it_alone(tmp_path: Path) -> None:
    spec = small_spec(str(tmp_path / "out"))
    before = copy.deepcopy(spec)
    summary = guardray.run(spec, stages=["dataset"], overrides=["dataset.sources.0.limit=7"])
    assert spec == before
    assert summary["dataset"]["status"] == "ran" and summary["dataset"]["rows"] > 7
    again = guardray.run(spec, stages=["dataset"], overrides=["dataset.sources.0.limit=7"])
    assert again["dataset"]["status"] == "cached" and again["dataset"]["dir"] == summary["dataset"]["dir"]
    with pytest.raises(SpecError):
        guardray.run(spec, stages=["dataset"], overrides=["probes.cv.folds=1"])


def test_import_guardray_is_light() -> None:
    import subprocess
    import sys

    code = "import guardray, sys; print(sorted(m for m in ('ray', 'torch', 'pyarrow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
