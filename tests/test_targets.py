"""Targets (no Ray): feedback labels computed by Arrow expressions from hand-made guard scores, boundaries and
missing scores, one-line errors for unknown targets, the matching guard score, and which stage keys the
feedback thresholds enter."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from guardray import targets
from guardray.columns import Target, label_counts, read_column
from guardray.errors import InputError
from guardray.probes.cv import expand_grid
from guardray.runner import plan
from guardray.jobspec import FEEDBACK_TARGETS, FeedbackSpec, ProbesSpec, validate_spec
from guardray.storage import resolve
from tests.conftest import small_spec

# input guard, response guard: thresholds 0.5 (input) and 1.0 (response) below
GUARD = [0.5, 0.5, 0.6, None, -2.0, 0.0, float("nan"), -1.0, 3.0]
RESPONSE = [1.0, 1.01, 2.0, 2.0, None, float("nan"), 5.0, -3.0, 0.0]
UNSAFE = [False, True, True, True, None, None, True, False, False]  # response > 1.0; missing → null
SLIPPED = [False, True, False, None, None, None, None, False, False]  # input <= 0.5 and unsafe; missing → null
FEEDBACK = FeedbackSpec(response_threshold=1.0, input_threshold=0.5)


def _parts(tmp_path: Path) -> pa.Schema:
    n = len(GUARD)
    table = pa.table({"id": [f"r{i}" for i in range(n)], "harmful": pa.array([True, False] * 4 + [None]),
                      "split": ["train"] * n, "guard_score": pa.array(GUARD, pa.float32()),
                      "guard_response_score": pa.array(RESPONSE, pa.float32()),
                      "cat_violence": pa.array([True, None, False] * 3), "truncated": [False] * n})
    (tmp_path / "parts").mkdir()
    pq.write_table(table, tmp_path / "parts" / "part-000000000000-000000000009.parquet")
    return table.schema


def _evaluate(schema: pa.Schema, tmp_path: Path, name: str) -> list[bool | None]:
    target = targets.resolve(name, schema, FEEDBACK)
    dataset = pads.dataset(tmp_path / "parts", format="parquet")
    return dataset.to_table(columns={name: target.expression}).column(name).to_pylist()


def test_feedback_labels_at_the_thresholds_and_with_missing_scores(tmp_path: Path) -> None:
    schema = _parts(tmp_path)
    assert _evaluate(schema, tmp_path, "response_unsafe") == UNSAFE
    assert _evaluate(schema, tmp_path, "slipped_through") == SLIPPED
    assert targets.resolve("slipped_through", schema, FEEDBACK).derived


def test_readers_use_the_target_and_report_what_they_read(tmp_path: Path) -> None:
    schema = _parts(tmp_path)
    stage = resolve(str(tmp_path))
    unsafe = targets.resolve("response_unsafe", schema, FEEDBACK)
    data = read_column(stage, None, unsafe, "train", extra=["id"])
    known = [i for i, u in enumerate(UNSAFE) if u is not None]
    assert data.y.tolist() == [UNSAFE[i] for i in known]
    assert data.extra["id"].to_pylist() == [f"r{i}" for i in known]
    assert data.columns_read == ("guard_response_score", "id", "split")  # the label's inputs, not a column
    slipped = targets.resolve("slipped_through", schema, FEEDBACK)
    assert label_counts(stage, slipped) == (1, 4)
    assert label_counts(stage, "cat_violence") == (3, 3)  # null = unknown, excluded
    # other thresholds, other labels
    looser = targets.resolve("response_unsafe", schema, FeedbackSpec(response_threshold=-10))
    assert label_counts(stage, looser) == (7, 0)


def test_targets_resolve_into_the_column_contracts_target(tmp_path: Path) -> None:
    """`Target` lives in `guardray.columns` (the readers' contract); `targets` derives the feedback labels."""
    schema = _parts(tmp_path)
    plain = targets.resolve("harmful", schema, FEEDBACK)
    assert type(plain) is Target and not plain.derived
    column = Target.column("harmful")
    assert plain.needs == column.needs and plain.expression.equals(column.expression)
    derived = targets.resolve("slipped_through", schema, FEEDBACK)
    assert type(derived) is Target and derived.derived
    assert derived.needs == ("guard_score", "guard_response_score")
    assert "Target" not in vars(targets) or targets.Target is Target  # one class, not a copy


def test_unknown_or_underivable_target_fails_in_one_line(tmp_path: Path) -> None:
    schema = _parts(tmp_path)
    with pytest.raises(InputError) as e:
        targets.resolve("harmfull", schema, FEEDBACK)
    message = str(e.value)
    assert "\n" not in message and "did you mean 'harmful'" in message
    assert "labels available: harmful, cat_violence, response_unsafe, slipped_through" in message
    assert "truncated" not in message
    without = schema.remove(schema.get_field_index("guard_response_score"))
    with pytest.raises(InputError, match="'response_unsafe' needs guard_response_score") as e:
        targets.resolve("response_unsafe", without, FEEDBACK)
    assert "\n" not in str(e.value) and "response_unsafe" not in str(e.value).split("available:")[1]
    with pytest.raises(InputError, match="'guard_score' is neither"):  # a score is not a label
        targets.resolve("guard_score", schema, FEEDBACK)


def test_feedback_registry_matches_the_spec() -> None:
    assert tuple(targets.FEEDBACK) == FEEDBACK_TARGETS


def _spec(**sections: object):  # noqa: ANN202
    return validate_spec(small_spec("/tmp/unused", **sections))


def test_matching_guard_score(monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["guard_score", "guard_cat_S1", "guard_cat_S15", "guard_response_score"]
    spec = _spec(generate={"enabled": True}, guard={"categories": True, "custom_categories": [
        {"code": "S15", "name": "Persuasion"}]}, evaluate={"guard_for": {"cat_other": "guard_response_score"}})
    for target in ("harmful", "response_unsafe", "my_label"):
        assert targets.guard_column(spec, target, names) == ("guard_score", None)
    assert targets.guard_column(spec, "slipped_through", names) == ("guard_score", targets.SLIPPED_NOTE)
    assert targets.guard_column(spec, "cat_other", names) == ("guard_response_score", None)  # guard_for wins
    monkeypatch.setitem(sys.modules, "guardray.datasets.categories", None)  # the module is absent
    column, note = targets.guard_column(spec, "cat_violence", names)
    assert column == "guard_score" and "no category mapping" in note
    monkeypatch.setitem(sys.modules, "guardray.datasets.categories",
                        types.SimpleNamespace(CATEGORY_CODES={"cat_violence": "S1", "cat_weapons": "S9"}))
    assert targets.guard_column(spec, "cat_violence", names) == ("guard_cat_S1", None)
    assert targets.guard_column(spec, "cat_persuasion", names) == ("guard_cat_S15", None)  # a custom category
    column, note = targets.guard_column(spec, "cat_weapons", names)  # mapped, but not extracted
    assert column == "guard_score" and "guard_cat_S9 is not in the features" in note
    column, note = targets.guard_column(spec, "cat_unknown", names)
    assert column == "guard_score" and "no guard code" in note
    monkeypatch.undo()  # the real mapping: a Do-Not-Answer risk area against its LlamaGuard code
    assert targets.guard_column(spec, "cat_hate", [*names, "guard_cat_S10"]) == ("guard_cat_S10", None)


def test_feedback_thresholds_enter_the_probes_and_report_keys_only() -> None:
    feedback_job = {"generate": {"enabled": True}, "probes": {"targets": ["harmful", "response_unsafe"]}}
    base = plan(_spec(**feedback_job))
    moved = plan(_spec(**feedback_job, feedback={"response_threshold": 1.5}))
    assert base["features"].name == moved["features"].name
    assert base["probes"].name != moved["probes"].name and base["report"].name != moved["report"].name
    # a job that reads no feedback label keeps its probes when the thresholds move
    plain, plain_moved = plan(_spec()), plan(_spec(feedback={"input_threshold": 2.0}))
    assert plain["probes"].name == plain_moved["probes"].name and plain["report"].name == plain_moved["report"].name


def test_grid_runs_per_target() -> None:
    spec = ProbesSpec.model_validate({"targets": ["harmful", "cat_x"], "grid": [
        {"type": "ridge", "params": {"alpha": [1.0, 10.0]}}]})
    configs = expand_grid(spec, ["act_last_L1", "act_mean_L1"])
    assert len(configs) == 2 * 2 * 2
    assert [c["target"] for c in configs] == ["harmful"] * 4 + ["cat_x"] * 4
    assert np.all([c["feature"] for c in configs[:2]] == np.array(["act_last_L1"] * 2))


def test_probes_stage_fails_on_an_unknown_target_before_any_trial(tmp_path: Path) -> None:
    from guardray.probes.cv import run_probes
    from tests.synthetic import write_feature_parts

    write_feature_parts(tmp_path / "features", {("last", 1): (8, 1.0)}, rows=40, parts=1)
    spec = _spec(probes={"targets": ["harmful", "cat_violance"]})
    with pytest.raises(InputError) as e:  # from the schema alone: no Ray started, nothing read
        run_probes(spec, {"features": resolve(str(tmp_path / "features"))}, resolve(str(tmp_path / "probes")))
    assert "\n" not in str(e.value) and "'cat_violance' is neither" in str(e.value)
    assert not (tmp_path / "probes").exists()


def test_class_check_names_every_short_target() -> None:
    from guardray.probes.cv import class_problem

    assert class_problem({"harmful": (10, 12), "cat_x": (5, 5)}, 5) is None
    problem = class_problem({"harmful": (10, 12), "response_unsafe": (2, 40), "cat_x": (9, 4)}, 5)
    assert "\n" not in problem and "'response_unsafe' (has 2 true, 40 false)" in problem
    assert "'cat_x' (has 9 true, 4 false)" in problem and "harmful" not in problem


def test_torch_probe_rows_use_a_derived_target() -> None:
    from guardray.probes.torch_probe import train_rows

    table = pa.table({"split": ["train", "test", "train", "train"], "guard_response_score": [2.0, 2.0, None, -1.0],
                      "f": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(8, dtype=np.float16)), 2)})
    unsafe = targets.resolve("response_unsafe", table.schema, FeedbackSpec())
    rows = train_rows(table, "f", unsafe)  # the test row and the unjudged row are left out
    np.testing.assert_array_equal(rows["x"], [[0, 1], [6, 7]])
    np.testing.assert_array_equal(rows["y"], [1.0, 0.0])


def test_headline_probe_is_the_best_by_cv_on_prompt_features() -> None:
    """Per target the report's headline probe is the best CV score, not the first feature of the grid; probes on
    the response's activations (an output guard) do not take the headline."""
    from guardray.probes.cv import headline_probes

    def probe(target: str, pooling: str, score: float) -> dict:
        return {"id": {"target": target, "pooling": pooling}, "roc_auc_mean": score}

    saved = [probe("harmful", "last", 0.6), probe("harmful", "mean", 0.9), probe("harmful", "resp_last", 0.99),
             probe("response_unsafe", "resp_mean", 0.8)]
    best = headline_probes(saved, "roc_auc_mean", ["harmful", "response_unsafe"])
    assert best["harmful"] is saved[1]
    assert best["response_unsafe"] is saved[3]  # no prompt feature probed: the response's is all there is
