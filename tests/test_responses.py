"""The responses stage (`generate:`): batched generation equals per-prompt generation, and the stage on a real
Ray runtime is exactly-once, resumable, records failing rows, and feeds the features stage."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import torch

from guardray.cache import StageDir
from guardray.decoding import split_stop
from guardray.models import LoadedModel, load_model
from guardray.rendering import chat_renderer
from guardray.responses.hf import HFGenerator
from guardray.runner import plan, run_job
from guardray.stages import STAGES
from guardray.stages.features import features_key
from guardray.jobspec import GenerateSpec, ModelSpec, validate_spec
from guardray.storage import resolve
from tests.conftest import small_spec
from tests.models import build_tiny

SMOL = ModelSpec(id="smollm2-135m-instruct", dtype="float32", max_length=256)
PROMPTS = [
    "hi",
    "Say only the word yes.",  # SmolLM2 answers "Yes." and stops after 2 tokens
    "Write a haiku about autumn leaves falling",
    "Summarise the plot of Hamlet in three sentences, then list its main characters. " * 4,  # ~4x longer
    "What is 2+2? Answer with a single digit.",  # "The answer is 4." and a stop
]


@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    return load_model(SMOL)


def test_batched_left_padded_greedy_equals_unbatched_generate(smol: LoadedModel) -> None:
    """One left-padded batch of very different lengths gives, per prompt, exactly the tokens a plain
    unpadded `model.generate` gives."""
    renderer = chat_renderer(smol.tokenizer, SMOL)
    encoded = [renderer.encode(p) for p in PROMPTS]
    assert max(len(e.ids) for e in encoded) > 3 * min(len(e.ids) for e in encoded)
    generator = HFGenerator(smol, GenerateSpec(max_new_tokens=8))
    batched = generator.generate(encoded, PROMPTS)
    for prompt, e, got in zip(PROMPTS, encoded, batched):
        with torch.inference_mode():
            out = smol.model.generate(torch.tensor([e.ids]), max_new_tokens=8, do_sample=False)
        assert got == split_stop(out[0, len(e.ids):].tolist(), (2,), 8), prompt
    assert batched[1].finish_reason == "stop" and smol.tokenizer.decode(batched[1].tokens) == "Yes."
    assert [g.finish_reason for g in batched] == ["length", "stop", "length", "length", "stop"]
    assert all(len(g.tokens) == 8 for g in batched if g.finish_reason == "length")


def test_sampling_is_seeded(smol: LoadedModel) -> None:
    renderer = chat_renderer(smol.tokenizer, SMOL)
    encoded = [renderer.encode(p) for p in PROMPTS[:3]]
    draw = lambda seed: HFGenerator(smol, GenerateSpec(max_new_tokens=4, temperature=1.0, seed=seed)).generate(  # noqa: E731
        encoded, PROMPTS[:3])
    assert draw(1) == draw(1) and draw(1) != draw(2)


def _spec(output: str, model: dict, **generate) -> object:
    return validate_spec(small_spec(
        output, model=model, extract={"layers": [-1], "poolings": ["last"], "rows_per_shard": 8},
        guard={"enabled": False},
        generate={"enabled": True, "max_new_tokens": 4, "batch_size": 4, "rows_per_shard": 4, **generate},
        dataset={"sources": [{"type": "advbench", "limit": 3}, {"type": "normal_instructions"},
                             {"type": "sharegpt", "limit": 3}]},
    ))


def _ids_once(stage: str, dataset: pa.Table) -> pa.Table:
    """Parts ∪ errors hold every dataset id exactly once; returns the parts."""
    parts = resolve(stage).join("parts").read_table()
    errors = resolve(stage).join("errors.parquet").read_table()
    ids = parts.column("id").to_pylist() + errors.column("id").to_pylist()
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(dataset.column("id").to_pylist())
    return parts


def test_responses_stage_exactly_once_resumes_and_writes_its_dataset(ray_local: None, tmp_path: Path) -> None:
    spec = _spec(str(tmp_path), SMOL.model_dump())
    first = run_job(spec, ["responses"])
    stage, summary = resolve(first["responses"]["dir"]), first["responses"]
    dataset = resolve(first["dataset"]["dir"]).join("dataset.parquet").read_table()
    parts = _ids_once(stage.uri, dataset)
    assert summary["rows"] == dataset.num_rows == 11 and summary["errors"] == 0 and summary["shards_run"] == 3
    answered = stage.join("dataset.parquet").read_table()
    assert answered.column_names == [*dataset.column_names, "response", "response_tokens", "finish_reason"]
    assert answered.column("id").to_pylist() == dataset.column("id").to_pylist()  # dataset order
    assert answered.schema.field("response_tokens").type == pa.list_(pa.int32())
    assert set(answered.column("finish_reason").to_pylist()) <= {"stop", "length"}
    assert all(r.strip() for r in answered.column("response").to_pylist())

    # Resume: an interrupted run left all parts but one; only that range is redone, the ids still land once.
    stage.join("_SUCCESS").delete_file()
    stage.join("dataset.parquet").delete_file()
    stage.join("parts", "part-000000000004-000000000008.parquet").delete_file()
    second = run_job(spec, ["responses"])["responses"]
    assert second["status"] == "ran" and second["shards_skipped"] == 2 and second["shards_run"] == 1
    assert second["processed_this_run"] == 4
    _ids_once(stage.uri, dataset)
    assert stage.join("dataset.parquet").read_table().equals(answered)  # greedy: the same answers again
    assert parts.num_rows == 11


def test_failing_rows_go_to_errors(ray_local: None, tmp_path: Path) -> None:
    """GPT-2 has learned positions: with 64 of them, prompts whose rendering plus 4 new tokens is longer fail
    inside `generate`; they become error rows and the others still land in dataset.parquet (that the features
    stage reads only those rows is checked end to end in tests/test_end_to_end.py)."""
    model = build_tiny(tmp_path / "gpt2", kind="gpt2", n_positions=64)
    spec = _spec(str(tmp_path / "out"), {"id": model, "max_length": 128}, max_error_fraction=1.0, batch_size=8)
    results = run_job(spec, ["responses"])
    assert list(results) == ["dataset", "responses"]
    responses = results["responses"]
    errors = resolve(responses["dir"]).join("errors.parquet").read_table().to_pylist()
    assert responses["rows"] > 0 and responses["errors"] == len(errors) > 0
    assert all(e["reason"].startswith("generate: IndexError") for e in errors)
    answered = resolve(responses["dir"]).join("dataset.parquet").read_table()
    dataset = resolve(results["dataset"]["dir"]).join("dataset.parquet").read_table()
    assert answered.num_rows == responses["rows"] == dataset.num_rows - len(errors)


def test_stage_hashes(tmp_path: Path) -> None:
    """Jobs without `generate` keep their stage hashes; the responses key follows what changes the answers."""
    base = validate_spec(small_spec(str(tmp_path)))
    dirs = plan(base)
    assert list(dirs) == ["dataset", "features", "probes", "report"]
    before = StageDir.for_stage(resolve(str(tmp_path)), "features", features_key(base), {"dataset": dirs["dataset"].name},
                               format=STAGES["features"].format)
    assert dirs["features"].name == before.name  # the key the runner computed before the responses stage existed
    assert plan(validate_spec(small_spec(str(tmp_path), generate={"max_new_tokens": 9}))) == dirs  # off: no effect

    def names(**generate) -> dict[str, str]:
        spec = validate_spec(small_spec(str(tmp_path), generate={"enabled": True, **generate}))
        return {name: d.name for name, d in plan(spec).items()}

    on = names()
    assert list(on) == ["dataset", "responses", "features", "probes", "report"]
    assert on["features"] != dirs["features"].name  # features now chain through the responses
    for change in ({"max_new_tokens": 9}, {"temperature": 0.7}, {"backend": "vllm"}):
        assert names(**change)["responses"] != on["responses"], change
    assert names(accelerator="gpu")["responses"] != on["responses"]  # the device class computing the answers
    for same in ({"actors": 3, "batch_size": 2, "rows_per_shard": 7}, {"seed": 5, "top_p": 0.9}):
        assert names(**same) == on, same  # runtime fields, and sampling settings when greedy
    assert names(temperature=0.7, seed=1)["responses"] != names(temperature=0.7, seed=2)["responses"]
    spec = validate_spec(small_spec(str(tmp_path), generate={"enabled": True}))
    assert plan(spec)["report"].key["inputs"].keys() == {"features", "probes", "responses"}


def test_a_conversation_row_is_answered_after_its_history_and_a_bad_one_is_its_own_error(smol: LoadedModel) -> None:
    """The reply continues the whole conversation (the same ids `apply_chat_template` gives it); a row whose
    messages broke a rule (an InputError in its place) is that row's error, the others are answered."""
    from guardray.chats import Chat
    from guardray.errors import InputError
    from guardray.responses.hf import Responder

    responder = Responder(chat_renderer(smol.tokenizer, SMOL), HFGenerator(smol, GenerateSpec(max_new_tokens=4)),
                          GenerateSpec(max_new_tokens=4), smol.tokenizer)
    chat = Chat("And the word after that?", (("user", "Say only the word yes."), ("assistant", "Yes.")))
    done, errors = responder.process([chat, InputError("messages is an empty conversation"), "hi"], ["a", "b", "c"])
    assert sorted(done) == [0, 2] and errors == {1: "messages is an empty conversation"}
    ids = smol.tokenizer.apply_chat_template(chat.messages(SMOL.system_prompt), tokenize=True,
                                             add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with torch.inference_mode():
        out = smol.model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    assert done[0] == split_stop(out[0, len(ids):].tolist(), (2,), 4)


def test_generation_batches_default_by_backend_and_accelerator() -> None:
    """vLLM on a GPU gets 128 prompts per batch (its scheduler decodes that many sequences at once); HF
    generation and CPUs keep 16; a spec's own batch_size always wins."""
    from guardray.jobspec import GenerateSpec

    assert GenerateSpec(backend="vllm").rows_per_batch("gpu") == 128
    assert GenerateSpec(backend="vllm").rows_per_batch("cpu") == GenerateSpec().rows_per_batch("gpu") == 16
    assert GenerateSpec(backend="vllm", batch_size=3).rows_per_batch("gpu") == 3
