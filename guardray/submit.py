"""Cluster mode: submit a job spec to a Ray cluster through the Job Submission API, then follow it.

`guardray submit SPEC --address http://HEAD:8265` validates the spec locally (a bad spec never reaches the
cluster), packs the project as the job's `working_dir` (minus runs, venvs and caches) with the runtime
environment from `cluster/runtime_env.yaml`, submits `python -m guardray run SPEC --set ray.address=auto`, prints
the submission id and the dashboard URL, and streams the logs until the job ends. The exit code is 0 only when
the job SUCCEEDED. `guardray jobs status|logs|stop ID` work on any submission, ours or plain `ray job submit`'s.

Token authentication (Ray ≥ 2.52, on by default for local clusters since 2.59): the Jobs client only sends a
token when `RAY_AUTH_MODE=token` in its own environment. When that variable is unset and a token is available
(`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, or `~/.ray/auth_token` written by `ray start --head`), token mode is
switched on for this process. The token itself is never printed or put in the runtime environment.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shlex
import time
from pathlib import Path
from typing import Any

import yaml

from guardray.errors import InputError, one_line
from guardray.storage import storage_env

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RUNTIME_ENV_FILE = PROJECT_ROOT / "cluster" / "runtime_env.yaml"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded: results, virtual environments, caches, VCS metadata (the working_dir limit is 500 MiB).
EXCLUDES = ["runs/", ".venv/", ".venv-*/", ".git/", "__pycache__/", ".pytest_cache/", "*.egg-info/", "*.pyc"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# What a head's Jobs API answers (HTTP 500) when it has no dashboard agent to hand the job to.
NO_AGENT = "No available agent to submit job"


def default_address() -> str:
    """The Jobs API address: `RAY_API_SERVER_ADDRESS` (what `ray start` prints), else the local default."""
    return os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS


def enable_token_auth() -> str:
    """Use token authentication when the user has not chosen and a token is available; returns the mode."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None:
        return mode
    try:  # ray's own check: looks at RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH and ~/.ray/auth_token
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # older Ray: no token auth at all
        return "disabled"
    return "token" if maybe_enable_token_auth_if_token_available(warn_if_disabled=False) else "disabled"


def client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    enable_token_auth()
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - connection and auth errors become one line
        raise InputError(f"--address {address}: cannot reach the Ray Jobs API: {one_line(e)}") from e


def build_runtime_env(project: Path = PROJECT_ROOT, env_file: Path | None = RUNTIME_ENV_FILE) -> dict[str, Any]:
    """`cluster/runtime_env.yaml` + the project as working_dir + storage settings (emulator, gcsfs flags)."""
    env: dict[str, Any] = {}
    if env_file is not None and env_file.exists():
        env = yaml.safe_load(env_file.read_text()) or {}
        if not isinstance(env, dict):
            raise InputError(f"{env_file}: a runtime environment must be a mapping")
    env["working_dir"] = str(project)
    env["excludes"] = list(dict.fromkeys([*env.get("excludes", []), *EXCLUDES]))
    env["env_vars"] = {**storage_env(), **env.get("env_vars", {})}
    return env


def entrypoint(spec_in_project: str, overrides: list[str], output: str | None) -> str:
    """The command the cluster runs: attach to the cluster (`ray.address=auto`) and run every stage."""
    args = ["python", "-m", "guardray", "run", spec_in_project, "--set", "ray.address=auto"]
    for override in overrides:
        args += ["--set", override]
    if output:
        args += ["--output", output]
    return shlex.join(args)


def submit(spec_path: str, address: str, overrides: list[str], output: str | None, wait: bool,
           runtime_env_file: Path | None = RUNTIME_ENV_FILE, project: Path = PROJECT_ROOT) -> int:
    from guardray.jobspec import load_spec

    spec = load_spec(spec_path, overrides, output, paths_elsewhere=True)  # fail here, not on the cluster
    path = Path(spec_path).resolve()
    if not path.is_relative_to(project):
        raise InputError(f"{spec_path}: the spec must be inside the project ({project}), which is the job's working_dir")
    if not spec.output.startswith("gs://") and not Path(spec.output).is_absolute():
        log.warning("output %s is relative: it lands in the job's temporary working_dir on the cluster; "
                    "use gs://... (or an absolute path on a shared disk) to keep the results", spec.output)
    jobs = client(address)
    submission_id = f"guardray-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    submit_job(jobs, address,
               entrypoint=entrypoint(str(path.relative_to(project)), overrides, output),
               runtime_env=build_runtime_env(project, runtime_env_file),
               submission_id=submission_id,
               metadata={"guardray_job": spec.name, "output": spec.output})
    print(f"submitted {submission_id}")
    print(f"dashboard: {address.rstrip('/')}/#/jobs/{submission_id}")
    if not wait:
        return 0
    return follow(jobs, submission_id)


def submit_job(jobs: Any, address: str, **request: Any) -> None:
    """`jobs.submit_job(**request)`, with a head that cannot take jobs explained in one line.

    Ray reports that case as a bare HTTP 500 ("No available agent to submit job, please try again later"), which
    does not say that retrying will not help: the head's dashboard agent is not running, typically because a
    second head on the same machine found the agent's port already taken by the first.
    """
    try:
        jobs.submit_job(**request)
    except RuntimeError as e:
        if NO_AGENT not in str(e):
            raise
        raise InputError(
            f"--address {address}: the head answered {NO_AGENT!r}: its dashboard agent is not running, often because "
            "another Ray head on this machine holds the agent's port; stop that head with `ray stop`, or start "
            "this one with a free --dashboard-agent-listen-port") from e


def follow(jobs: Any, submission_id: str) -> int:
    """Stream the job's logs until it ends; 0 if it SUCCEEDED, 1 otherwise."""

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(submission_id):
            print(chunk, end="", flush=True)

    asyncio.run(tail())
    status = wait_for(jobs, submission_id)
    print(f"job {submission_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def wait_for(jobs: Any, submission_id: str, timeout_s: float = 60.0) -> str:
    """The job's terminal status (the log stream can end a moment before the status is final)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(jobs.get_job_status(submission_id).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(1)


def job_status(address: str, submission_id: str) -> int:
    info = client(address).get_job_info(submission_id)
    print(f"{submission_id}: {info.status.value}")
    for field in ("message", "entrypoint", "start_time", "end_time"):
        value = getattr(info, field, None)
        if value:
            print(f"  {field}: {value}")
    return 0


def job_logs(address: str, submission_id: str, follow_logs: bool) -> int:
    jobs = client(address)
    if follow_logs:
        return follow(jobs, submission_id)
    print(jobs.get_job_logs(submission_id), end="")
    return 0


def job_stop(address: str, submission_id: str) -> int:
    stopped = client(address).stop_job(submission_id)
    print(f"{submission_id}: {'stop requested' if stopped else 'already finished'}")
    return 0
