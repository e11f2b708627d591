"""The `max` and `ema` poolings on a tiny random Llama: each against a numpy computation over the same user span
of a plain transformers forward, the linearity that makes `ema` a streaming monitor's smoothed score, padding,
the spec and cache key, the features extractor, and a server running a probe on them."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from guardray.activations import Batch, capture, pool
from guardray.columns import EMA_HALF_LIFE_TOKENS, PROMPT_POOLINGS, feature_infos
from guardray.errors import SpecError
from guardray.jobspec import ModelSpec, validate_spec
from guardray.models import LoadedModel, load_model
from guardray.probes import artifact
from guardray.rendering import Encoded, chat_renderer
from guardray.storage import resolve
from tests.conftest import small_spec
from tests.models import build_tiny

LAYERS = [1, 2]
LONG = ("I have been reading about chemistry for a school project and I keep thinking about the experiments in "
        "the textbook, the ones with acids and bases and colour changes, and my teacher said we could pick any "
        "topic we like as long as it is safe, so tell me how to make a dangerous gas at home.")
PROMPTS = ["hi", "Write a haiku about autumn leaves falling", LONG]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def tiny(tiny_path: str) -> LoadedModel:
    return load_model(ModelSpec(id=tiny_path, max_length=256))


def _batch(loaded: LoadedModel, prompts: list[str], left: bool = False) -> tuple[Batch, list[Encoded]]:
    encoded = [chat_renderer(loaded.tokenizer, loaded.spec).encode(p) for p in prompts]
    return Batch.build(encoded, loaded.tokenizer.pad_token_id, loaded.device, left), encoded


def _plain_spans(loaded: LoadedModel) -> tuple[dict[str, Any], list[Encoded]]:
    """capture()'s poolings on a right-padded batch, and each row's user span of a plain forward of that batch
    with `output_hidden_states` (block L's output is hidden_states[L + 1])."""
    batch, encoded = _batch(loaded, PROMPTS)
    assert batch.attention_mask.sum(dim=1).unique().numel() == len(PROMPTS)  # really padded
    got = capture(loaded.model, batch, LAYERS, ["max", "ema", "mean"], stop_early=False)
    with torch.no_grad():
        hidden = loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              output_hidden_states=True).hidden_states
    spans = {layer: [hidden[layer + 1][row, e.user_start:e.user_end].double().numpy()
                     for row, e in enumerate(encoded)] for layer in LAYERS}
    return {"got": got, "spans": spans}, encoded


def _ema_weights(n: int) -> np.ndarray:
    weights = 2.0 ** (-np.arange(n - 1, -1, -1) / EMA_HALF_LIFE_TOKENS)  # the span's last token weighs 1
    return weights / weights.sum()


def test_max_is_the_numpy_max_over_the_user_span_of_a_plain_forward(tiny: LoadedModel) -> None:
    data, encoded = _plain_spans(tiny)
    assert all(e.user_end - e.user_start >= 1 for e in encoded) and encoded[2].user_end - encoded[2].user_start > 48
    for layer in LAYERS:
        for row, span in enumerate(data["spans"][layer]):
            got = data["got"][("max", layer)][row].double().numpy()
            np.testing.assert_allclose(got, span.max(axis=0), atol=1e-5, rtol=1e-5)
            if len(span) > 1:  # a max that is not the span's mean nor its last token (activations here ~0.05)
                scale = np.abs(span).max()
                assert np.abs(got - span.mean(axis=0)).max() > 0.2 * scale < np.abs(got - span[-1]).max()


def test_ema_is_the_numpy_weighted_mean_over_the_user_span(tiny: LoadedModel) -> None:
    data, _ = _plain_spans(tiny)
    for layer in LAYERS:
        for row, span in enumerate(data["spans"][layer]):
            got = data["got"][("ema", layer)][row].double().numpy()
            np.testing.assert_allclose(got, _ema_weights(len(span)) @ span, atol=1e-5, rtol=1e-5)
        long = data["spans"][layer][2]
        got = data["got"][("ema", layer)][2].double().numpy()
        # on a turn of several half-lives it is neither the mean nor the last token, by 100 times the tolerance
        assert np.abs(got - long.mean(axis=0)).max() > 1e-3 < np.abs(got - long[-1]).max()


