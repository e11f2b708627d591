"""Operating points fixed in distribution and the figures of held-out sources (`guardray.held_out`)."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from guardray.held_out import held_out_figures, operating_points, rate


def test_operating_points_are_sklearns_roc_thresholds_at_1pct_fpr_and_99pct_recall() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(2000) < 0.4
    s = np.round(np.where(y, 1.0, 0.0) + rng.normal(size=2000), 2)  # ties
    fpr, tpr, thresholds = roc_curve(y, s)
    points = operating_points(y, s)
    assert points["at_1pct_fpr"] == thresholds[np.flatnonzero(fpr <= 0.01)[-1]]
    assert points["at_99pct_recall"] == thresholds[np.flatnonzero(tpr >= 0.99)[0]]
    assert (s[~y] >= points["at_1pct_fpr"]).mean() <= 0.01 and (s[y] >= points["at_99pct_recall"]).mean() >= 0.99
    assert operating_points(np.ones(3, bool), np.zeros(3)) == {"at_1pct_fpr": None, "at_99pct_recall": None}


def test_held_out_sources_get_rates_at_the_in_distribution_thresholds() -> None:
    rng = np.random.default_rng(1)
    y_in = rng.random(1000) < 0.5
    s_in = np.where(y_in, 2.0, 0.0) + rng.normal(size=1000)
    shifted = 0.5 + rng.normal(size=200)  # harmful rows reworded: they score lower
    benign = 0.8 + rng.normal(size=100)
    y = np.r_[y_in, np.ones(200, bool), np.zeros(100, bool)]
    s = np.r_[s_in, shifted, benign]
    sources = np.array(["a"] * 1000 + ["past"] * 200 + ["chat"] * 100, dtype=object)
    figures = held_out_figures(y, s, sources, ["past", "chat"], resamples=200, seed=0)
    points = figures["in_distribution"]["thresholds"]
    assert points == operating_points(y_in, s_in) and figures["in_distribution"]["rows"] == 1000
    past, chat = figures["sources"]["past"], figures["sources"]["chat"]
    for point, t in points.items():
        assert past[f"detection_{point}"]["rate"] == (shifted >= t).mean()
        assert chat[f"fpr_{point}"]["rate"] == (benign >= t).mean()
        low, high = past[f"detection_{point}"]["ci95"]
        assert low <= past[f"detection_{point}"]["rate"] <= high
    assert "fpr_at_1pct_fpr" not in past and "detection_at_1pct_fpr" not in chat
    assert past["roc_auc"] is None and chat["roc_auc"] is None  # one class each
    assert past["roc_auc_vs_in_distribution_negatives"] == pytest.approx(
        roc_auc_score(np.r_[np.ones(200), np.zeros((~y_in).sum())], np.r_[shifted, s_in[~y_in]]))
    assert rate(np.array([], bool), 10, 0) == {"rate": None, "rows": 0, "ci95": None}


def test_a_held_out_source_is_all_test_and_the_others_are_split_as_before(tmp_path) -> None:
    from pydantic import ValidationError

    from guardray.datasets.assemble import build_dataset
    from guardray.jobspec.dataset import DatasetSpec
    from guardray.storage import resolve

    def built(*sources: dict) -> tuple[DatasetSpec, "object"]:
        spec = DatasetSpec.model_validate({"sources": list(sources)})
        out = resolve(str(tmp_path / str(len(list(tmp_path.iterdir())))))
        build_dataset(spec, out)
        return spec, out.join("dataset.parquet").read_table().to_pandas()

    plain_spec, plain = built({"type": "advbench", "limit": 40}, {"type": "sharegpt", "limit": 40})
    held_spec, held = built({"type": "advbench", "limit": 40}, {"type": "sharegpt", "limit": 40},
                            {"type": "past_tense", "limit": 30, "split": "test"})
    assert (held[held.source == "past_tense"].split == "test").all() and (held.source == "past_tense").sum() == 30
    others = held[held.source != "past_tense"].set_index("id").split
    assert others.to_dict() == plain.set_index("id").split.to_dict()  # the random split of the rest is unchanged
    assert "split" not in plain_spec.sources[0].cache_payload()  # unset: out of the key (old hashes hold)
    with pytest.raises(ValidationError, match="at most one of `split`"):
        DatasetSpec.model_validate({"sources": [{"type": "file", "path": "x.csv", "harmful": True, "split": "test",
                                                 "split_column": "s"}]})


def test_length_buckets_cover_every_row_once_and_their_metrics_are_sklearns() -> None:
    from guardray.evaluate import by_source, length_buckets
    from guardray.jobspec import EvaluateSpec

    rng = np.random.default_rng(2)
    n_tokens = np.r_[rng.integers(20, 80, 400), rng.integers(300, 2000, 20)]  # a long tail
    y = rng.random(420) < 0.5
    s = np.where(y, 1.0, 0.0) + rng.normal(size=420) + (n_tokens > 300)  # long prompts all look harmful
    buckets = length_buckets(n_tokens)
    assert len(buckets) == 420 and len(set(buckets)) == 5 and sorted(set(buckets)) == sorted(set(buckets), key=lambda b: int(b.split(":")[0]))
    for name in set(buckets):
        low, high = map(int, name.split(": ")[1].removesuffix(" tokens").split("-"))
        rows = buckets == name
        assert n_tokens[rows].min() >= low and n_tokens[rows].max() <= high
    table = by_source(y, s, buckets, 0.5, EvaluateSpec())
    assert sum(m["count"] for m in table.values()) == 420
    for name, m in table.items():
        rows = buckets == name
        assert m["roc_auc"] == pytest.approx(roc_auc_score(y[rows], s[rows]))


def test_leave_one_source_out_names_trained_on_sources_and_enters_the_probes_key_only_when_set(tmp_path) -> None:
    from pydantic import ValidationError

    from guardray.jobspec import JobSpec
    from guardray.stages.probes import probes_key

    sources = [{"type": "advbench"}, {"type": "sharegpt"}, {"type": "past_tense", "split": "test"}]

    def spec(value: object) -> JobSpec:
        return JobSpec.model_validate({"name": "t", "output": str(tmp_path), "dataset": {"sources": sources},
                                       "evaluate": {"leave_one_source_out": value}})

    assert spec(True).sources_left_out == ("advbench", "sharegpt")  # never the held-out one
    assert spec(["sharegpt"]).sources_left_out == ("sharegpt",)
    assert "leave_one_source_out" not in probes_key(spec(False))
    assert "leave_one_source_out" not in spec(False).evaluate.cache_payload()
    assert probes_key(spec(["sharegpt"]))["leave_one_source_out"] == ["sharegpt"]
    with pytest.raises(ValidationError, match="'?harmbench'? is not a source"):
        spec(["harmbench"])
    with pytest.raises(ValidationError, match="past_tense has `split: test`"):
        spec(["past_tense"])
    with pytest.raises(ValidationError, match="at least two sources"):
        JobSpec.model_validate({"name": "t", "output": str(tmp_path), "dataset": {"sources": sources[:1]},
                                "evaluate": {"leave_one_source_out": True}})
