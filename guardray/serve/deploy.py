"""Running the server: on embedded Ray (a laptop), on a cluster (`--address`), or as a Serve config file for
`serve deploy` (`--write-config`; `cluster/serve.yaml` is an example).

Without a bearer token (`--api-key-env`) anyone who reaches the port uses the model, so a server binds to a
loopback address unless it has a key or is told `--insecure-no-auth` (`check_exposure`)."""
from __future__ import annotations

import ipaddress
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from guardray.errors import InputError
from guardray.serve.api import ServeSettings
from guardray.serve.artifact import ServedProbe

APP_NAME, IMPORT_PATH = "guardray", "guardray.serve.app:app_builder"


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a hostname: it may resolve to anything
        return False


def check_exposure(host: str, settings: ServeSettings, insecure_no_auth: bool, key_here: bool,
                   cluster: bool = False) -> None:
    """A server other machines can reach needs a key: refused (one line) unless `--insecure-no-auth`, which
    gets a loud warning. `key_here`: the replicas run on this machine, so its environment must hold the key.
    `cluster`: deployed onto a running cluster (`--address`), whose Serve proxies keep the host they were
    started with (KubeRay binds 0.0.0.0), so `--host` says nothing about who can reach it."""
    if settings.api_key_env:
        if key_here:
            from guardray.serve.gate import read_api_key

            read_api_key(settings.api_key_env)
        return
    if is_loopback(host) and not cluster:
        return
    if not insecure_no_auth:
        where = "--address: a cluster's Serve proxies may be reachable from other machines, so this" if cluster \
            else f"--host {host}: a server other machines can reach"
        raise InputError(f"{where} needs a bearer token (--api-key-env NAME); --insecure-no-auth serves it "
                         "without one")
    print(f"WARNING: serving on {host} WITHOUT AUTHENTICATION (--insecure-no-auth): anyone who reaches this port "
          f"can use the model", file=sys.stderr, flush=True)


def model_line(served: ServedProbe, settings: ServeSettings) -> str:
    """The chat model (and a separate guard model) the replicas load, said before they load it."""
    from guardray.serve.loading import describe_model, serving_spec

    line = f"model: {describe_model(serving_spec(served.model_spec, settings))}"
    guard = served.meta.get("guard")
    if settings.guard in ("model", "both") and guard and not guard.get("is_chat_model", True):
        from guardray.serve.artifact import untrusted_model

        line += f"; guard model: {describe_model(serving_spec(untrusted_model(guard['model'], served.uri), settings))}"
    return line


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
    from guardray.jobspec import RaySpec

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
