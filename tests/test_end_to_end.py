"""jobs/local-smoke.yaml end to end (smaller via overrides): dataset → features → probes → report."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_local_smoke_job_produces_the_report(tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "guardray", "run", str(REPO / "jobs/local-smoke.yaml"), "--output", str(out),
               "--set", "dataset.subsample.every=96", "--set", "extract.layers=[4, 8]",
               "--set", "model.max_length=128", "--set", "guard.max_length=420",
               "--set", "probes.cv.folds=3", "--set", "evaluate.bootstrap=20",
               "--set", "probes.grid=[{type: logistic_regression, params: {C: 0.1}}]"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| probe harmful/act_" in result.stdout and "| guard |" in result.stdout
    latest = json.loads((out / "latest.json").read_text())
    report_dir = Path(latest["stages"]["report"])
    for name in ("report.md", "report.json", "scores.parquet", "harmful/pr_curve.png", "harmful/roc_curve.png",
                 "harmful/auc_by_layer.png", "harmful/score_histograms.png", "auc_by_target.png", "_SUCCESS"):
        assert (report_dir / name).exists(), name
    report = json.loads((report_dir / "report.json").read_text())
    # the torch probe in the stages is covered by tests/test_report.py (one Ray Train run for the whole suite)
    assert set(report["probes"]) == {f"harmful/act_{p}_L{layer}-logistic_regression"
                                     for p in ("last", "mean") for layer in (4, 8)}
    assert report["probes"][report["best_probe"]]["test"]["roc_auc"] > 0.6
    assert report["guard"]["test"]["count"] == report["test_rows"] > 0
    assert "fpr_at_99_recall" in report["comparison"]
    probes_dir = Path(latest["stages"]["probes"])
    assert (probes_dir / "cv_results.csv").exists() and (probes_dir / "cv_results.parquet").exists()
    # re-rendering reads stored results only
    (report_dir / "report.md").unlink()
    rerender = subprocess.run([sys.executable, "-m", "guardray", "report", str(out)], capture_output=True, text=True)
    assert rerender.returncode == 0, rerender.stderr
    assert (report_dir / "report.md").read_text().startswith("# guardray report: local-smoke")
