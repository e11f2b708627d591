"""The column contract (no Ray, no torch): names kept byte for byte (output files and stage hashes depend on them),
layer and pooling through a real parquet file's field metadata, one-line input checks naming every missing
column, and the pooling table the spec and the server take their choices from."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from guardray import columns
from guardray.columns import (FeatureInfo, Target, feature_field, feature_info, feature_infos, feature_schema,
                              read_column, require, with_feature_metadata)
from guardray.errors import InputError
from guardray.jobspec import ExtractSpec
from guardray.storage import resolve


def test_names_are_the_strings_the_outputs_use() -> None:
    assert columns.META_COLUMNS == ["id", "harmful", "source", "split"]
    assert columns.DATASET_COLUMNS == ["id", "prompt", "harmful", "source", "split"]
    assert (columns.GUARD_SCORE, columns.GUARD_RESPONSE_SCORE) == ("guard_score", "guard_response_score")
    assert columns.GUARD_COLUMNS == ("guard_logit_safe", "guard_logit_unsafe", "guard_score", "guard_p_unsafe")
    assert columns.judged_column("guard_cat_S1", "response") == "guard_response_cat_S1"
    assert columns.judged_column("guard_score", "prompt") == "guard_score"
    assert columns.guard_category_column("S10") == "guard_cat_S10"
    assert columns.category_column("Political persuasion!") == "cat_political_persuasion"
    assert columns.feature_column("resp_mean", 12) == "act_resp_mean_L12"
    assert columns.ERRORS_SCHEMA.names == ["id", "source", "reason"]
    assert (columns.RESPONSE, columns.RESPONSE_TOKENS, columns.N_TOKENS) == ("response", "response_tokens", "n_tokens")


def test_the_pooling_table_drives_the_spec_and_the_server() -> None:
    assert columns.PROMPT_POOLINGS == ("last", "mean", "mean_all", "max", "ema")
    assert columns.RESPONSE_POOLINGS == ("resp_last", "resp_mean")
    assert {p.reads for p in columns.POOLINGS.values()} == {"prompt", "response"}
    assert ExtractSpec(poolings=list(columns.PROMPT_POOLINGS)).poolings == columns.PROMPT_POOLINGS
    with pytest.raises(ValueError, match="'last', 'mean', 'mean_all', 'max' or 'ema'"):  # response poolings come from `on`
        ExtractSpec(poolings=["resp_last"])
    from guardray.serve.artifact import PROMPT_POOLINGS  # what a server may run: the same names, not a copy

    assert PROMPT_POOLINGS is columns.PROMPT_POOLINGS


def _parts(stage: Path, with_metadata: bool = True) -> pa.Table:
    """One real part: meta columns, a guard score and two activation columns of different widths."""
    n = 6
    table = pa.table({
        "id": [f"r{i}" for i in range(n)], "harmful": [True, False] * 3, "source": ["s"] * n,
        "split": ["train", "test"] * 3, "guard_score": pa.array(np.linspace(-1, 1, n), pa.float32()),
        "act_last_L3": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(n * 4, dtype=np.float16)), 4),
        "act_resp_mean_L0": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(n * 2, dtype=np.float32)), 2),
    })
    if with_metadata:
        table = with_feature_metadata(table, {"act_last_L3": ("last", 3), "act_resp_mean_L0": ("resp_mean", 0)})
    (stage / "parts").mkdir(parents=True)
    pq.write_table(table, stage / "parts" / "part-000000000000-000000000006.parquet")
    return table


def test_layer_and_pooling_travel_in_the_field_metadata(tmp_path: Path) -> None:
    _parts(tmp_path)
    stage = resolve(str(tmp_path))
    schema = feature_schema(stage)  # read back from the file's footer
    infos = feature_infos(schema, stage.uri)
    assert infos == {"act_last_L3": FeatureInfo("act_last_L3", 3, "last", 4),
                     "act_resp_mean_L0": FeatureInfo("act_resp_mean_L0", 0, "resp_mean", 2)}
    assert infos["act_last_L3"].on_prompt and not infos["act_resp_mean_L0"].on_prompt
    assert feature_info(schema.field("guard_score")) is None
    # the metadata does not change the data or its types
    assert schema.field("act_last_L3").type == pa.list_(pa.float16(), 4)
    data = read_column(stage, "act_last_L3", "harmful", "train")
    np.testing.assert_array_equal(data.x[0], [0, 1, 2, 3])
    # the writer's field and the name agree
    field = feature_field("last", 3, 4, pa.float16())
    assert field.name == "act_last_L3" and field.metadata == schema.field("act_last_L3").metadata


def test_features_without_the_metadata_fail_in_one_line(tmp_path: Path) -> None:
    _parts(tmp_path, with_metadata=False)
    stage = resolve(str(tmp_path))
    with pytest.raises(InputError) as e:
        feature_infos(feature_schema(stage), stage.uri)
    message = str(e.value)
    assert "\n" not in message and stage.uri in message and "act_last_L3, act_resp_mean_L0" in message
    assert "--force features" in message
    from guardray.probes.cv import feature_columns
    from guardray.jobspec import validate_spec
    from tests.conftest import small_spec

    with pytest.raises(InputError, match="lack the layer/pooling field metadata"):  # the probes stage's input
        feature_columns(validate_spec(small_spec(str(tmp_path / "out"))), stage)


def test_require_names_every_missing_column(tmp_path: Path) -> None:
    schema = _parts(tmp_path).schema
    require(schema, ["id", "split", "act_last_L3"], stage="probes", where="gs://b/f", written_by="features")
    with pytest.raises(InputError) as e:
        require(schema, ["id", "cat_x", "split", "guard_response_score", "cat_x"], stage="report", where="gs://b/f",
                written_by="features")
    assert str(e.value) == ("report: gs://b/f lacks columns cat_x, guard_response_score "
                            "(written by the features stage)")
    with pytest.raises(InputError, match=r"^features: d.parquet lacks column response \(written by the responses"):
        require(["id", "prompt"], ["prompt", "response"], stage="features", where="d.parquet", written_by="responses")
    # the column readers check their own projection the same way
    with pytest.raises(InputError, match="probes: .* lacks column act_mean_L3 "):
        read_column(resolve(str(tmp_path)), "act_mean_L3", "harmful")


def test_target_is_part_of_the_contract() -> None:
    target = Target.column("cat_x")
    assert target.needs == ("cat_x",) and not target.derived
    assert target.valid().equals(pa.compute.field("cat_x").is_valid())
