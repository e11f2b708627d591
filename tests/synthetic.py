"""Synthetic features-stage output for probe and report tests: real parquet parts in the stage's layout."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from guardray.columns import feature_column, with_feature_metadata


def write_feature_parts(stage: Path, features: dict[tuple[str, int], tuple[int, float]], rows: int = 600,
                        parts: int = 3, seed: int = 0, guard: bool = True, unlabelled_every: int = 0,
                        feedback: bool = False) -> dict[str, np.ndarray]:
    """Write `stage/parts/part-*.parquet` with `features` = {(pooling, layer): (width, signal)}: each activation
    column is Gaussian noise plus `signal` × the label along a random direction (0 = noise only), stored as
    float16 with its layer and pooling in its field metadata, like the stage.

    Every `unlabelled_every`-th row has a null label (a source without that label). Returns the labels (with a
    `labelled` mask), splits and float32 matrices, for checks.

    `feedback` adds what a job with responses and guard categories writes: `guard_response_score` (every 13th
    row null: a response the guard could not judge), whose sign (`response_unsafe` at threshold 0) is planted
    in every column with the same signal along a direction of its own; `cat_violence` (every 7th row null,
    planted likewise) and a weak `guard_cat_S1`. The input guard knows nothing of either.
    """
    rng = np.random.default_rng(seed)
    columns = {feature_column(*key): value for key, value in features.items()}
    identities = {feature_column(*key): key for key in features}
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
    if feedback:
        data.update(_feedback_labels(rng, rows, columns, data))
    (stage / "parts").mkdir(parents=True, exist_ok=True)
    for rows_of_part in np.array_split(np.arange(rows), parts):
        start, end = int(rows_of_part[0]), int(rows_of_part[-1]) + 1
        harmful = pa.array(y[rows_of_part], mask=~labelled[rows_of_part])
        table = {"id": [f"r{i}" for i in rows_of_part], "harmful": harmful,
                 "source": np.where(rows_of_part % 2 == 0, "even", "odd"), "split": split[rows_of_part],
                 "n_tokens": pa.array(20 + rows_of_part % 97, pa.int32())}  # rendered length, as the stage writes
        if guard:
            table["guard_score"] = pa.array(guard_score[rows_of_part], pa.float32())
        if feedback:
            table["cat_violence"] = pa.array(data["cat_violence"][rows_of_part], mask=~data["cat_known"][rows_of_part])
            table["guard_response_score"] = pa.array(data["guard_response_score"][rows_of_part], pa.float32(),
                                                     mask=~data["judged"][rows_of_part])
            table["guard_cat_S1"] = pa.array(data["guard_cat_S1"][rows_of_part], pa.float32())
        for name, (dim, _) in columns.items():
            flat = pa.array(data[name][rows_of_part].astype(np.float16).reshape(-1), pa.float16())
            table[name] = pa.FixedSizeListArray.from_arrays(flat, dim)
        pq.write_table(with_feature_metadata(pa.table(table), identities),
                       stage / "parts" / f"part-{start:012d}-{end:012d}.parquet", row_group_size=256)
    data["guard_score"] = guard_score
    return data


def _feedback_labels(rng: np.random.Generator, rows: int, columns: dict[str, tuple[int, float]],
                     data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Response-guard scores and a category label, planted in the feature columns (see `write_feature_parts`)."""
    response = np.where(rng.random(rows) < 0.3, 2.0, -2.0) + rng.normal(scale=0.7, size=rows)
    response = response.astype(np.float32).astype(np.float64)  # as stored
    violence = rng.random(rows) < 0.4
    out = {"guard_response_score": response, "judged": np.arange(rows) % 13 != 5,
           "cat_violence": violence, "cat_known": np.arange(rows) % 7 != 3,
           "guard_cat_S1": np.where(violence, 0.5, -0.5) + rng.normal(scale=2.0, size=rows)}
    for name, (dim, signal) in columns.items():
        x = data[name].astype(np.float64)
        for latent in (response > 0, violence):
            direction = rng.normal(size=dim)
            x += signal * np.outer(np.where(latent, 1.0, -1.0), direction / np.linalg.norm(direction))
        data[name] = x.astype(np.float16).astype(np.float32)
    return out
