"""The report stage: every row scored by every refit probe and the guard, compared per target
(`guardray.report`)."""
from __future__ import annotations

from typing import Any

from guardray.jobspec import JobSpec
from guardray.stages.base import Stage, feedback_key
from guardray.stages.responses import generates


def report_key(spec: JobSpec) -> dict[str, Any]:
    # Scores come from the inputs; the report adds thresholds/metrics (evaluate), the labels and the title; the
    # feedback thresholds define the feedback labels and the mined prompts (whenever responses are judged).
    # The category mapping picks the guard column a cat_<name> target is compared with.
    from guardray.columns import CATEGORY_PREFIX
    from guardray.targets import category_codes, uses_feedback

    names = spec.probes.all_targets
    reads_feedback = uses_feedback(names) or spec.judges_responses
    categories = {"category_codes": category_codes(spec)} if any(t.startswith(CATEGORY_PREFIX) for t in names) else {}
    return {"evaluate": spec.evaluate.cache_payload(), "targets": list(names), "job": spec.name,
            **feedback_key(spec, reads_feedback), **categories}


def report_inputs(spec: JobSpec) -> tuple[str, ...]:
    return ("features", "probes", *(("responses",) if generates(spec) else ()))


STAGE = Stage("report", inputs=report_inputs, key=report_key, run="guardray.report:run_report", format=2,
              needs_ray=True)
