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
