"""The stages of a job, in pipeline order: one module each, holding what the stage is (`stages.base.Stage`).

spec → dataset → (responses) → features → probes → report. A job without `generate` has no responses stage
(`Stage.enabled`), and its features read the dataset.
"""
from guardray.stages import dataset, features, probes, report, responses
from guardray.stages.base import Stage

STAGES: dict[str, Stage] = {m.STAGE.name: m.STAGE for m in (dataset, responses, features, probes, report)}

__all__ = ["STAGES", "Stage"]
