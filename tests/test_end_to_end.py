"""jobs/local-conversations.yaml end to end through the CLI, made small by overrides: dataset → responses →
features (prompt and response activations, the guard on prompts and responses with categories and a custom
policy) → probes for four targets → report. It covers what jobs/local-smoke.yaml (`make run`) does too."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

import guardray
from tests.conftest import CONVERSATIONS_TARGETS as TARGETS


@pytest.mark.slow
def test_local_conversations_job_end_to_end(finished_run: dict[str, Any]) -> None:
    out, result = finished_run["out"], finished_run["result"]
    assert "| probe harmful/act_" in result.stdout and "| guard |" in result.stdout
    assert result.stdout.count("\n") < 40  # the stage table and the report's headline, not Ray's chatter
    stages = json.loads((out / "latest.json").read_text())["stages"]
    assert set(stages) == {"dataset", "responses", "features", "probes", "report"}
    run = guardray.open_run(str(out))

    # every prompt is accounted for: answered, or an error row of the responses stage
    dataset = pq.read_table(Path(stages["dataset"]) / "dataset.parquet")
    answered = run.dataset()  # the responses stage's prompt set, with the answers
    failed = pq.read_table(Path(stages["responses"]) / "errors.parquet")
    assert answered.num_rows + failed.num_rows == dataset.num_rows > 30
    assert set(answered.column("finish_reason").to_pylist()) <= {"stop", "length"}

    parts = pads.dataset(Path(stages["features"]) / "parts").to_table()
    assert sorted(parts.column("id").to_pylist()) == sorted(answered.column("id").to_pylist())  # reads responses
    names = set(parts.column_names)
    assert set(run.feature_columns()) == {"act_last_L4", "act_mean_L4", "act_resp_last_L4", "act_resp_mean_L4"}
    assert {"guard_score", "guard_response_score", "guard_cat_S15", "guard_response_cat_S15", "politics",
            "cat_hate"} <= names and "response" not in names and "prompt" not in names
    for judge in ("guard_", "guard_response_"):
        total = sum(parts.column(f"{judge}cat_S{i}").to_numpy().astype(np.float64) for i in range(1, 16))
        np.testing.assert_allclose(total, parts.column(f"{judge}p_unsafe").to_numpy(), atol=1e-4)

    report_dir = Path(stages["report"])
    for name in ("report.md", "report.json", "scores.parquet", "mined_prompts.parquet", "auc_by_target.png",
                 "harmful/roc_curve.png", "response_unsafe/roc_curve.png", "politics/pr_curve.png", "_SUCCESS"):
        assert (report_dir / name).exists(), name
    report = run.report()
    sections = report["targets"]
    assert list(report["target_order"]) == TARGETS
    assert sections["politics"]["guard_scorer"] == "guard_cat_S15"  # evaluate.guard_for: the custom policy
    assert sections["response_unsafe"]["guard_scorer"] == "guard_score"  # the INPUT guard, for the same target
    assert "before any token is generated" in sections["response_unsafe"]["answer"]
    for name, section in sections.items():
        assert section["best_probe"].startswith(f"{name}/"), name
    mined = pq.read_table(report_dir / "mined_prompts.parquet")
    flagged = parts.column("guard_response_score").to_numpy() > -2.8
    assert mined.num_rows == int(flagged.sum()) > 0
    assert all(mined.column("prompt").to_pylist()) and "response" in mined.column_names

    # re-rendering reads stored results only
    (report_dir / "report.md").unlink()
    rerender = subprocess.run([sys.executable, "-m", "guardray", "report", str(out)], capture_output=True, text=True)
    assert rerender.returncode == 0, rerender.stderr
    assert (report_dir / "report.md").read_text().startswith("# guardray report: local-conversations")
