"""The responses stage (the spec's `generate:` section): the chat model answers every prompt
(`guardray.responses`), so the features stage reads prompt and answer."""
from __future__ import annotations

from typing import Any

from guardray.jobspec import JobSpec, device_class
from guardray.stages.base import Stage


def responses_key(spec: JobSpec) -> dict[str, Any]:
    """The chat model, the generation settings and the device class the responses are computed on (as
    `JobSpec.device_class`, but read from `generate.accelerator`, which is what places this stage's actors)."""
    declared = device_class(spec.model.device)
    device = declared if declared != "auto" else {"gpu": "cuda", "cpu": "cpu"}.get(spec.generate.accelerator, "auto")
    return {"model": spec.model.cache_payload(), "generate": spec.generate.cache_payload(), "device_class": device}


def generates(spec: JobSpec) -> bool:
    return spec.generate.enabled


# 3: special tokens in user text are read as plain text (tokenizing.OffsetTokenizer.as_data)
STAGE = Stage("responses", inputs=("dataset",), key=responses_key, run="guardray.responses.stage:run_responses", format=3,
              needs_ray=True, resumable=True, enabled=generates)
