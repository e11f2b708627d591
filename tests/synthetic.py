"""Synthetic features-stage output for probe and report tests: real parquet parts in the stage's layout."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_feature_parts(stage: Path, columns: dict[str, tuple[int, float]], rows: int = 600, parts: int = 3,
                        seed: int = 0, guard: bool = True, unlabelled_every: int = 0) -> dict[str, np.ndarray]:
    """Write `stage/parts/part-*.parquet` with `columns` = {name: (width, signal)}: each column is Gaussian noise
    plus `signal` × the label along a random direction (0 = noise only), stored as float16 like the stage.

    Every `unlabelled_every`-th row has a null label (a source without that label). Returns the labels (with a
    `labelled` mask), splits and float32 matrices, for checks.
    """
    rng = np.random.default_rng(seed)
    y = rng.random(rows) < 0.5
    split = np.where(rng.random(rows) < 0.25, "test", "train")
    labelled = np.ones(rows, bool) if not unlabelled_every else np.arange(rows) % unlabelled_every != 0
    data: dict[str, np.ndarray] = {"harmful": y, "split": split, "labelled": labelled}
    for name, (dim, signal) in columns.items():
        direction = rng.normal(size=dim)
        direction /= np.linalg.norm(direction)
        x = rng.normal(size=(rows, dim)) + signal * np.outer(np.where(y, 1.0, -1.0), direction)
        data[name] = x.astype(np.float16).astype(np.float32)
    guard_score = np.where(y, 1.0, -1.0) + rng.normal(scale=2.0, size=rows)  # a weak guard
    (stage / "parts").mkdir(parents=True, exist_ok=True)
    for rows_of_part in np.array_split(np.arange(rows), parts):
        start, end = int(rows_of_part[0]), int(rows_of_part[-1]) + 1
        harmful = pa.array(y[rows_of_part], mask=~labelled[rows_of_part])
        table = {"id": [f"r{i}" for i in rows_of_part], "harmful": harmful,
                 "source": np.where(rows_of_part % 2 == 0, "even", "odd"), "split": split[rows_of_part]}
        if guard:
            table["guard_score"] = pa.array(guard_score[rows_of_part], pa.float32())
        for name, (dim, _) in columns.items():
            flat = pa.array(data[name][rows_of_part].astype(np.float16).reshape(-1), pa.float16())
            table[name] = pa.FixedSizeListArray.from_arrays(flat, dim)
        pq.write_table(pa.table(table), stage / "parts" / f"part-{start:012d}-{end:012d}.parquet",
                       row_group_size=256)
    data["guard_score"] = guard_score
    return data
