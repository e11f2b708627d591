"""Running the server: on embedded Ray (a laptop), on a cluster (`--address`), or as a Serve config file for
`serve deploy` (`--write-config`; `cluster/serve.yaml` is an example)."""
from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import yaml

from guardray.serve.api import ServeSettings
from guardray.serve.artifact import ServedProbe

APP_NAME, IMPORT_PATH = "guardray", "guardray.serve.app:app_builder"


def serve_config(settings: ServeSettings, host: str, port: int) -> dict[str, Any]:
    """A Serve config (the schema `serve deploy` and KubeRay's RayService read)."""
    args = settings.model_dump(exclude_defaults=True)
    args["artifact"] = settings.artifact
    return {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port},
            "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH, "args": args}]}


def write_serve_config(path: str, settings: ServeSettings, host: str, port: int) -> None:
    Path(path).write_text(yaml.safe_dump(serve_config(settings, host, port), sort_keys=False))


def start(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, address: str | None = None) -> str:
    """Deploy the application and return its base URL (Ray is started or attached to if it is not up)."""
    from ray import serve

    from guardray.cluster import init_ray
    from guardray.serve.app import build_app
    from guardray.spec import RaySpec

    init_ray(RaySpec(address=address or "local", dashboard=address is None))
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def run_server(settings: ServeSettings, host: str, port: int, address: str | None, served: ServedProbe) -> int:
    """Serve until SIGINT/SIGTERM; a cluster deployment (`address`) stays up after this process ends."""
    from ray import serve

    url = start(settings, host, port, address)
    print(f"serving {served.meta['name']} ({served.model_spec.id}, layer {served.meta['layer']}, "
          f"{served.meta['pooling']}) at {url}/v1/chat/completions  policy={settings.policy} guard={settings.guard}",
          flush=True)
    if address is not None:
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    return 0
