"""guardray: read the chat model's mind to guard it, as a Ray job system.

From Python (a notebook), the same functions the CLI runs:

    import guardray
    summary = guardray.run("jobs/local-smoke.yaml", overrides=["probes.cv.folds=3"])
    run = guardray.open_run("runs/local-smoke")
    X, y, ids = run.features("act_last_L29", split="test")

The names load on first use, so `import guardray` stays cheap (no Ray, no torch).
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

#: public name → the module that defines it
_API = {"run": "guardray.api", "open_run": "guardray.api", "Run": "guardray.api",
        "load_spec": "guardray.jobspec", "JobSpec": "guardray.jobspec"}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'guardray' has no attribute {name!r}")
    return getattr(import_module(_API[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