def test_a_linear_probe_on_ema_is_the_streaming_ema_of_its_per_token_scores(tiny: LoadedModel) -> None:
    """w·ema(h) + b equals the smoothed score a streaming monitor keeps token by token (two running sums,
    s ← βs + score, n ← βn + 1, read as s/n at the span's last token); on `mean` it would not."""
    data, _ = _plain_spans(tiny)
    rng = np.random.default_rng(0)
    beta = 2.0 ** (-1 / EMA_HALF_LIFE_TOKENS)
    for layer in LAYERS:
        w, b = rng.normal(size=data["spans"][layer][0].shape[1]), float(rng.normal())
        for row, span in enumerate(data["spans"][layer]):
            s = n = 0.0
            for score in span @ w + b:
                s, n = beta * s + score, beta * n + 1.0
            pooled = data["got"][("ema", layer)][row].double().numpy()
            assert pooled @ w + b == pytest.approx(s / n, abs=1e-5)
            if row == 2:  # the mean's score is another number, by 100 times the tolerance
                mean_score = data["got"][("mean", layer)][row].double().numpy() @ w + b
                assert abs(mean_score - s / n) > 1e-3


@pytest.mark.parametrize("pooling", ["max", "ema"])
def test_a_padded_row_equals_the_same_row_alone(tiny: LoadedModel, pooling: str) -> None:
    for left in (False, True):  # the features stage pads on the right, a server on the left
        batch, _ = _batch(tiny, PROMPTS, left)
        together = capture(tiny.model, batch, LAYERS, [pooling])
        for row, prompt in enumerate(PROMPTS):
            alone = capture(tiny.model, _batch(tiny, [prompt])[0], LAYERS, [pooling])
            for key in alone:
                torch.testing.assert_close(together[key][row], alone[key][0], atol=1e-5, rtol=1e-4)


def test_padding_nan_never_wins_and_an_empty_span_reads_the_token_before() -> None:
    """Row 0: user span [1, 3), padded from 4 with NaN (what some SDPA kernels leave there) and a huge value
    after the span; row 1: an empty span at 3 (an empty turn), which reads position 2 like `_span_end`."""
    hidden = torch.arange(2 * 6 * 2, dtype=torch.float32).reshape(2, 6, 2)
    hidden[0, 4:] = torch.nan
    hidden[0, 3] = 1e6
    batch = Batch(input_ids=torch.zeros(2, 6, dtype=torch.long),
                  attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]),
                  user_start=torch.tensor([1, 3]), user_end=torch.tensor([3, 3]))
    torch.testing.assert_close(pool(hidden, batch, "max"), torch.stack([hidden[0, 2], hidden[1, 2]]))
    weights = torch.tensor(_ema_weights(2), dtype=torch.float32)
    torch.testing.assert_close(pool(hidden, batch, "ema"), torch.stack([weights @ hidden[0, 1:3], hidden[1, 2]]))


def test_the_spec_takes_max_and_ema_and_only_ema_adds_its_half_life_to_the_features_key(tmp_path: Path) -> None:
    from guardray.stages.features import features_key

    assert {"max", "ema"} <= set(PROMPT_POOLINGS)
    keys = {}
    for poolings in (["max", "ema"], ["last", "max"]):
        spec = validate_spec(small_spec(str(tmp_path), extract={"poolings": poolings}))
        assert spec.extract.poolings == tuple(poolings)
        keys[poolings[-1]] = features_key(spec)["extract"]
    assert keys["ema"]["pooling_constants"] == {"ema": {"half_life_tokens": EMA_HALF_LIFE_TOKENS}}
    assert "pooling_constants" not in keys["max"]
    with pytest.raises(SpecError, match="extract.poolings.0: Input should be .*'max' or 'ema'"):
        validate_spec(small_spec(str(tmp_path), extract={"poolings": ["median"]}))


