"""What breaks the first time guardray meets a GPU cluster, checked on the CPU where the failure can be built:
checkpoints a CUDA worker wrote, read on a CPU-only driver; which device an actor may use; the vLLM guard's
memory share beside the chat model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.serialization

from guardray.probes.torch_probe import load_state, save_state


def _trained_state() -> dict:
    """A checkpoint as `train_loop` writes it: model, AdamW state (with its step tensors), statistics."""
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    mean = torch.zeros(4, dtype=torch.float64)
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0,
            "history": [{"loss": 0.5}], "mean": mean, "scale": mean + 1}


def test_a_checkpoint_from_a_cuda_worker_loads_on_a_cpu_only_driver(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "probe.pt"
    with monkeypatch.context() as patch:  # what torch.save records for storages on cuda:0
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(_trained_state(), path)
    with pytest.raises(RuntimeError, match="deserialize object on a CUDA device"):
        torch.load(path, weights_only=True)  # the driver's read before the fix
    state = load_state(path)
    assert state["model"]["weight"].device.type == "cpu" and state["optimizer"]["state"][0]["exp_avg"].shape == (1, 4)


def test_the_saved_checkpoint_holds_host_tensors_only(tmp_path: Path) -> None:
    path = tmp_path / "probe.pt"
    state = _trained_state()
    state["model"]["weight"].requires_grad_(True)
    save_state(state, path)
    locations: list[str] = []

    def record(storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage:
        locations.append(location)
        return storage

    loaded = torch.load(path, map_location=record, weights_only=True)
    assert locations and set(locations) == {"cpu"}
    assert not loaded["model"]["weight"].requires_grad  # detached: a plain array of numbers, not a graph leaf
    assert loaded["history"] == [{"loss": 0.5}] and loaded["mean"].dtype == torch.float64


# ------------------------------------------------------------------------------------------- GPU visibility
def test_an_actor_given_no_gpu_computes_on_the_cpu_even_where_cuda_is_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    from guardray.accelerators import device_for
    from guardray.models import resolve_device

    assert device_for([], cuda_visible=True) == "cpu"  # a CPU actor on a GPU node, a replica with num_gpus: 0
    assert device_for(["0"], cuda_visible=True) == "cuda"
    assert device_for(["0"], cuda_visible=False) is None  # Ray's GPU, torch blind to it: the actor's error
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a node whose GPUs the process can see
    assert resolve_device("auto", "cpu").type == "cpu"  # the actor's device, not a second look at CUDA
    assert resolve_device("auto").type == "cuda"  # outside an actor: what torch sees
    assert resolve_device("cpu", "cuda").type == "cpu"  # an explicit device is the user's


# -------------------------------------------------------------------------------- vLLM guard beside the chat model
GIB = 1 << 30


def test_the_guard_engine_gets_the_memory_left_after_the_chat_model() -> None:
    from guardray.guard.vllm import memory_share

    total, free, weights = 80 * GIB, 62 * GIB, 16 * GIB  # an H100 with an 8B chat model in bf16 loaded
    share = memory_share(free, total, weights)
    assert share == 0.675  # (62 - 8 GiB headroom for the chat model's forward passes) / 80
    assert share * total <= free - 8 * GIB  # vLLM refuses a share larger than what is free
    assert share * total >= weights + GIB  # the guard's weights and a KV cache fit in it


def test_a_guard_that_cannot_fit_fails_at_start_in_one_line(tmp_path: Path) -> None:
    from guardray.errors import InputError
    from guardray.guard.vllm import engine_args, memory_share
    from guardray.jobspec import GuardSpec, ModelSpec

    with pytest.raises(InputError) as refused:
        memory_share(20 * GIB, 80 * GIB, 16 * GIB)  # 20 free, 8 headroom: 12 left for 17 needed
    message = str(refused.value)
    assert "\n" not in message and "20.0 GiB of the GPU's 80.0 GiB are free" in message
    assert "guard.vllm_engine_args.gpu_memory_utilization" in message
    (tmp_path / "config.json").write_text("{}")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 1024)
    model = ModelSpec(id=str(tmp_path), dtype="bfloat16")
    args = engine_args(model, GuardSpec(), on_gpu=True, gpu_memory=(40 * GIB, 80 * GIB))
    assert args["gpu_memory_utilization"] == 0.4  # (40 - 8) / 80
    with weights.open("r+b") as f:
        f.truncate(33 * GIB)  # sparse: the size of a larger guard's weights, none of its disk
    with pytest.raises(InputError, match="the guard needs about 34.0 GiB"):
        engine_args(model, GuardSpec(), on_gpu=True, gpu_memory=(40 * GIB, 80 * GIB))
    pinned = GuardSpec(vllm_engine_args={"gpu_memory_utilization": 0.3})
    assert engine_args(model, pinned, on_gpu=True, gpu_memory=(GIB, 80 * GIB))["gpu_memory_utilization"] == 0.3
    assert "gpu_memory_utilization" not in engine_args(model, GuardSpec(), on_gpu=False)
