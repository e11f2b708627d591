"""Cluster mode: manifests and job specs (checked statically: no cloud here), and a real submission to a Ray
head started on 127.0.0.1, through `guardray submit` and through plain `ray job submit`."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from guardray.jobspec import load_spec
from guardray.submit import build_runtime_env, entrypoint
from tests.conftest import REPO

CLUSTER = REPO / "cluster"
BIN = Path(sys.executable).parent


def _yaml(name: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((CLUSTER / name).read_text()))


def _gpu_container(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["spec"]["containers"][0]


def test_gcp_cluster_config_has_a_cpu_head_and_autoscaling_gpu_workers() -> None:
    (config,) = _yaml("gcp-gpu.yaml")
    assert config["provider"]["type"] == "gcp"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"] and "guestAccelerators" not in head["node_config"]
    gpu_types = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu_types and all(t["min_workers"] == 0 < t["max_workers"] for t in gpu_types)
    for node in types.values():  # GCS through the VM service account, not a key file
        assert "cloud-platform" in node["node_config"]["serviceAccounts"][0]["scopes"][0]
    assert any("pip install" in c and "guardray" in c for c in config["setup_commands"])
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start


@pytest.mark.parametrize("manifest", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_request_gpus_with_tolerations_and_workload_identity(manifest: str) -> None:
    docs = {d["kind"]: d for d in _yaml(manifest)}
    kind = "RayCluster" if manifest == "raycluster.yaml" else "RayJob"
    resource = docs[kind]
    assert resource["apiVersion"] == "ray.io/v1"
    cluster = resource["spec"] if kind == "RayCluster" else resource["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"].startswith("2.")
    for group in cluster["workerGroupSpecs"]:
        pod = group["template"]
        container = _gpu_container(pod)
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]
        assert pod["spec"]["serviceAccountName"] == "guardray"
        assert {e["name"] for e in container["env"]} >= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    if kind == "RayJob":
        assert resource["spec"]["shutdownAfterJobFinishes"] is True
        assert resource["spec"]["entrypoint"].startswith("python -m guardray run jobs/")
    else:
        account = docs["ServiceAccount"]
        assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")


def test_runtime_env_excludes_heavy_paths_and_holds_no_secrets() -> None:
    (env,) = _yaml("runtime_env.yaml")
    assert {"runs/", ".venv/", ".git/"} <= set(env["excludes"])
    assert not any(re.search(r"(^|_)(TOKEN|SECRET|PASSWORD|KEY)($|_)", name) for name in env["env_vars"])
    built = build_runtime_env()
    assert built["working_dir"] == str(REPO) and ".venv-*/" in built["excludes"]
    assert built["env_vars"]["PYTHONUNBUFFERED"] == "1"


def test_entrypoint_attaches_to_the_cluster() -> None:
    command = entrypoint("jobs/local-smoke.yaml", ["dataset.subsample.every=96"], "/data/out dir")
    assert command == ("python -m guardray run jobs/local-smoke.yaml --set ray.address=auto "
                       "--set dataset.subsample.every=96 --output '/data/out dir'")


def test_full_size_job_specs_validate() -> None:
    specs = {p.stem: load_spec(p) for p in sorted((REPO / "jobs").glob("*.yaml"))}
    assert set(specs) >= {"local-smoke", "krnel-guardrail", "llama3-layer-sweep"}
    krnel = specs["krnel-guardrail"]
    assert krnel.model.id == "meta-llama/Llama-2-7b-chat-hf" and krnel.model.dtype == "auto"
    assert krnel.model.max_length == 2048 and krnel.extract.layers == (-1,) and krnel.extract.poolings == ("last",)
    assert krnel.guard_model.id == "meta-llama/LlamaGuard-7b"
    assert (krnel.guard.safe_token_id, krnel.guard.unsafe_token_id) == (9109, 25110)
    assert len(krnel.dataset.sources) == 9 and krnel.dataset.subsample.every == 10
    assert krnel.dataset.split.test_fraction == 0.25 and krnel.output.startswith("gs://")
    (probe,) = krnel.probes.grid
    assert (probe.type, probe.preprocessing, probe.params["C"]) == ("logistic_regression", "standardize", 0.01)
    sweep = specs["llama3-layer-sweep"]
    assert sweep.model.id == "meta-llama/Llama-3.1-8B-Instruct" and len(sweep.extract.layers) >= 8
    assert set(sweep.extract.poolings) == {"last", "mean"}
    assert sweep.guard_model.id == "meta-llama/Llama-Guard-3-8B" and sweep.guard.prefix == "\n\n"
    assert len({entry.type for entry in sweep.probes.grid}) >= 3
    assert specs["local-smoke"].ray.address == "local"
    # GPU jobs ask for GPUs whether or not GPU nodes are up yet (the GPU groups start at zero workers), so the
    # autoscaler sees the request; only the laptop job leaves it to `auto`.
    for name in ("krnel-guardrail", "llama3-layer-sweep"):
        assert specs[name].extract.accelerator == "gpu" and specs[name].extract.max_actors, name
    assert sweep.probes.torch_probe.use_gpu is True
    assert specs["local-smoke"].extract.accelerator == "auto"


# ------------------------------------------------------------------------------ a real head on 127.0.0.1
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`ray start --head --block` in its own process group; terminating it stops exactly this head."""
    ports = {name: _free_port() for name in ("gcs", "dashboard", "metrics", "agent", "client")}
    temp_dir = tmp_path_factory.mktemp("rayhead")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # as if the venv were activated: jobs run `python`
    command = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--dashboard-host", "127.0.0.1",
               "--node-ip-address", "127.0.0.1", "--port", str(ports["gcs"]),
               "--dashboard-port", str(ports["dashboard"]), "--metrics-export-port", str(ports["metrics"]),
               "--dashboard-agent-listen-port", str(ports["agent"]),
               "--ray-client-server-port", str(ports["client"]), "--temp-dir", str(temp_dir),
               "--system-config", json.dumps({"metrics_report_interval_ms": 1000})]  # export every second
    # the documented one-time set-up: a token in ~/.ray/auth_token, so `ray start --head` turns token auth on
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, capture_output=True, check=True)
    log = (temp_dir / "head.log").open("w")
    head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard']}"
    try:
        _wait_until_up(f"{address}/api/version", head, temp_dir / "head.log")
        yield {"address": address, "metrics": f"http://127.0.0.1:{ports['metrics']}/metrics", "env": env}
    finally:
        head.send_signal(signal.SIGTERM)  # --block: ray stops the processes it started, nothing else
        try:
            head.wait(timeout=3)  # a graceful stop takes its full timeout here; what is left is killed below
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # whatever is left of this head's process group
            os.killpg(head.pid, signal.SIGKILL)
        log.close()


