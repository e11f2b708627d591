"""Probe artifacts through their one I/O path (`artifact.save` / `load` on a `Location`), on local disk and on
gs:// (a real fake-gcs-server): round trips of every probe type and of the torch probe's linear form, the file
modes, and the pickle rules (refused without opt-in before `probe.pkl` is read; never for a linear type)."""
from __future__ import annotations

import json
import os
import pickle
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from guardray.errors import InputError
from guardray.probes import artifact
from guardray.probes.registry import PROBE_TYPES, build_probe, probe_scores
from guardray.storage import Location, resolve


@pytest.fixture(params=["local", "gcs"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    """An artifacts directory on local disk or in a fresh bucket of the GCS emulator."""
    if request.param == "local":
        return resolve(str(tmp_path / "artifacts"))
    return resolve(f"{request.getfixturevalue('gcs_bucket')}/artifacts")


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 6)).astype(np.float32)
    return x, x[:, 0] + 0.3 * rng.normal(size=80) > 0


class _Payload:
    """Unpickling this runs `code`: what a crafted `probe.pkl` does to whoever loads it."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return exec, (self.code,)


def _crafted(location: Location, marker: Path, probe_type: str) -> Location:
    """probe.json says pickle; probe.pkl writes `marker` when unpickled."""
    location.join(artifact.PICKLE).write_bytes(
        pickle.dumps(_Payload(f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')")))
    location.join(artifact.META).write_text(json.dumps({"type": probe_type, "format": "pickle"}))
    return location


@pytest.mark.parametrize("name", sorted(PROBE_TYPES))
def test_every_probe_type_round_trips(name: str, where: Location) -> None:
    x, y = _data()
    pipeline = build_probe(name, "normalize" if name == "ridge" else "standardize", {}).fit(x, y)
    location = where.join(name)
    artifact.save(pipeline, location, {"type": name, "feature": "act_last_L1"})
    assert location.join(artifact.PICKLE).exists() != PROBE_TYPES[name].linear  # linear: safetensors only
    loaded = artifact.load(location, allow_pickle=True)
    assert loaded.meta["feature"] == "act_last_L1" and loaded.meta["format"] == (
        "linear" if PROBE_TYPES[name].linear else "pickle")
    np.testing.assert_allclose(loaded.score(x), probe_scores(pipeline, x), rtol=1e-5, atol=1e-4)


def test_a_linear_artifact_loads_without_opting_in_to_pickles(where: Location) -> None:
    """The torch probe's form: weights, bias and the standardisation, read back exactly (float64)."""
    rng = np.random.default_rng(1)
    weight, mean, scale = rng.normal(size=5), rng.normal(size=5), rng.uniform(0.5, 2, size=5)
    artifact.save_linear(where.join("torch"), {"type": "torch_linear", "history": [{"loss": 0.5}]}, weight, [0.25],
                         mean, scale)
    loaded = artifact.load(where.join("torch"))
    assert isinstance(loaded, artifact.LinearProbe) and loaded.meta["history"] == [{"loss": 0.5}]
    x = rng.normal(size=(7, 5))
    np.testing.assert_array_equal(loaded.score(x), ((x - mean) / scale) @ weight + 0.25)
    assert where.join("torch").list() == [artifact.META, artifact.WEIGHTS]


def test_local_artifacts_get_the_locations_file_mode(tmp_path: Path) -> None:
    x, y = _data()
    location = resolve(str(tmp_path / "out" / "artifacts" / "p"), file_mode=0o640)
    artifact.save(build_probe("logistic_regression", "standardize", {}).fit(x, y), location,
                  {"type": "logistic_regression"})
    for name in (artifact.META, artifact.WEIGHTS):
        assert stat.S_IMODE(os.stat(tmp_path / "out" / "artifacts" / "p" / name).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "artifacts").st_mode) == 0o750
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.startswith(".tmp-")]  # written atomically


def test_a_pickle_is_refused_without_opt_in_before_it_is_read(where: Location, tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    crafted = _crafted(where.join("crafted"), marker, "rbf_svc")
    with pytest.raises(artifact.PickleRefused, match="runs code when loaded.*--allow-pickle"):
        artifact.load(crafted)
    with pytest.raises(artifact.PickleRefused):
        artifact.read_meta(crafted)
    assert not marker.exists()
    assert artifact.read_meta(crafted, allow_pickle=True)["format"] == "pickle"  # the metadata only
    assert not marker.exists()
    artifact.load(crafted, allow_pickle=True)  # opted in: it runs, the documented risk
    assert marker.read_text() == "ran"


def test_a_pickle_for_a_linear_type_is_refused_even_with_opt_in(where: Location, tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    forged = _crafted(where.join("forged"), marker, "logistic_regression")
    with pytest.raises(InputError, match="linear probes are always safetensors") as error:
        artifact.load(forged, allow_pickle=True)
    assert not isinstance(error.value, artifact.PickleRefused) and not marker.exists()


def test_a_missing_or_broken_probe_json_is_one_line_naming_the_file(where: Location) -> None:
    with pytest.raises(InputError, match=f"^{where.join('none').uri}/probe.json: "):
        artifact.load(where.join("none"))
    where.join("bad", artifact.META).write_text("{not json")
    with pytest.raises(InputError, match="bad/probe.json: ") as error:
        artifact.load(where.join("bad"))
    assert "\n" not in str(error.value)
    where.join("odd", artifact.META).write_text(json.dumps({"format": "onnx"}))
    with pytest.raises(InputError, match="odd/probe.json: format: "):
        artifact.load(where.join("odd"))
