"""Moved to `guardray.guard.vllm`; this name stays for existing imports (tests, benchmarks)."""
from guardray.guard.vllm import (CPU_ENGINE_DEFAULTS, CPU_ENV_DEFAULTS, ENV_DEFAULTS, VLLMGuard,  # noqa: F401
                                 check_spec, engine_args, label_sampling_params)