def _wait_until_up(url: str, head: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:  # 401 without a token: the dashboard is up and enforces auth
            return
        except OSError:
            assert head.poll() is None, log.read_text()[-2000:]
            time.sleep(1)
    pytest.fail(f"the Ray head did not come up in {timeout_s:.0f} s")


SMALL = ["--set", "dataset.subsample.every=96", "--set", "extract.layers=[4]", "--set", "extract.actors=1",
         "--set", "model.max_length=96", "--set", "guard.enabled=false", "--set", "probes.cv.folds=3",
         "--set", "evaluate.bootstrap=0", "--set", "evaluate.plots=false"]


def _check_outputs(out: Path) -> dict[str, Any]:
    latest = json.loads((out / "latest.json").read_text())
    assert list(latest["stages"]) == ["dataset", "features", "probes", "report"]
    features = Path(latest["stages"]["features"])
    assert (features / "_SUCCESS").exists() and list((features / "parts").glob("part-*.parquet"))
    report_dir = Path(latest["stages"]["report"])
    assert (report_dir / "_SUCCESS").exists() and (report_dir / "report.md").exists()
    return json.loads((report_dir / "report.json").read_text())


@pytest.mark.slow
def test_submit_to_a_real_head_with_both_commands(ray_head: dict[str, Any], tmp_path: Path) -> None:
    env = ray_head["env"]  # RAY_AUTH_MODE unset: `guardray submit` finds the head's token by itself
    with pytest.raises(urllib.error.HTTPError, match="401"):  # the head enforces token auth
        urllib.request.urlopen(f"{ray_head['address']}/api/jobs/", timeout=10)
    out = tmp_path / "guardray-submit"
    logs = {name: (tmp_path / f"submit.{name}").open("w+") for name in ("out", "err")}  # files: never a full pipe
    submit = subprocess.Popen([str(BIN / "guardray"), "submit", "jobs/local-smoke.yaml", "--address",
                               ray_head["address"], "--output", str(out), *SMALL],
                              cwd=REPO, env=env, stdout=logs["out"], stderr=logs["err"], text=True)
    # watched while it runs, as on the dashboard: gauges live as long as the process that sets them
    live = _watch_gauges(ray_head["metrics"], lambda: submit.poll() is not None)
    submit.wait(timeout=900)
    stdout, stderr = ((tmp_path / f"submit.{name}").read_text() for name in ("out", "err"))
    for f in logs.values():
        f.close()
    assert submit.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert live == {"tokens_per_second", "stage_done", "stage_total"}
    submission = re.search(r"submitted (guardray-local-smoke-\S+)", stdout).group(1)
    assert f"dashboard: {ray_head['address']}/#/jobs/{submission}" in stdout
    assert f"job {submission}: SUCCEEDED" in stdout
    assert re.search(r"^features\s+ran\s+\d+", stdout, re.M) and f"output: {out}" in stdout
    report = _check_outputs(out)
    assert report["test_rows"] > 0 and "guard" not in report

    status = subprocess.run([str(BIN / "guardray"), "jobs", "status", submission, "--address", ray_head["address"]],
                            env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and f"{submission}: SUCCEEDED" in status.stdout

    # the actors' counters stay in Ray's Prometheus export after the job
    exported = _metrics(ray_head["metrics"])
    assert re.search(r'^ray_guardray_prompts_total\{.*model="smollm2-135m-instruct".*\} [1-9]', exported, re.M), exported[:3000]
    assert re.search(r"^ray_guardray_tokens_total\{", exported, re.M)

    # plain Ray, as the README shows it (the CLI needs RAY_AUTH_MODE=token for a head with token auth): the same
    # working-dir upload, runtime env and `ray.address=auto`; the dataset stage alone keeps it short
    plain_out = tmp_path / "ray-job-submit"
    plain = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--no-wait", "--address", ray_head["address"], "--working-dir", ".",
         "--runtime-env", "cluster/runtime_env.yaml", "--", "python", "-m", "guardray", "run",
         "jobs/local-smoke.yaml", "--stages", "dataset", "--set", "ray.address=auto", "--output", str(plain_out),
         *SMALL],
        cwd=REPO, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    plain_id = re.search(r"Job '(raysubmit_\w+)' submitted successfully", plain.stdout + plain.stderr).group(1)
    logs = subprocess.run([str(BIN / "guardray"), "jobs", "logs", plain_id, "--follow", "--address", ray_head["address"]],
                          env=env, capture_output=True, text=True, timeout=900)
    assert logs.returncode == 0 and f"job {plain_id}: SUCCEEDED" in logs.stdout, logs.stdout[-3000:] + logs.stderr[-2000:]
    latest = json.loads((plain_out / "latest.json").read_text())
    assert list(latest["stages"]) == ["dataset"]
    assert (Path(latest["stages"]["dataset"]) / "_SUCCESS").exists()


def _watch_gauges(url: str, finished: Any, timeout_s: float = 600) -> set[str]:
    """The live gauges seen in the Prometheus export before `finished()` or all three are seen."""
    wanted = {"tokens_per_second", "stage_done", "stage_total"}
    live: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not live >= wanted and not finished():
        with contextlib.suppress(OSError):  # the head's metrics agent may still be starting
            live |= set(re.findall(r"^ray_guardray_(tokens_per_second|stage_done|stage_total)\{", _metrics(url),
                                   re.M))
        time.sleep(0.5)
    return live


def _metrics(url: str) -> str:
    return urllib.request.urlopen(url, timeout=5).read().decode()
