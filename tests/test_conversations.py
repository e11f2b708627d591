"""Conversation rows end to end on a real Ray: jobs/local-chat-logs.yaml (multi-turn chat logs with personas, and
UncensorBench's given replies with `response_harmful`), made small and run on a tiny random model with SmolLM2's
tokenizer and chat template, through dataset → features → probes → report. Results are read with the Python API.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from transformers import AutoTokenizer

from guardray.api import open_run
from guardray.chats import chats_from_rows
from guardray.columns import DROPPED_TURNS, MESSAGES, RESPONSE, RESPONSE_HARMFUL, parts_dataset
from guardray.held_out import operating_points
from guardray.jobspec import load_spec
from guardray.rendering import chat_renderer
from tests.conftest import REPO
from tests.models import build_tiny

MAX_LENGTH = 200  # the longer chat logs (up to ~450 tokens) lose their oldest turns


@pytest.fixture(scope="module")
def chat_run(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from guardray.runner import run_job

    tmp = tmp_path_factory.mktemp("chat-logs")
    overrides = [f"dataset.sources=[{{type: file, name: chat_logs, path: {REPO / 'jobs/data/chat_logs.jsonl'}, "
                 "format: jsonl, messages_column: messages, label_column: harmful, limit: 48}, "
                 "{type: uncensorbench, limit: 60}, {type: past_tense, limit: 24, split: test}]",
                 f"model.id={build_tiny(tmp / 'tiny')}",
                 f"model.max_length={MAX_LENGTH}", "extract.layers=[1, 3]", "extract.actors=1",
                 "extract.num_cpus_per_actor=2", "extract.rows_per_shard=64", "guard.max_length=1024",
                 "probes.cv.folds=2", "probes.grid=[{type: logistic_regression, params: {C: 0.1}}]",
                 "evaluate.bootstrap=20", "evaluate.leave_one_source_out=true"]
    spec = load_spec(REPO / "jobs/local-chat-logs.yaml", overrides, output=str(tmp / "run"))
    results = run_job(spec)
    return {"spec": spec, "results": results, "run": open_run(str(tmp / "run"))}


def test_the_dataset_keeps_whole_conversations_and_given_replies(chat_run: dict[str, Any]) -> None:
    rows = chat_run["run"].dataset(pandas=True)
    logs, replies = rows[rows.source == "chat_logs"], rows[rows.source == "uncensorbench"]
    assert (rows[rows.source == "past_tense"].split == "test").all() and (rows.source == "past_tense").sum() == 24
    assert len(logs) == 48 and len(replies) == 60
    stored = [m for m in logs[MESSAGES] if m is not None]  # null: a lone prompt (no history, no persona)
    assert 0 < len(stored) < len(logs)
    for prompt, messages in zip(logs.prompt, logs[MESSAGES]):
        assert messages is None or (messages[-1]["role"] == "user" and messages[-1]["content"] == prompt)
    assert max(len(m) for m in stored) >= 7  # a persona and six turns before the last
    assert logs[RESPONSE].isna().all() and replies[RESPONSE].notna().all()
    assert replies[RESPONSE_HARMFUL].notna().all() and logs[RESPONSE_HARMFUL].isna().all()
    assert set(replies[RESPONSE_HARMFUL]) == {True, False}


def test_features_read_the_whole_conversation_and_count_dropped_turns(chat_run: dict[str, Any]) -> None:
    """Each row's n_tokens is its rendering's after any dropped turns; rows over max_length lost turns, and the
    summary counts them; the reply's activations are null exactly where there is no reply."""
    spec, run = chat_run["spec"], chat_run["run"]
    parts = parts_dataset(run.stage("features")).to_table().to_pandas()
    dataset = run.dataset()
    order = {key: row for row, key in enumerate(dataset.column("id").to_pylist())}
    rows = dataset.take([order[key] for key in parts["id"]])
    renderer = chat_renderer(AutoTokenizer.from_pretrained(spec.model.id), spec.model)
    encoded = renderer.encode_many(chats_from_rows(rows.column("prompt").to_pylist(),
                                                   rows.column(MESSAGES).to_pylist()))
    assert [e.dropped_turns for e in encoded] == parts[DROPPED_TURNS].tolist()
    assert [len(e.ids) for e in encoded] == parts["n_tokens"].where(~parts["truncated"], MAX_LENGTH).tolist()
    lost = int((parts[DROPPED_TURNS] > 0).sum())
    assert lost > 0 and chat_run["results"]["features"]["rows_that_lost_turns"] == lost
    has_reply = rows.column(RESPONSE).is_valid().to_numpy(zero_copy_only=False)
    for column in ("act_resp_last_L3", "guard_response_score"):
        assert parts[column].isna().to_numpy().tolist() == (~has_reply).tolist(), column


