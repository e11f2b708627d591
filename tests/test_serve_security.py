"""Artifacts are data: what a probe artifact can make `guardray serve` do, tried as an attacker would, on real
files (a real pickle payload, a real model directory with its own code) through the real CLI and loader. No
server starts here (the HTTP cases run against `tests/test_serve.py`'s server)."""
from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from guardray.cli import main
from guardray.errors import InputError
from guardray.probes import artifact
from guardray.storage import resolve

LAYER = 2


def _meta(model: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """What a probes stage records for a prompt probe on the offline SmolLM2."""
    return {"name": "harmful/act_last_L2-x", "layer": LAYER, "pooling": "last", "feature": "act_last_L2",
            "chat_model": "smollm2-135m-instruct", "model": model or {"id": "smollm2-135m-instruct"},
            "threshold": 0.0, "guard": None, **extra}


def _linear(directory: Path, model: dict[str, Any] | None = None) -> Path:
    artifact.save_linear(resolve(str(directory)), _meta(model, type="logistic_regression"), weight=np.ones(4),
                         bias=[0.5])
    return directory


class _Payload:
    """Unpickling this runs `code`: what a crafted `probe.pkl` does to whoever loads it."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return exec, (self.code,)


def _pickled(directory: Path, marker: Path, probe_type: str = "rbf_svc") -> Path:
    """A crafted artifact: probe.json says pickle, probe.pkl writes `marker` when unpickled."""
    directory.mkdir(parents=True)
    (directory / artifact.PICKLE).write_bytes(
        pickle.dumps(_Payload(f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')")))
    (directory / artifact.META).write_text(json.dumps({**_meta(type=probe_type), "format": "pickle"}))
    return directory


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["serve", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_pickled_artifact_is_refused_without_allow_pickle_even_to_write_a_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "payload-ran"
    crafted = _pickled(tmp_path / "artifact", marker)
    config = tmp_path / "serve.yaml"
    code, out, err = _cli(capsys, str(crafted), "--write-config", str(config))
    assert code == 2 and err.count("\n") == 1 and "runs code when loaded" in err and "--allow-pickle" in err, err
    assert not marker.exists() and not config.exists()
    with pytest.raises(artifact.PickleRefused):  # the library's own loader refuses it too
        artifact.load(resolve(str(crafted)))
    assert not marker.exists()

    # opted in: the config says so, and this process still read the metadata only (the replicas unpickle)
    code, out, err = _cli(capsys, str(crafted), "--allow-pickle", "--write-config", str(config))
    assert code == 0, err
    assert yaml.safe_load(config.read_text())["applications"][0]["args"]["allow_pickle"] is True
    assert not marker.exists()
    # and a replica's load does unpickle it: the documented risk of --allow-pickle
    from guardray.serve.artifact import find_probe

    find_probe(str(crafted), allow_pickle=True)
    assert marker.read_text() == "ran"


def test_a_linear_probe_type_is_never_unpickled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Linear probes have the portable form: a probe.json that asks to unpickle one is forged, refused even
    with --allow-pickle."""
    marker = tmp_path / "payload-ran"
    forged = _pickled(tmp_path / "artifact", marker, probe_type="logistic_regression")
    code, _, err = _cli(capsys, str(forged), "--allow-pickle", "--write-config", str(tmp_path / "serve.yaml"))
    assert code == 2 and err.count("\n") == 1 and "format 'pickle' for probe type 'logistic_regression'" in err
    with pytest.raises(InputError, match="linear probes are always safetensors"):
        artifact.load(resolve(str(forged)), allow_pickle=True)
    assert not marker.exists()


def test_the_probes_stage_never_pickles_a_linear_type(tmp_path: Path) -> None:
    from guardray.probes.registry import PROBE_TYPES, build_probe

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 4)).astype(np.float32), np.arange(40) % 2 == 0
    for name, kind in PROBE_TYPES.items():
        artifact.save(build_probe(name, "standardize", {}).fit(x, y), resolve(str(tmp_path / name)), {"type": name})
        assert (tmp_path / name / artifact.PICKLE).exists() == (name in artifact.PICKLED_TYPES) != kind.linear


