"""The torch probe on a real Ray Train run (2 CPU workers, DDP over gloo, checkpoints each epoch, linear
artifact) and its all-reduce helper on a real gloo process group."""
from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import roc_auc_score

from guardray import probes
from guardray.probes import artifact
from guardray.probes.torch_probe import (TORCH_PROBE_TYPE, all_reduce_sum, train_dataset, train_rows,
                                         train_torch_probe)
from guardray.spec import TorchProbeSpec
from guardray.storage import resolve

DIM = 24


def _write_parts(directory: Path, n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A linearly separable toy set (label = sign of a fixed direction, with a margin) as feature-stage parts."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=DIM)
    x = rng.normal(size=(n, DIM)) * 3 + 1.5  # not standardised: the probe must standardise itself
    margin = (x - 1.5) @ direction
    keep = np.abs(margin) > 0.5 * np.abs(margin).mean()
    x, y = x[keep].astype(np.float16), margin[keep] > 0
    split = np.where(np.arange(len(y)) % 4 == 0, "test", "train")
    (directory / "parts").mkdir(parents=True)
    for part, rows in enumerate(np.array_split(np.arange(len(y)), 3)):  # several files, as the stage writes
        table = pa.table({
            "id": [f"r{i}" for i in rows], "harmful": y[rows], "source": ["toy"] * len(rows), "split": split[rows],
            "act_last_L1": pa.FixedSizeListArray.from_arrays(pa.array(x[rows].reshape(-1), pa.float16()), DIM),
        })
        pa.parquet.write_table(table, directory / "parts" / f"part-{part:05d}.parquet")
    return x.astype(np.float32), y, split


def test_train_rows_keeps_the_train_split() -> None:
    table = pa.table({"split": ["train", "test", "train"], "harmful": [True, False, False],
                      "f": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(6, dtype=np.float16)), 2)})
    rows = train_rows(table, "f", "harmful")
    np.testing.assert_array_equal(rows["x"], [[0, 1], [4, 5]])
    np.testing.assert_array_equal(rows["y"], [1.0, 0.0])


@pytest.mark.slow
def test_torch_trainer_learns_a_separable_set(ray_local: None, tmp_path: Path) -> None:
    import pyarrow.parquet  # noqa: F401 - registers pa.parquet
    from ray.data.dataset import MaterializedDataset

    x, y, split = _write_parts(tmp_path / "features")
    spec = TorchProbeSpec(enabled=True, workers=2, epochs=5, lr=0.1, batch_size=32, cpus_per_worker=0.5)
    features = resolve(str(tmp_path / "features"))
    # the workers read the parts through a lazy Ray Data read: no table on the driver (a small set like this one
    # is then cached in the object store, on the workers' side)
    dataset = train_dataset(features, "act_last_L1", "harmful")
    assert not isinstance(dataset, MaterializedDataset)
    assert "ReadFilesParquet" in repr(dataset) or "ReadParquet" in repr(dataset), repr(dataset)
    fitted = train_torch_probe(spec, features, "act_last_L1", "harmful", resolve(str(tmp_path / "train")))
    assert fitted["epochs"] == 5 and not fitted["use_gpu"]
    losses = [row["loss"] for row in fitted["history"]]
    assert len(losses) == 5 and losses[-1] < 0.5 * losses[0]
    # The standardisation is all-reduced over both workers' shards, so it is the whole train split's; without the
    # reduce, rank 0 (whose checkpoint this is) would hold its own half's (half the rows, means off by up to 0.3).
    train = split == "train"
    whole = x[train].astype(np.float64)
    np.testing.assert_allclose(fitted["mean"], whole.mean(axis=0), rtol=0, atol=1e-5)
    np.testing.assert_allclose(fitted["scale"], whole.std(axis=0), rtol=0, atol=1e-5)  # ddof=0, as StandardScaler
    assert [row["rows"] for row in fitted["history"]] == [int(train.sum())] * 5
    # one checkpoint per epoch was reported; the newest two are kept
    checkpoints = sorted(p.name for p in (tmp_path / "train" / "torch-probe-act_last_L1").glob("checkpoint_2*"))
    assert len(checkpoints) == 2

    artifact.save_linear(tmp_path / "probe", {"type": TORCH_PROBE_TYPE, "feature": "act_last_L1"},
                         fitted["weight"], fitted["bias"], fitted["mean"], fitted["scale"])
    loaded = probes.load(tmp_path / "probe")
    scores = loaded.score(x[~train])
    assert roc_auc_score(y[~train], scores) > 0.99
    assert np.mean((scores > 0) == y[~train]) > 0.95


def test_all_reduce_sum_is_a_no_op_outside_a_process_group() -> None:
    import torch

    tensor = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert all_reduce_sum(tensor) is tensor
    assert tensor.tolist() == [1.0, 2.0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Rank 1 of the group: a bare torch process (a spawned copy of this module would import sklearn, ray, ... first)
_PEER = """
import sys, datetime, torch, torch.distributed as dist
dist.init_process_group("gloo", init_method=sys.argv[1], rank=1, world_size=2, timeout=datetime.timedelta(seconds=60))
for dtype in (torch.float64, torch.float32, torch.int64):
    dist.all_reduce(torch.tensor([10, 20, 30], dtype=dtype, device=sys.argv[2]))
dist.destroy_process_group()
"""


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    "not __import__('torch').cuda.is_available()", reason="needs a CUDA device"))])
def test_all_reduce_sum_sums_over_a_gloo_group_on_the_tensors_device(device: str) -> None:
    """This process is rank 0 of a real 2-rank gloo group; the sums must come back in place, device and dtype kept."""
    import subprocess
    import sys
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    address = f"tcp://127.0.0.1:{_free_port()}"
    peer = subprocess.Popen([sys.executable, "-c", _PEER, address, device])
    try:
        dist.init_process_group("gloo", init_method=address, rank=0, world_size=2, timeout=timedelta(seconds=60))
        try:
            for dtype in (torch.float64, torch.float32, torch.int64):
                tensor = torch.tensor([1, 2, 3], dtype=dtype, device=device)
                result = all_reduce_sum(tensor)
                assert result is tensor, dtype
                assert (result.device.type, result.dtype) == (device, dtype)
                assert result.tolist() == [11, 22, 33], dtype
        finally:
            dist.destroy_process_group()
        assert peer.wait(timeout=60) == 0
    finally:
        peer.kill()
        peer.wait()
