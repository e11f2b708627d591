"""The job spec: what a guardray job *is*, read from YAML, validated and frozen.

Layers, bottom up: `checks` (value checks against untrusted input), the schema (`schema`, `dataset`, `job`: the
pydantic sections, importing nothing above them), `problems` (one-line errors), `validate` (`validate_job`: the
checks that need the stages' registries) and `loading` (YAML, `--set`, `load_spec`). `links` hands the dataset
rules of guardray.datasets to the schema. The public names are handed on here.
"""
from guardray.jobspec.checks import (SAFETY_ENGINE_ARGS, DeviceName, EngineArgs, check_engine_args,  # noqa: F401
                                     check_hub_id, check_model_id, check_relative)
from guardray.jobspec.dataset import (DatasetSpec, FileSource, HuggingFaceSource, LabelledColumns,  # noqa: F401
                                      PackagedSource, Source, SourceBase, SplitSpec, SubsampleSpec)
from guardray.jobspec.job import (FEEDBACK_TARGETS, MAX_GRID_POINTS, CVSpec, EvaluateSpec, FeedbackSpec,  # noqa: F401
                                  JobSpec, ProbeGridEntry, ProbesSpec, TorchProbeSpec)
from guardray.jobspec.links import link_datasets
from guardray.jobspec.loading import (MAX_DEPTH, MAX_EXPANDED, MAX_SPEC_BYTES, DuplicateKeyError,  # noqa: F401
                                      SpecLimitError, StrictSafeLoader, apply_override, load_spec, spec_for_worker,
                                      validate_spec)
from guardray.jobspec.schema import (BUILTIN_CATEGORY_CODES, SPEED_ONLY_ENGINE_ARGS,  # noqa: F401
                                     ActorPoolSpec, CustomCategory, ExtractSpec, GenerateSpec, GuardSpec, ModelSpec,
                                     RaySpec, Section, device_class)
from guardray.jobspec.validate import validate_job  # noqa: F401

link_datasets()