def _model_with_its_own_code(directory: Path, marker: Path) -> Path:
    """A model directory whose config asks transformers to import its own `evil.py`, which writes `marker`."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({
        "model_type": "guardray-evil", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                    "AutoModelForCausalLM": "evil.EvilModel"}}))
    (directory / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.Evil", None]}}))
    (directory / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                       "from transformers import PretrainedConfig\n"
                                       "class EvilConfig(PretrainedConfig):\n    model_type = 'guardray-evil'\n")
    return directory


def test_the_artifact_cannot_turn_on_trust_remote_code(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """probe.json records `trust_remote_code: true` for a model directory with its own code: serving loads it
    with trust_remote_code off (the model's code never runs), and says which model it loads before loading."""
    from guardray.serve.api import ServeSettings
    from guardray.serve.artifact import find_probe
    from guardray.serve.loading import load_guarded_model

    marker = tmp_path / "model-code-ran"
    model_dir = _model_with_its_own_code(tmp_path / "model", marker)
    crafted = _linear(tmp_path / "artifact", {"id": str(model_dir), "trust_remote_code": True, "device": "cpu",
                                              "dtype": "float32"})
    assert json.loads((crafted / artifact.META).read_text())["model"]["trust_remote_code"] is True
    settings = ServeSettings(artifact=str(crafted))
    with caplog.at_level(logging.INFO, logger="guardray.serve.loading"), pytest.raises(Exception) as refused:
        load_guarded_model(settings)
    assert not marker.exists(), "the artifact made the server run the model's own code"
    assert "trust_remote_code" in str(refused.value)  # transformers refuses to run the directory's code
    loading = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loading chat model")]
    assert loading == [f"loading chat model {str(model_dir)!r} revision default from local path {model_dir}, "
                       f"trust_remote_code=off"]

    from guardray.serve.loading import serving_spec

    served = find_probe(settings.artifact)
    assert served.model_spec.trust_remote_code is False
    assert serving_spec(served.model_spec, settings).trust_remote_code is False
    assert serving_spec(served.model_spec, settings.model_copy(update={"trust_remote_code": True})).trust_remote_code

    # the CLI says it too, before any replica starts, and writes no trust_remote_code into the config
    config = tmp_path / "serve.yaml"
    code, out, err = _cli(capsys, str(crafted), "--write-config", str(config))
    assert code == 0, err
    assert f"model: {str(model_dir)!r} revision default from local path" in out and "trust_remote_code=off" in out
    assert "trust_remote_code" not in yaml.safe_load(config.read_text())["applications"][0]["args"]
    code, out, err = _cli(capsys, str(crafted), "--trust-remote-code", "--write-config", str(config))
    assert code == 0 and "trust_remote_code=on" in out
    assert yaml.safe_load(config.read_text())["applications"][0]["args"]["trust_remote_code"] is True


def test_a_reachable_host_needs_a_key_and_the_config_stores_only_its_name(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    probe = _linear(tmp_path / "artifact")
    config = tmp_path / "serve.yaml"
    code, _, err = _cli(capsys, str(probe), "--host", "0.0.0.0", "--write-config", str(config))
    assert code == 2 and err.count("\n") == 1 and "--host 0.0.0.0" in err and "--api-key-env" in err
    assert not config.exists()
    code, _, err = _cli(capsys, str(probe), "--host", "0.0.0.0", "--insecure-no-auth", "--write-config", str(config))
    assert code == 0 and "WITHOUT AUTHENTICATION" in err
    for loopback in ("127.0.0.1", "localhost", "::1"):
        assert _cli(capsys, str(probe), "--host", loopback, "--write-config", str(config))[0] == 0

    key = "s3cret-key-of-the-test-0123456789"
    monkeypatch.setenv("GUARDRAY_TEST_KEY", key)
    code, out, err = _cli(capsys, str(probe), "--host", "0.0.0.0", "--api-key-env", "GUARDRAY_TEST_KEY",
                          "--write-config", str(config))
    assert code == 0, err
    assert yaml.safe_load(config.read_text())["applications"][0]["args"]["api_key_env"] == "GUARDRAY_TEST_KEY"
    assert key not in config.read_text() + out + err
    # serving here (not a config for elsewhere) needs the variable set in this environment
    monkeypatch.delenv("GUARDRAY_TEST_KEY")
    from guardray.serve.api import ServeSettings
    from guardray.serve.deploy import check_exposure

    with pytest.raises(InputError, match="GUARDRAY_TEST_KEY is not set"):
        check_exposure("127.0.0.1", ServeSettings(artifact="x", api_key_env="GUARDRAY_TEST_KEY"), False, True)
    # deployed onto a running cluster (--address): its proxies keep their own host, so loopback proves nothing
    with pytest.raises(InputError, match="--address: .* needs a bearer token"):
        check_exposure("127.0.0.1", ServeSettings(artifact="x"), False, False, cluster=True)
    check_exposure("127.0.0.1", ServeSettings(artifact="x"), True, False, cluster=True)  # told so: warned
    assert "WITHOUT AUTHENTICATION" in capsys.readouterr().err


@pytest.mark.parametrize("field, value, message", [
    ("allow_pickle", "yes", "Input should be a valid boolean"),
    ("trust_remote_code", 1, "Input should be a valid boolean"),
    ("allow_request_overrides", "true", "Input should be a valid boolean"),
    ("api_key_env", "KEY; rm -rf /", "String should match pattern"),
    ("device", "tpu:7; rm -rf /", "Value error, 'tpu:7; rm -rf /' is not a device"),
])
def test_serve_settings_take_safety_switches_as_booleans_only(field: str, value: Any, message: str) -> None:
    """A Serve config's `allow_pickle: 'yes'` is refused, not read as true."""
    from pydantic import ValidationError

    from guardray.serve.api import ServeSettings

    with pytest.raises(ValidationError, match=f"{field}\n  {message}"):
        ServeSettings(artifact="x", **{field: value})
    assert getattr(ServeSettings(artifact="x"), field) in (False, None)  # off by default


def test_the_prompt_character_bound_is_never_below_the_real_token_count() -> None:
    """The cheap pre-tokenisation check refuses only text that cannot fit: the worst text for it (each
    character its own token) still has at most `limit` characters per `max_length` tokens."""
    from guardray.models import load_tokenizer
    from guardray.serve.gate import prompt_char_limit
    from guardray.jobspec import ModelSpec

    tokenizer = load_tokenizer(ModelSpec(id="smollm2-135m-instruct"))
    limit = prompt_char_limit(tokenizer, 10)
    assert limit == 10 * max(len(t) for t in tokenizer.get_vocab())
    for text in ("#" * (limit + 1), " " * (limit + 1), "\U0001F9A9" * (limit + 1), "word " * (limit // 5 + 1)):
        assert len(tokenizer.encode(text, add_special_tokens=False)) > 10


def test_the_key_is_read_from_the_environment_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from guardray.serve.gate import Gatekeeper, read_api_key

    monkeypatch.setenv("GUARDRAY_TEST_KEY", "with space")
    with pytest.raises(InputError, match="GUARDRAY_TEST_KEY must be one printable ASCII word") as bad:
        read_api_key("GUARDRAY_TEST_KEY")
    assert "with space" not in str(bad.value)
    monkeypatch.setenv("GUARDRAY_TEST_KEY", "k" * 32)
    gate = Gatekeeper(read_api_key("GUARDRAY_TEST_KEY"), 1024, 4, 1)
    headers = lambda value: {"headers": [(b"authorization", value)]}  # noqa: E731
    assert gate.authorized(headers(b"Bearer " + b"k" * 32)) and gate.authorized(headers(b"bearer " + b"k" * 32))
    assert not any(gate.authorized(h) for h in (headers(b"Bearer " + b"k" * 31), headers(b"k" * 32), {"headers": []},
                                                headers(b"Basic " + b"k" * 32)))
    assert os.environ["GUARDRAY_TEST_KEY"] not in repr(vars(gate))  # a digest, not the key
