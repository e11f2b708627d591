"""GPU actors on an autoscaling cluster: Ray's real autoscaler with fake nodes on this machine.

The head has no GPU and the only GPU node type starts at zero workers, as on `cluster/gcp-gpu.yaml` and the KubeRay
manifests. A features stage with `accelerator: gpu` must make the autoscaler launch GPU workers and run every
shard there (fake GPU nodes have no CUDA device, so the actors run on the CPU and say so).

`ray.cluster_utils.AutoscalingCluster` is the usual way to start this, but in the Ray 2.60 wheel it cannot be used
as is: its config template (`fake_multi_node/example.yaml`) is not shipped, and its `start()` runs
`ray stop --force`, which would kill the test session's own Ray. The fixture below starts the same thing
(`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...` with the fake multi-node provider) on its own
ports and temp dir, and tears down exactly what it started.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

from tests.conftest import REPO, small_spec, write_spec
from tests.models import build_tiny

BIN = Path(sys.executable).parent
GPU_NODE_TYPE = "gpu_worker"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def autoscaling_config(gcs_port: int, head_cpus: int, worker_types: dict[str, Any]) -> dict[str, Any]:
    """The fake multi-node provider's cluster config (what AutoscalingCluster generates from its template)."""
    return {
        "cluster_name": "guardray-fake", "max_workers": 8, "head_node_type": "ray.head.default",
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{gcs_port}"},
        "available_node_types": {"ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {},
                                                      "max_workers": 0}, **worker_types},
        "upscaling_speed": 1.0, "idle_timeout_minutes": 5, "auth": {}, "docker": {}, "file_mounts": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


@pytest.fixture(scope="module")
def fake_gpu_cluster() -> Iterator[dict[str, Any]]:
    """A CPU-only head plus a GPU worker type at min 0, max 2, under the real autoscaler (v1)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="gr-as-", dir="/tmp"))  # short: Ray's socket paths must stay < 108
    port = _free_port()
    config = autoscaling_config(port, head_cpus=2, worker_types={
        GPU_NODE_TYPE: {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2}})
    (temp_dir / "autoscaling.json").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "disabled",
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    command = [str(BIN / "ray"), "start", "--head", "--block", f"--autoscaling-config={temp_dir / 'autoscaling.json'}",
               "--num-cpus=2", "--num-gpus=0", "--port", str(port), "--node-ip-address", "127.0.0.1",
               "--include-dashboard=false", "--temp-dir", str(temp_dir / "ray")]
    log = (temp_dir / "head.log").open("w")
    head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_for_gcs(port, head, temp_dir / "head.log")
        yield {"address": f"127.0.0.1:{port}", "env": env, "temp_dir": temp_dir}
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=3)  # a graceful stop takes its full timeout here; what is left is killed below
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        _kill_leftovers(str(temp_dir))  # the fake worker nodes are the autoscaler's children, not the head's
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_gcs(port: int, head: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert head.poll() is None, log.read_text()[-3000:]
        if "Ray runtime started" in log.read_text():
            return
        time.sleep(0.5)
    pytest.fail(f"the fake autoscaling head did not start in {timeout_s:.0f} s")


def _kill_leftovers(marker: str) -> None:
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in process.info["cmdline"] or ()):
                process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


@pytest.mark.slow
def test_gpu_actors_make_the_autoscaler_launch_gpu_workers(fake_gpu_cluster: dict[str, Any], tmp_path: Path) -> None:
    model = build_tiny(tmp_path / "llama")
    spec = small_spec(str(tmp_path / "out"), model={"id": model, "max_length": 64},
                      extract={"layers": [-1], "poolings": ["last"], "accelerator": "gpu", "actors": "auto",
                               "max_actors": 2, "rows_per_shard": 8},  # as the shipped GPU jobs
                      guard={"enabled": False})
    spec["dataset"]["sources"] = [{"type": "advbench", "limit": 16}, {"type": "sharegpt", "limit": 16}]
    path = write_spec(tmp_path / "job.yaml", spec)
    run = subprocess.run([str(BIN / "guardray"), "run", str(path), "--stages", "features",
                          "--set", f"ray.address={fake_gpu_cluster['address']}"],
                         cwd=REPO, env=fake_gpu_cluster["env"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    monitor_log = "".join(p.read_text(errors="replace") for p in
                          (fake_gpu_cluster["temp_dir"] / "ray").glob("session_*/logs/monitor*"))
    assert re.search(rf"Adding \d+ node\(s\) of type {GPU_NODE_TYPE}", monitor_log), monitor_log[-3000:]
    (stage,) = (tmp_path / "out").glob("features-*")
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["shards_run"] == 4 and summary["rows"] + summary["errors"] == 32
    # Every shard ran on a launched GPU worker (the fake provider's node ids end in a 5-digit counter from
    # 00001; the head's id is random), holding a Ray GPU, on the CPU because the GPU is fake.
    assert summary["nodes"] and all(re.fullmatch(r"f{51}\d{5} gpu:0", node) for node in summary["nodes"]), summary
    assert sum(summary["nodes"].values()) == 4 and summary["devices"] == {"cpu": 4}
    assert "fake GPU" in run.stdout + run.stderr  # the actors said they run on the CPU