def test_the_features_extractor_writes_max_and_ema_columns(tiny_path: str, tiny: LoadedModel, tmp_path: Path) -> None:
    import pyarrow as pa

    from guardray.features import FeatureExtractor, to_table

    spec = validate_spec(small_spec(str(tmp_path), model={"id": tiny_path, "max_length": 256},
                                    extract={"layers": [2], "poolings": ["max", "ema"], "store_dtype": "float32"},
                                    guard={"enabled": False}))
    extractor = FeatureExtractor.from_spec(spec)
    columns, errors = extractor.process(PROMPTS)
    assert not errors
    n = len(columns.pop("_index"))
    meta = pa.table({"id": [f"id{i}" for i in range(n)], "harmful": [True] * n, "source": ["s"] * n,
                     "split": ["train"] * n})
    table = to_table(meta, columns, "float32", extractor.columns)
    infos = feature_infos(table.schema, "parts")
    assert {name: (i.pooling, i.layer, i.on_prompt) for name, i in infos.items()} == {
        "act_max_L2": ("max", 2, True), "act_ema_L2": ("ema", 2, True)}
    batch, _ = _batch(tiny, PROMPTS)
    expected = capture(tiny.model, batch, [2], ["max", "ema"])
    for name in ("max", "ema"):
        stored = np.stack(table.column(f"act_{name}_L2").to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(stored, expected[(name, 2)].numpy(), atol=1e-5, rtol=1e-4)


def _served_artifact(directory: Path, tiny_path: str, pooling: str, constants: dict | None = None) -> str:
    """A linear probe artifact on act_<pooling>_L2 of the tiny model, as the probes stage records one (with the
    pooling's constants: this guardray's, unless `constants` are given)."""
    from guardray.columns import POOLING_CONSTANTS

    constants = POOLING_CONSTANTS.get(pooling) if constants is None else constants
    meta = {"name": f"harmful/act_{pooling}_L2-x", "layer": 2, "pooling": pooling, "feature": f"act_{pooling}_L2",
            "chat_model": tiny_path, "model": {"id": tiny_path, "max_length": 256}, "threshold": 0.0,
            "guard": None, "type": "logistic_regression",
            **({"pooling_constants": constants} if constants else {})}
    artifact.save_linear(resolve(str(directory)), meta, weight=np.random.default_rng(1).normal(size=64), bias=[0.1])
    return str(directory)


def test_a_server_scores_a_probe_on_max_or_ema_as_the_probe_on_the_activation_alone(
        tiny_path: str, tiny: LoadedModel, tmp_path: Path) -> None:
    """`guardray serve`'s engine on a probe artifact of act_max_L2 (loaded as a server loads it), then of
    act_ema_L2 on the same model: the prefill hook of a left-padded `generate` and the right-padded `score`
    path both give the artifact's score on each prompt's activation computed alone."""
    from guardray.serve.api import ServeSettings
    from guardray.serve.artifact import find_probe
    from guardray.serve.engine import ChatRequest, GuardedChatModel, Sampling
    from guardray.serve.loading import load_guarded_model

    engine = load_guarded_model(ServeSettings(artifact=_served_artifact(tmp_path / "max", tiny_path, "max")))
    served = find_probe(_served_artifact(tmp_path / "ema", tiny_path, "ema"))
    engines = {"max": engine, "ema": GuardedChatModel(engine.loaded, served.probe, served.meta, 0.0, "Refused.")}
    for pooling, engine in engines.items():
        alone = [capture(tiny.model, _batch(tiny, [p])[0], [2], [pooling])[(pooling, 2)] for p in PROMPTS]
        expected = engine.probe.score(torch.cat(alone).numpy())
        scored = [v.score for v in engine.score(PROMPTS)]
        done = engine.complete([ChatRequest(((("user", p),)), Sampling(max_new_tokens=1)) for p in PROMPTS])
        np.testing.assert_allclose(scored, expected, atol=1e-4, rtol=0)
        np.testing.assert_allclose([c.verdict.score for c in done], expected, atol=1e-4, rtol=0)
        assert engine.largest_batch == len(PROMPTS) and np.ptp(expected) > 1e-3


def test_a_server_refuses_an_ema_probe_trained_with_another_half_life(tiny_path: str, tmp_path: Path) -> None:
    from guardray.errors import InputError
    from guardray.serve.artifact import find_probe

    with pytest.raises(InputError, match="refit the probe"):
        find_probe(_served_artifact(tmp_path / "ema8", tiny_path, "ema", {"half_life_tokens": 8.0}))
    with pytest.raises(InputError, match="refit the probe"):  # an artifact that does not record it at all
        find_probe(_served_artifact(tmp_path / "none", tiny_path, "ema", {}))
