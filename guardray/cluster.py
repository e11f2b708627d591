"""Starting or attaching to Ray: embedded single-node (`address: local`) or an existing cluster."""
from __future__ import annotations

import logging
import os
import sys

from guardray import progress

from guardray.jobspec import RaySpec
from guardray.storage import storage_env

log = logging.getLogger(__name__)


def init_ray(spec: RaySpec) -> None:
    """Start embedded Ray or attach to a cluster, passing the storage environment to every worker."""
    import ray

    if ray.is_initialized():
        return
    progress.quiet_ray_loggers()  # before ray.init: its start-up notices are chatter too
    if not progress.verbose():
        quiet_ray_data()
    runtime_env = {"env_vars": storage_env()}
    if spec.address == "local":
        # address="local" never attaches to a stray cluster started on this machine.
        context = ray.init(
            address="local",
            num_cpus=spec.num_cpus,
            num_gpus=spec.num_gpus,
            include_dashboard=spec.dashboard,
            dashboard_host="127.0.0.1",
            runtime_env=runtime_env,
            # the workers' own warnings and errors (a restarted actor, a pickled probe) reach the console
            log_to_driver=True,
            configure_logging=False,
        )
        if spec.dashboard:
            print(dashboard_line(context.dashboard_url), file=sys.stderr, flush=True)
    else:
        # A submitted job already has its runtime env (set at submission, storage variables included); Ray
        # refuses a second one from ray.init, so it is only added when a driver attaches by itself.
        submitted = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        ray.init(address=spec.address, runtime_env=None if submitted else runtime_env)
    log.info("ray: %s", ray.cluster_resources())


def quiet_ray_data() -> None:
    """No Ray Data progress bars or execution banners on the console: the stage's own progress line says
    how far it is (`progress.ProgressLine`)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False


def dashboard_line(url: str | None) -> str:
    """Where the local dashboard is, and how to get past its token page (local Ray has token auth on)."""
    from pathlib import Path

    token = Path.home() / ".ray" / "auth_token"
    return (f"dashboard: http://{url} (bound to 127.0.0.1; it asks for Ray's token: `ray get-auth-token`, or the "
            f"file {token})")
