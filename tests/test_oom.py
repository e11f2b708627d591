"""Out of memory is not a dead device: a batch that does not fit is split in halves down to one row, on the real
(tiny) chat model with an allocation failure injected above a size; a device failure that repeats on one row
ends as that row's error after at most two restarts, never a loop."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from guardray.features import FeatureExtractor
from guardray.isolation import (DEVICE_FAILURE_MARKERS, CrashMemory, DeviceFailure, is_device_failure,
                                is_out_of_memory, run_isolating)
from guardray.jobspec import validate_spec
from guardray.storage import resolve
from tests.conftest import small_spec
from tests.models import build_tiny

OOM_MESSAGES = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB",
                "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")


def test_an_allocation_failure_is_not_a_device_failure() -> None:
    for message in OOM_MESSAGES:
        assert is_out_of_memory(RuntimeError(message)) and not is_device_failure(RuntimeError(message)), message
    assert not any(marker in OOM_MESSAGES[0] or marker in OOM_MESSAGES[2] for marker in DEVICE_FAILURE_MARKERS)
    assert is_out_of_memory(torch.OutOfMemoryError("anything")) and not is_device_failure(torch.OutOfMemoryError("x"))
    assert is_device_failure(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"))


PROMPTS = ["hi", "hello there", "how are you", "what is two plus two", "tell me a joke", "name a colour",
           "good morning to you", "please write " + "a very long sentence that goes on and on " * 6]


@pytest.fixture(scope="module")
def extractor(tmp_path_factory: pytest.TempPathFactory) -> FeatureExtractor:
    model = build_tiny(tmp_path_factory.mktemp("tiny") / "llama")
    spec = validate_spec(small_spec("unused", model={"id": model, "max_length": 128, "device": "cpu"},
                                    extract={"layers": [-1], "poolings": ["last", "mean"], "batch_size": 8},
                                    guard={"enabled": False}))
    return FeatureExtractor.from_spec(spec)


def _with_memory_limit(extractor: FeatureExtractor, rows: int, width: int, calls: list[tuple[int, Any]]) -> Any:
    """Fail every forward over more than `rows` rows or `width` tokens as the CUDA allocator would."""

    def allocate(module: Any, args: tuple) -> None:
        ids = args[0]
        calls.append((ids.shape[0], sys.exc_info()[1]))  # an exception still being handled pins the last try
        if ids.shape[0] > rows or ids.shape[1] > width:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {ids.numel()} MiB")

    return extractor.chat.model.get_input_embeddings().register_forward_pre_hook(allocate)


def test_a_batch_that_does_not_fit_is_halved_and_a_row_too_big_alone_is_one_error(
        extractor: FeatureExtractor) -> None:
    expected, no_errors = extractor.process(PROMPTS)
    assert not no_errors
    widths = [extractor.renderer.encode_many([p])[0].n_tokens for p in PROMPTS]
    assert max(widths[:-1]) < widths[-1]  # the last prompt is the only long one
    calls: list[tuple[int, Any]] = []
    handle = _with_memory_limit(extractor, rows=2, width=max(widths[:-1]), calls=calls)
    try:
        columns, errors = extractor.process(PROMPTS)
    finally:
        handle.remove()
    # 8 rows (sorted, the long one last): 8 x, 4 x, 2 ok, 2 ok, 4 x, 2 ok, 2 x (the long one), 1 ok, 1 x
    assert [n for n, _ in calls] == [8, 4, 2, 2, 4, 2, 2, 1, 1]
    assert all(handled is None for _, handled in calls), "a retry ran inside the except block"
    assert list(errors) == [7] and errors[7].startswith("activations: out of memory even alone: OutOfMemoryError")
    assert "\n" not in errors[7]
    assert columns["_index"] == list(range(7))
    for name in extractor.columns:
        np.testing.assert_allclose(columns[name], expected[name][:7], rtol=1e-3, atol=1e-3)


def test_a_row_that_breaks_the_device_becomes_its_error_after_two_restarts(tmp_path: Path) -> None:
    memory_file = resolve(str(tmp_path)).join("crashes", "part-0.json")
    done: list[int] = []

    def run(rows: list[int]) -> None:
        if 3 in rows:
            raise RuntimeError("CUDA error: device-side assert triggered")
        done.extend(rows)

    restarts = 0
    while True:  # what Ray does: a fresh actor (fresh memory object) retries the shard
        crashes, errors = CrashMemory(), {}
        crashes.load(memory_file)
        try:
            run_isolating([[0, 1], [2, 3, 4], [5]], run, errors, "activations", crashes, free=lambda: None)
            break
        except DeviceFailure as e:
            crashes.save(memory_file, str(e))
            restarts += 1
            assert restarts <= 2, "the same row keeps restarting the actor"
    assert restarts == 2
    assert list(errors) == [3] and errors[3].startswith("activations: skipped: it broke the device when run alone")
    assert sorted(set(done)) == [0, 1, 2, 4, 5]
