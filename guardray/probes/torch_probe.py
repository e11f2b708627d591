"""Logistic regression in torch, trained with Ray Train's `TorchTrainer` (DDP over N workers, GPU when present).

This is the probe for feature sets too large for one node: the workers read their shard of the features stage's
parquet with `ray.train.get_dataset_shard`, so no process ever holds the whole matrix. A first pass over the
shards computes the standardisation statistics (all-reduced across workers), then each epoch trains on the
standardised features and reports its loss with a checkpoint; a restarted run resumes from the last checkpoint.
The result is saved in the same portable linear format as the sklearn probes (weight, bias, scaler mean/scale).
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from guardray.columns import (PARTS_DIR, SPLIT, TargetLike, as_target, feature_infos, feature_schema, matrix,
                              parts_dataset, split_filter)
from guardray.accelerators import gpu_capacity
from guardray.jobspec import TorchProbeSpec
from guardray.storage import Location

log = logging.getLogger(__name__)

TORCH_PROBE_TYPE = "torch_logistic_regression"
CHECKPOINT_FILE = "probe.pt"


def train_rows(batch: pa.Table, column: str, target: TargetLike) -> dict[str, np.ndarray]:
    """A parquet batch → {"x": float32 [rows, dim], "y": float32 [rows]} for the train split's rows with a known
    label and features (a response pooling is null on a row without a reply; a derived label is computed by the
    same Arrow expression the other readers use)."""
    target = as_target(target)
    train = pads.dataset(batch).to_table(columns={column: pc.field(column), "y": target.expression},
                                         filter=split_filter(target, "train") & pc.field(column).is_valid())
    return {"x": matrix(train, column), "y": np.asarray(train.column("y").to_pylist(), dtype=np.float32)}


def train_dataset(features: Location, column: str, target: TargetLike) -> Any:
    """The features stage's parts as a lazy Ray Dataset of train rows: read tasks project the feature column, the
    columns the label reads and the split, and stream blocks to the training workers, each epoch; nothing is
    loaded on the driver or materialised whole."""
    import ray

    target = as_target(target)
    parts = features.join(PARTS_DIR)
    needed = list(dict.fromkeys([column, *target.needs, SPLIT]))
    dataset = ray.data.read_parquet(parts.path, filesystem=parts.fs).select_columns(needed)
    return dataset.map_batches(train_rows, batch_format="pyarrow", fn_kwargs={"column": column, "target": target})


#: Keep the train column in the object store when it takes at most this share of it; else stream every epoch.
CACHE_SHARE = 0.25


def _cached_if_small(dataset: Any, features: Location, dim: int) -> Any:
    """Materialise the train rows in the object store (on the workers' nodes, never the driver) when they fit
    with room to spare: every epoch then reads blocks already in memory instead of re-running the parquet read,
    which on small sets costs far more than the training. Larger sets stream from the parquet each epoch."""
    import ray

    rows = parts_dataset(features).count_rows()  # from the footers: no data read
    need = rows * dim * 4
    room = ray.cluster_resources().get("object_store_memory", 0) * CACHE_SHARE
    log.info("torch probe: %s the train rows (%.0f MB; object store share %.0f MB)",
             "caching" if need <= room else "streaming", need / 2**20, room / 2**20)
    return dataset.materialize() if need <= room else dataset


def host_copy(value: Any) -> Any:
    """`value` with every tensor in it (dicts, lists and tuples walked) copied to host memory and detached.

    A checkpoint written by a CUDA worker otherwise records its storages as `cuda:N`, and the driver (often a
    CPU-only head node) cannot load it: "Attempting to deserialize object on a CUDA device"."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: host_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(host_copy(item) for item in value)
    return value


def save_state(state: dict[str, Any], path: Path) -> None:
    """Write a checkpoint whose tensors all live on the CPU, so any node (GPU or not) can read it."""
    import torch

    torch.save(host_copy(state), path)


def load_state(path: Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU, whatever device wrote it (a file from an older run may still name
    `cuda:N`); `prepare_model` and `Optimizer.load_state_dict` move the values to the worker's device after."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def all_reduce_sum(tensor: Any) -> Any:
    """Sum `tensor` in place over every worker and return it; a no-op outside a process group.

    The tensor must live on the training device: NCCL only reduces CUDA tensors, gloo takes either.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _stats_dtype(device: Any) -> Any:
    import torch

    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def _standardisation(shard: Any, dim: int, batch_size: int, device: Any) -> tuple[Any, Any, int]:
    """Mean and scale over every worker's shard (sklearn's StandardScaler: scale 1 where the variance is 0).

    The sums accumulate on `device` in float64 (E[x²] - E[x]² cancels badly in float32) and are all-reduced there.
    """
    import torch

    dtype = _stats_dtype(device)
    totals = torch.zeros(2 * dim + 1, dtype=dtype, device=device)
    # float32 over the wire (exact for the float16 features), widened on the device: half the transfer of float64
    for batch in shard.iter_torch_batches(batch_size=batch_size, dtypes=torch.float32, device=device):
        x = batch["x"].to(dtype)
        totals[:dim] += x.sum(dim=0)
        totals[dim:2 * dim] += (x * x).sum(dim=0)
        totals[-1] += x.shape[0]
    all_reduce_sum(totals)
    rows = int(totals[-1])
    mean = totals[:dim] / rows
    std = (totals[dim:2 * dim] / rows - mean * mean).clamp(min=0).sqrt()
    return mean, torch.where(std > 0, std, torch.ones_like(std)), rows


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch

    torch.manual_seed(config["seed"])
    shard = ray.train.get_dataset_shard("train")
    dim, batch_size = config["dim"], config["batch_size"]
    device = ray.train.torch.get_device()
    mean, scale, rows = _standardisation(shard, dim, batch_size, device)
    model = torch.nn.Linear(dim, 1)
    optimizer_state, first_epoch, history = None, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resume after a failure or a restart
        with checkpoint.as_directory() as directory:
            state = load_state(Path(directory) / CHECKPOINT_FILE)
        model.load_state_dict(state["model"])
        optimizer_state, first_epoch, history = state["optimizer"], state["epoch"] + 1, state["history"]
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    if optimizer_state:
        optimizer.load_state_dict(optimizer_state)
    mean, scale = mean.float(), scale.float()
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="sum")
    for epoch in range(first_epoch, config["epochs"]):
        started = time.perf_counter()
        # the loss sums stay on the device: loss.item() would wait for the GPU on every batch
        loss_sum, seen = torch.zeros((), dtype=_stats_dtype(device), device=device), 0
        for batch in shard.iter_torch_batches(batch_size=batch_size, dtypes=torch.float32, device=device,
                                              local_shuffle_buffer_size=4 * batch_size):
            logits = model((batch["x"] - mean) / scale).squeeze(-1)
            loss = loss_fn(logits, batch["y"])
            optimizer.zero_grad()
            (loss / batch["y"].shape[0]).backward()
            optimizer.step()
            loss_sum += loss.detach()
            seen += batch["y"].shape[0]
        totals = all_reduce_sum(torch.stack((loss_sum, loss_sum.new_tensor(seen))))
        loss_total, seen_total = totals.tolist()  # the epoch's one device → host transfer
        metrics = {"epoch": epoch, "loss": loss_total / seen_total, "rows": rows,
                   "seconds": time.perf_counter() - started}
        history.append(metrics)
        with tempfile.TemporaryDirectory() as directory:
            saved = None
            if ray.train.get_context().get_world_rank() == 0:
                plain = model.module if hasattr(model, "module") else model
                save_state({"model": plain.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                            "history": history, "mean": mean, "scale": scale}, Path(directory) / CHECKPOINT_FILE)
                saved = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=saved)


def train_torch_probe(spec: TorchProbeSpec, features: Location, column: str, target: TargetLike,
                      storage: Location, seed: int = 0) -> dict[str, Any]:
    """Fit the probe with a TorchTrainer; returns its linear parameters and the per-epoch history.

    The input width comes from the parts' schema (a footer read), the rows from `train_dataset`.
    """
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # auto: GPUs when the cluster has, or its autoscaler declares, one per training worker
    use_gpu = spec.use_gpu if spec.use_gpu != "auto" else gpu_capacity() >= spec.workers
    log.info("torch probe: use_gpu=%s (%s)", bool(use_gpu), spec.use_gpu)
    dim = feature_infos(feature_schema(features), features.uri)[column].width
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"dim": dim, "batch_size": spec.batch_size, "lr": spec.lr,
                           "weight_decay": spec.weight_decay, "epochs": spec.epochs, "seed": seed},
        # Ray's own default, made explicit: NCCL wants every collective's tensor on the GPU (all_reduce_sum)
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=bool(use_gpu),
                                     resources_per_worker={"CPU": spec.cpus_per_worker}),
        run_config=RunConfig(name=f"torch-probe-{column}", storage_path=storage.path, storage_filesystem=storage.fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": _cached_if_small(train_dataset(features, column, target), features, dim)},
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as directory:
        state = load_state(Path(directory) / CHECKPOINT_FILE)
    return {
        "weight": state["model"]["weight"].double().numpy().reshape(-1),
        "bias": state["model"]["bias"].double().numpy().reshape(-1),
        "mean": state["mean"].double().numpy(), "scale": state["scale"].double().numpy(),
        "epochs": state["epoch"] + 1, "history": state["history"], "use_gpu": bool(use_gpu),
    }
