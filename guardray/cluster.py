"""Starting or attaching to Ray: embedded single-node (`address: local`) or an existing cluster."""
from __future__ import annotations

import logging
import os

from guardray.spec import RaySpec
from guardray.storage import storage_env

log = logging.getLogger(__name__)


def init_ray(spec: RaySpec) -> None:
    """Start embedded Ray or attach to a cluster, passing the storage environment to every worker."""
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": storage_env()}
    if spec.address == "local":
        # address="local" never attaches to a stray cluster started on this machine.
        ray.init(
            address="local",
            num_cpus=spec.num_cpus,
            num_gpus=spec.num_gpus,
            include_dashboard=spec.dashboard,
            dashboard_host="127.0.0.1",
            runtime_env=runtime_env,
            log_to_driver=True,
            configure_logging=False,
        )
    else:
        # A submitted job already has its runtime env (set at submission, storage variables included); Ray
        # refuses a second one from ray.init, so it is only added when a driver attaches by itself.
        submitted = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        ray.init(address=spec.address, runtime_env=None if submitted else runtime_env)
    log.info("ray: %s", ray.cluster_resources())
