"""The probes stage: every (feature column, probe type, target) cross-validated in parallel with Ray Tune, the best
refit where the data is and saved as portable artifacts (`guardray.probes.cv`)."""
from __future__ import annotations

from typing import Any

from guardray.jobspec import JobSpec
from guardray.stages.base import Stage, feedback_key


def probes_key(spec: JobSpec) -> dict[str, Any]:
    from guardray.targets import uses_feedback

    left_out = {"leave_one_source_out": list(spec.sources_left_out)} if spec.sources_left_out else {}
    return {**spec.probes.cache_payload(), **feedback_key(spec, uses_feedback(spec.probes.all_targets)), **left_out}


# 3: artifacts record the model spec, features dtype and guard; 4: their numerics (serving)
STAGE = Stage("probes", inputs=("features",), key=probes_key, run="guardray.probes.cv:run_probes", format=4,
              needs_ray=True)
