"""The stages and the runner: each stage is one module's `Stage` (inputs, key, format, entry point); the runner
plans hashed directories in pipeline order and knows no stage by name."""
from __future__ import annotations

from pathlib import Path

import pytest

from guardray.cache import StageDir
from guardray.errors import InputError
from guardray.jobspec import validate_spec
from guardray.runner import plan, run_job
from guardray.stages import STAGES
from guardray.storage import resolve
from tests.conftest import small_spec


def test_every_stage_reads_only_earlier_stages_and_names_a_real_entry_point(tmp_path: Path) -> None:
    assert list(STAGES) == ["dataset", "responses", "features", "probes", "report"]
    for generate in (False, True):
        spec = validate_spec(small_spec(str(tmp_path), generate={"enabled": generate}))
        seen: list[str] = []
        for stage in STAGES.values():
            if stage.enabled(spec):
                assert set(stage.inputs_for(spec)) <= set(seen), stage.name
                seen.append(stage.name)
            assert callable(stage.function())
        assert ("responses" in seen) == generate


def test_a_stage_directory_is_the_hash_of_its_key_format_and_inputs(tmp_path: Path) -> None:
    spec = validate_spec(small_spec(str(tmp_path)))
    dirs = plan(spec)
    features = STAGES["features"]
    upstream = {"dataset": dirs["dataset"].name}
    same = StageDir.for_stage(resolve(str(tmp_path)), "features", features.key(spec), upstream, features.format)
    assert same.name == dirs["features"].name
    bumped = StageDir.for_stage(resolve(str(tmp_path)), "features", features.key(spec), upstream, features.format + 1)
    assert bumped.name != same.name  # a new output format never reuses an old directory
    # a probes change reuses the features; a model change recomputes them, never the dataset
    probes = plan(validate_spec(small_spec(str(tmp_path), probes={"cv": {"folds": 3}})))
    assert probes["features"] == dirs["features"] and probes["probes"] != dirs["probes"]
    model = plan(validate_spec(small_spec(str(tmp_path), model={"max_length": 99})))
    assert model["dataset"] == dirs["dataset"] and model["features"] != dirs["features"]


def test_unknown_and_disabled_stages_are_refused_in_one_line(tmp_path: Path) -> None:
    spec = validate_spec(small_spec(str(tmp_path)))
    with pytest.raises(InputError, match="unknown stage 'nope'; stages are: dataset, responses, features"):
        run_job(spec, ["nope"])
    with pytest.raises(InputError, match="stage 'responses' is disabled by this spec"):
        run_job(spec, ["responses"])