def test_response_harmful_is_probed_on_the_reply_and_compared_with_the_response_guard(chat_run: dict[str, Any]) -> None:
    """The report's response_harmful AUCs are sklearn's on the stored scores; its headline probe reads the
    reply's activations; `harmful` is not probed on reply features, whose train rows hold one class."""
    run = chat_run["run"]
    report = run.report()
    section = report["targets"][RESPONSE_HARMFUL]
    assert section["guard_scorer"] == "guard_response_score"
    assert "resp_" in section["best_probe"]
    scores = run.scores(pandas=True)
    test = scores[scores[RESPONSE_HARMFUL].notna()]
    y = test[RESPONSE_HARMFUL].astype(bool)
    assert len(test) == section["test_rows"] > 0
    for scorer, metrics in [(section["best_probe"], section["probes"][section["best_probe"]]),
                            ("guard_response_score", section["guard"])]:
        assert metrics["test"]["roc_auc"] == pytest.approx(roc_auc_score(y, test[scorer]))
    probes = chat_run["results"]["probes"]["probes"]
    assert not [p for p in probes if p["id"]["target"] == "harmful" and "resp_" in p["id"]["pooling"]]
    harmful = report["targets"]["harmful"]
    assert "resp_" not in harmful["best_probe"]
    assert np.isfinite(harmful["probes"][harmful["best_probe"]]["test"]["roc_auc"])


