"""Crash safety of the features stage on a real Ray runtime: a killed actor, a truncated part, the error budget."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from guardray.cli import main
from guardray.runner import run_job
from guardray.jobspec import validate_spec
from guardray.storage import resolve
from tests.conftest import small_spec, write_spec
from tests.models import build_tiny


def _exactly_once(result: dict[str, Any], dataset_dir: str) -> None:
    stage = resolve(result["dir"])
    ids = stage.join("parts").read_table(columns=["id"]).column("id").to_pylist()
    ids += stage.join("errors.parquet").read_table().column("id").to_pylist()
    expected = resolve(dataset_dir).join("dataset.parquet").read_table(columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(expected)
    for part in Path(result["dir"]).glob("parts/*"):  # every file whole, no temporary left behind
        assert part.name.startswith("part-") and pq.ParquetFile(part).metadata.num_rows >= 0, part.name


def _feature_actor_pids() -> dict[str, int]:
    """Live feature actors (Ray Data map workers) by actor id, from Ray's actor table in the GCS."""
    import ray._private.state

    return {actor_id: a["Pid"] for actor_id, a in ray._private.state.actors().items()
            if a["State"] == "ALIVE" and "MapWorker" in a["ActorClassName"] and a.get("Pid")}


def test_sigkill_of_one_actor_mid_shard_is_retried(ray_local: None, tmp_path: Path) -> None:
    raw = small_spec(str(tmp_path / "out"), model={"id": "smollm2-135m-instruct", "max_length": 64},
                     extract={"layers": [-1], "poolings": ["last"], "actors": 2, "batch_size": 1, "rows_per_shard": 4},
                     guard={"enabled": False})
    raw["dataset"]["sources"] = [{"type": "advbench", "limit": 12}, {"type": "sharegpt", "limit": 12}]
    spec = validate_spec(raw)
    outcome: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: outcome.update(run_job(spec, ["features"])), daemon=True)
    runner.start()
    parts = lambda: list((tmp_path / "out").glob("features-*/parts/part-*.parquet"))  # noqa: E731
    deadline = time.monotonic() + 300
    while (len(parts()) < 1 or len(_feature_actor_pids()) < 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    actors = _feature_actor_pids()
    assert len(actors) == 2 and not outcome, "expected two feature actors busy with the remaining shards"
    victim_id, victim_pid = sorted(actors.items())[0]
    os.kill(victim_pid, signal.SIGKILL)  # only that actor's process
    runner.join(timeout=600)
    assert not runner.is_alive() and "features" in outcome
    import ray._private.state

    assert ray._private.state.actors()[victim_id]["NumRestarts"] >= 1  # Ray restarted the killed actor
    features = outcome["features"]
    assert features["rows"] + features["errors"] == outcome["dataset"]["rows"] == 24
    _exactly_once(features, outcome["dataset"]["dir"])


def test_truncated_part_is_redone(ray_local: None, tmp_path: Path) -> None:
    model = build_tiny(tmp_path / "llama")
    spec = validate_spec(small_spec(str(tmp_path / "out"), model={"id": model, "max_length": 64},
                                    extract={"layers": [-1], "poolings": ["last"], "rows_per_shard": 32},
                                    guard={"enabled": False}))
    first = run_job(spec, ["features"])["features"]
    stage = Path(first["dir"])
    victim = sorted(stage.glob("parts/part-*.parquet"))[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # what a crash mid-write used to leave
    (stage / "_SUCCESS").unlink()
    again = run_job(spec, ["features"])
    second = again["features"]
    assert second["status"] == "ran" and second["shards_run"] == 1
    assert second["processed_this_run"] == 32 and second["rows"] == first["rows"]
    _exactly_once(second, again["dataset"]["dir"])


def test_every_prompt_failing_exits_1_over_the_error_budget(ray_local: None, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # GPT-2 with 16 learned positions: the chat template alone overflows them, so every prompt fails.
    model = build_tiny(tmp_path / "gpt2", kind="gpt2", n_positions=16)
    path = write_spec(tmp_path / "job.yaml", small_spec(
        str(tmp_path / "out"), model={"id": model, "max_length": 64},
        extract={"layers": [-1], "poolings": ["last"], "rows_per_shard": 64}, guard={"enabled": False}))
    assert main(["run", str(path), "--stages", "features"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert "prompts failed, over the error budget of" in errors[0] and "activations: IndexError" in errors[0]
    stage = next((tmp_path / "out").glob("features-*"))
    assert not (stage / "_SUCCESS").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine where torch sees no GPU")
def test_a_gpu_that_torch_cannot_see_fails_in_one_line(tmp_path: Path) -> None:
    """Ray advertises a GPU (`ray.num_gpus: 1`) on this CPU-only machine: the actor gets it, torch sees no CUDA
    device, and the job fails with one line naming the node instead of silently running on the CPU."""
    import subprocess
    import sys

    model = build_tiny(tmp_path / "llama")
    path = write_spec(tmp_path / "job.yaml", small_spec(
        str(tmp_path / "out"), ray={"address": "local", "num_cpus": 2, "num_gpus": 1},
        model={"id": model, "max_length": 64},
        # no actor restarts: a restarted actor would meet the same device (the one line is the point here)
        extract={"layers": [-1], "poolings": ["last"], "accelerator": "gpu", "max_actor_restarts": 0},
        guard={"enabled": False}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_FAKE_CLUSTER"}
    run = subprocess.run([sys.executable, "-m", "guardray", "run", str(path), "--stages", "features"],
                         env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 1 and len(errors) == 1, run.stderr[-3000:]
    assert "Ray assigned GPU" in errors[0] and "sees no CUDA device" in errors[0] and "node " in errors[0]
