"""The torch probe on a real Ray Train run: 2 CPU workers with DDP, checkpoints each epoch, linear artifact."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import roc_auc_score

from guardray import probes
from guardray.probes import artifact
from guardray.probes.torch_probe import TORCH_PROBE_TYPE, train_rows, train_torch_probe
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

    x, y, split = _write_parts(tmp_path / "features")
    spec = TorchProbeSpec(enabled=True, workers=2, epochs=5, lr=0.1, batch_size=32, cpus_per_worker=0.5)
    fitted = train_torch_probe(spec, resolve(str(tmp_path / "features")), "act_last_L1", "harmful", DIM,
                               resolve(str(tmp_path / "train")))
    assert fitted["epochs"] == 5 and not fitted["use_gpu"]
    losses = [row["loss"] for row in fitted["history"]]
    assert len(losses) == 5 and losses[-1] < 0.5 * losses[0]
    train = split == "train"
    np.testing.assert_allclose(fitted["mean"], x[train].mean(axis=0), rtol=1e-3, atol=1e-3)
    # one checkpoint per epoch was reported; the newest two are kept
    checkpoints = sorted(p.name for p in (tmp_path / "train" / "torch-probe-act_last_L1").glob("checkpoint_2*"))
    assert len(checkpoints) == 2

    artifact.save_linear(tmp_path / "probe", {"type": TORCH_PROBE_TYPE, "feature": "act_last_L1"},
                         fitted["weight"], fitted["bias"], fitted["mean"], fitted["scale"])
    loaded = probes.load(tmp_path / "probe")
    scores = loaded.score(x[~train])
    assert roc_auc_score(y[~train], scores) > 0.99
    assert np.mean((scores > 0) == y[~train]) > 0.95
