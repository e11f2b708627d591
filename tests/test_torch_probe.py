"""The torch probe's pieces: its batch transform and its all-reduce helper on a real gloo process group. The
Ray Train run itself (2 CPU workers, DDP over gloo, checkpoints, linear artifact) is in tests/test_report.py,
inside the probes stage, so the suite pays for one Ray Train start."""
from __future__ import annotations

import socket

import numpy as np
import pyarrow as pa
import pytest

from guardray.probes.torch_probe import all_reduce_sum, train_rows


def test_train_rows_keeps_the_train_split() -> None:
    table = pa.table({"split": ["train", "test", "train"], "harmful": [True, False, False],
                      "f": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(6, dtype=np.float16)), 2)})
    rows = train_rows(table, "f", "harmful")
    np.testing.assert_array_equal(rows["x"], [[0, 1], [4, 5]])
    np.testing.assert_array_equal(rows["y"], [1.0, 0.0])


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