def test_chat_logs_answered_by_the_responses_stage(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Conversation rows with `generate:`: the reply continues each conversation, takes the place of the
    dataset's (empty) `response` column, and the features stage reads prompt and reply for every row."""
    from guardray.runner import run_job

    tmp = tmp_path_factory.mktemp("chat-logs-generated")
    overrides = [f"dataset.sources=[{{type: file, name: chat_logs, path: {REPO / 'jobs/data/chat_logs.jsonl'}, "
                 "format: jsonl, messages_column: messages, label_column: harmful, limit: 12}]",
                 f"model.id={build_tiny(tmp / 'tiny')}", f"model.max_length={MAX_LENGTH}",
                 "generate={enabled: true, max_new_tokens: 2, actors: 1, rows_per_shard: 64}",
                 "extract.layers=[1]", "extract.actors=1", "extract.rows_per_shard=64", "guard.enabled=false",
                 "probes.targets=[harmful]", "evaluate.leave_one_source_out=false"]  # one source: none to leave out
    spec = load_spec(REPO / "jobs/local-chat-logs.yaml", overrides, output=str(tmp / "run"))
    results = run_job(spec, ["features"])
    run = open_run(str(tmp / "run"))
    answered = run.stage("responses").join("dataset.parquet").read_table()
    assert answered.schema.names.count(RESPONSE) == 1 and answered.column(RESPONSE).null_count == 0
    assert answered.num_rows == 12 and MESSAGES in answered.schema.names
    parts = parts_dataset(run.stage("features")).to_table()
    assert parts.num_rows == 12 and results["features"]["errors"] == 0
    assert parts.column("act_resp_last_L1").null_count == 0


def test_a_held_out_source_never_trains_and_is_scored_at_in_distribution_thresholds(chat_run: dict[str, Any]) -> None:
    """`split: test` on past_tense: no trial trained on its rows, the in-distribution figures leave it out, and
    its detection rates in the report equal the share of its stored scores at or above the stored thresholds."""
    run, results = chat_run["run"], chat_run["results"]
    train_rows = results["probes"]["train_rows_by_target"]["harmful"]
    features = parts_dataset(run.stage("features")).to_table(columns=["source", "split", "harmful"]).to_pandas()
    assert train_rows == int(((features.split == "train") & features.harmful.notna()).sum())
    assert not ((features.source == "past_tense") & (features.split == "train")).any()

    section = run.report()["targets"]["harmful"]
    scores = run.scores(pandas=True)
    scores = scores[scores.harmful.notna()]
    inside, held = scores[scores.source != "past_tense"], scores[scores.source == "past_tense"]
    assert section["test_rows"] == len(inside)
    for scorer in (section["best_probe"], section["guard_scorer"]):
        figures = section["held_out"][scorer]
        assert figures["in_distribution"]["rows"] == len(inside)
        past = figures["sources"]["past_tense"]
        assert past["rows"] == len(held) == past["positives"]  # all harmful: detection rates, no FPR
        for point, threshold in past["thresholds"].items():
            assert past[f"detection_{point}"]["rate"] == pytest.approx((held[scorer] >= threshold).mean())
        # the 1% FPR threshold flags at most 1% of the in-distribution negatives
        at_fpr = past["thresholds"]["at_1pct_fpr"]
        assert (inside.loc[~inside.harmful.astype(bool), scorer] >= at_fpr).mean() <= 0.01


def test_a_probe_fitted_without_a_source_never_saw_it_and_its_scores_are_its_artifacts(
        chat_run: dict[str, Any]) -> None:
    """`evaluate.leave_one_source_out: true`: per target and trained-on source S, a probe of the headline
    configuration fitted on the other sources' train rows (none when they hold one class); its stored scores on
    S are the artifact applied to S's activations, and the report's rates on S are the shares of those scores at
    or above the 1% FPR point of the other sources' in-distribution test rows."""
    run = chat_run["run"]
    entries = {(e["target"], e["source"]): e for e in chat_run["results"]["probes"]["leave_one_source_out"]}
    assert set(entries) == {(t, s) for t in ("harmful", "response_harmful") for s in ("chat_logs", "uncensorbench")}
    # UncensorBench's requests are all harmful: without chat_logs the harmful train rows hold one class
    assert entries[("harmful", "chat_logs")]["name"] is None and "one class" in entries[("harmful", "chat_logs")]["skipped"]
    entry = entries[("harmful", "uncensorbench")]
    features = parts_dataset(run.stage("features")).to_table(columns=["id", "source", "split", "harmful"]).to_pandas()
    trained = features[(features.split == "train") & features.harmful.notna()]
    assert entry["train_sources"] == ["chat_logs"] and entry["train_rows"] == int((trained.source == "chat_logs").sum())
    probe = run.probe(entry["name"])
    assert probe.meta["left_out_source"] == "uncensorbench" and probe.meta["train_sources"] == ["chat_logs"]

    x, _, ids = run.features(entry["feature"], split="test")
    scores = run.scores(pandas=True).set_index("id")
    on_source = np.isin(ids, features.id[features.source == "uncensorbench"])
    np.testing.assert_allclose(scores.loc[ids[on_source], entry["name"]], probe.score(x[on_source]), rtol=1e-6)

    figures = run.report()["targets"]["harmful"]["left_out"]["uncensorbench"]
    known = scores[scores.harmful.notna()]
    others = known[(known.source == "chat_logs")]
    threshold = figures["left_out_probe"]["thresholds"]["at_1pct_fpr"]
    assert (others.loc[~others.harmful.astype(bool), entry["name"]] >= threshold).mean() <= 0.01
    caught = (known.loc[known.source == "uncensorbench", entry["name"]] >= threshold).mean()
    assert figures["left_out_probe"]["detection_at_1pct_fpr"]["rate"] == pytest.approx(caught)
    assert set(figures) >= {"probe", "left_out_probe", "guard"}
    assert "Leave one source out" in run.stage("report").join("report.md").read_text()


def test_every_in_distribution_test_row_is_in_one_length_bucket_with_sklearns_auc(chat_run: dict[str, Any]) -> None:
    """The report's length buckets (tokens after the template, from scores.parquet's n_tokens) cover the
    in-distribution test rows once, and each bucket's ROC AUC is sklearn's on that bucket's rows."""
    from guardray.evaluate import length_buckets

    run = chat_run["run"]
    section = run.report()["targets"]["harmful"]
    scores = run.scores(pandas=True)
    rows = scores[scores.harmful.notna() & (scores.source != "past_tense")]
    by_length = section["probes"][section["best_probe"]]["by_length"]
    assert sum(m["count"] for m in by_length.values()) == section["test_rows"] == len(rows)
    buckets = length_buckets(rows["n_tokens"].to_numpy())
    for name, m in by_length.items():
        of = rows[buckets == name]
        y = of.harmful.astype(bool)
        assert m["count"] == len(of)
        if y.nunique() == 2:
            assert m["roc_auc"] == pytest.approx(roc_auc_score(y, of[section["best_probe"]]))


def test_harmful_last_turns_are_read_by_history_length_and_persona(chat_run: dict[str, Any]) -> None:
    """The parts record each conversation row's turns before its last user turn and its persona; the report's
    by_history and by_persona tables cover the in-distribution test rows once, with sklearn's AUC per group."""
    run = chat_run["run"]
    parts = parts_dataset(run.stage("features")).to_table(columns=["id", "history_turns", "persona"]).to_pandas()
    dataset = run.dataset(pandas=True).set_index("id").loc[parts["id"]]
    for messages, turns, persona in zip(dataset[MESSAGES], parts.history_turns, parts.persona):
        roles = [m["role"] for m in messages] if messages is not None else ["user"]
        assert turns == len([r for r in roles if r != "system"]) - 1 and persona == ("system" in roles)

    section = run.report()["targets"]["harmful"]
    scores = run.scores(pandas=True)
    rows = scores[scores.harmful.notna() & (scores.source != "past_tense")]
    best = section["probes"][section["best_probe"]]
    groups = {"0 turns": rows.history_turns == 0, "1-2 turns": rows.history_turns.between(1, 2),
              "3+ turns": rows.history_turns >= 3}
    assert sum(m["count"] for m in best["by_history"].values()) == len(rows)
    point = operating_points(rows.harmful.astype(bool), rows[section["best_probe"]])["at_1pct_fpr"]
    for name, m in best["by_history"].items():
        of = rows[groups[name]]
        harmful = of.loc[of.harmful.astype(bool), section["best_probe"]]
        assert m["count"] == len(of)
        assert m["recall"] == pytest.approx((harmful >= 0).mean())
        assert m["detection_at_1pct_fpr"] == pytest.approx((harmful >= point).mean())
    assert {k: m["count"] for k, m in best["by_persona"].items()} == {
        "persona": int(rows.persona.sum()), "no persona": int((~rows.persona.astype(bool)).sum())}
