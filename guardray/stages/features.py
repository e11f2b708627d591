"""The features stage: the chat model's activations at every chosen layer and pooling, and the guard's scores, in
one pass over the prompts (or the responses stage's prompts and answers) (`guardray.features`)."""
from __future__ import annotations

from typing import Any

from guardray.jobspec import JobSpec
from guardray.stages.base import Stage


def features_key(spec: JobSpec) -> dict[str, Any]:
    return {"model": spec.model.cache_payload(), "extract": spec.extract.cache_payload(),
            "guard": spec.guard.cache_payload(), "device_class": spec.device_class}


def prompts_from(spec: JobSpec) -> tuple[str, ...]:
    """The stage whose `dataset.parquet` it reads: the responses when there are any."""
    return ("responses",) if spec.generate.enabled else ("dataset",)


# 2: parts named by row range; 3: special tokens in user text are read as plain text; 4: each activation column
# carries its layer and pooling as field metadata (columns.feature_info), which the readers need
STAGE = Stage("features", inputs=prompts_from, key=features_key, run="guardray.features:run_features", format=4,
              needs_ray=True, resumable=True)
