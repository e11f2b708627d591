"""What hardware a GPU stage asks Ray for, and the check that an actor actually got it.

On an autoscaling cluster the GPU workers start at zero, so "does the cluster have GPUs right now?" is the wrong
question: a stage that only asks for GPUs when it sees them never makes the autoscaler launch any. The spec
says what an actor needs (`accelerator: gpu | cpu | auto`), and the request is made whether or not such nodes
are up yet. `auto` means a GPU when the cluster has GPU nodes, or declares GPU node types in the cluster
config the autoscaler publishes (autoscaler v2, KubeRay); otherwise (a laptop, embedded Ray) the CPU, with
one log line saying why. The features actors and the torch probe use this; the vLLM guard runs inside a
feature actor and so on whatever device the actor was given.
"""
from __future__ import annotations

import logging
import os
from typing import Literal, Sequence

log = logging.getLogger(__name__)

Accelerator = Literal["gpu", "cpu"]


class DeviceError(RuntimeError):
    """A node that Ray says has a GPU, where torch sees none: a broken driver or a CPU-only torch build."""


def declared_gpus() -> tuple[float, float]:
    """(GPUs in the cluster now, GPUs the autoscaler could add from its node types; 0 when not published)."""
    import ray

    now = float(ray.cluster_resources().get("GPU", 0))
    try:
        from ray._private.state import state

        declared = float((state.get_max_resources_from_cluster_config() or {}).get("GPU", 0) or 0)
    except Exception:  # noqa: BLE001 - an internal API; no published config simply means "unknown"
        declared = 0.0
    return now, declared


def resolve_accelerator(requested: str, what: str) -> Accelerator:
    """`gpu` / `cpu` as given; `auto` → gpu when the cluster has or declares GPUs, else cpu (logged once)."""
    if requested == "cpu":
        return "cpu"
    now, declared = declared_gpus()
    if requested == "gpu":
        if not now:
            log.info("%s: asking for GPUs while none are up (%g declared): waiting for the autoscaler to add GPU "
                     "nodes", what, min(declared, UNBOUNDED_GPUS))
        return "gpu"
    if now or declared:
        log.info("%s: accelerator auto -> gpu (%g GPUs up, %g declared by the autoscaler)", what, now,
                 min(declared, UNBOUNDED_GPUS))
        return "gpu"
    log.info("%s: accelerator auto -> cpu (no GPU nodes and no GPU node types declared; "
             "on an autoscaling cluster whose autoscaler does not publish its node types, set accelerator: gpu)", what)
    return "cpu"


#: Ray reports an unbounded node group (no max count) as sys.maxsize GPUs: not a number to size a pool by.
UNBOUNDED_GPUS = 1e6


def gpu_capacity() -> int:
    """How many one-GPU actors the cluster can eventually hold: its GPUs, or the autoscaler's maximum
    (an unbounded node group counts as unknown: only the GPUs up now)."""
    now, declared = declared_gpus()
    return int(max(now, declared if declared < UNBOUNDED_GPUS else 0))


def is_fake_cluster() -> bool:
    """Ray's autoscaler simulator (`RAY_FAKE_CLUSTER=1`): nodes advertise GPUs that do not exist."""
    return os.environ.get("RAY_FAKE_CLUSTER") == "1"


def device_for(gpu_ids: Sequence[object], cuda_visible: bool) -> Accelerator | None:
    """The device an actor may compute on, from the GPUs Ray assigned it and whether torch sees CUDA.

    'cpu' whenever Ray gave it no GPU, even where CUDA devices are visible (a CPU actor on a GPU node, or a
    replica with `num_gpus: 0`): taking one would share a GPU that Ray gave to another actor. 'cuda' for a GPU
    that torch can use; None for a GPU from Ray that torch cannot see (a broken driver, a CPU-only build)."""
    if not gpu_ids:
        return "cpu"
    return "cuda" if cuda_visible else None


def check_actor_device() -> Accelerator:
    """Inside an actor: 'cuda' when Ray gave it a GPU torch can use, 'cpu' when it asked for none. The models
    of the actor are loaded on this device (`models.load_model(..., checked=...)`), never on one picked again.

    A GPU from Ray that torch cannot see fails in one line naming the node, except on Ray's fake GPU nodes in
    tests, which run on the CPU with a warning.
    """
    import ray
    import torch

    gpu_ids = ray.get_gpu_ids()
    device = device_for(gpu_ids, bool(gpu_ids) and torch.cuda.is_available())
    if device is not None:
        return device
    context = ray.get_runtime_context()
    node = f"{ray.util.get_node_ip_address()} (node {context.get_node_id()[:12]})"
    if is_fake_cluster():
        log.warning("node %s: fake GPU %s from Ray's autoscaler simulator; running on the CPU", node, gpu_ids)
        return "cpu"
    raise DeviceError(f"node {node}: Ray assigned GPU {gpu_ids} but torch {torch.__version__} sees no CUDA device "
                      f"(CUDA build: {torch.version.cuda or 'none'}); install a CUDA build of torch on the GPU nodes")
