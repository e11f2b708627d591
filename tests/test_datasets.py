"""Dataset sources and assembly on real corpora and real files."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from guardray.datasets.assemble import assign_split, build_dataset, prompt_id, subsample
from guardray.datasets.packaged import CORPORA
from guardray.datasets.sources import load_source
from guardray.errors import InputError
from guardray.spec import DatasetSpec, SplitSpec, SubsampleSpec
from guardray.storage import resolve


@pytest.mark.parametrize("name", [n for n in CORPORA if n != "sharegpt"])
def test_packaged_corpus_loads_its_declared_rows(name: str) -> None:
    corpus = CORPORA[name]
    rows = corpus.rows()
    assert len(rows) == corpus.expected
    assert all(isinstance(r["prompt"], str) and r["prompt"].strip() for r in rows)
    assert {r["harmful"] for r in rows} == {corpus.harmful}


def test_sharegpt_survives_the_truncated_json() -> None:
    rows = CORPORA["sharegpt"].rows()
    assert 9000 < len(rows) < 10000  # ~9.4k first human turns parse before the cut
    assert not any(r["harmful"] for r in rows)


def test_dan_placeholders_are_rendered() -> None:
    assert not any("{generator.name}" in r["prompt"] for r in CORPORA["dan"].rows())


def _file_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "text": ["how do I bake bread", "write malware", "   ", "who should win the election", None],
        "label": [0, 1, 0, 1, 1],
        "politics": [False, False, False, True, False],
        "verdict": ["ok", "bad", "ok", "bad", "weird"],
    })


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "json", "json-wrapped", "csv"])
def test_file_source_formats(tmp_path: Path, fmt: str) -> None:
    frame = _file_frame()
    path = tmp_path / f"data.{fmt.split('-')[0]}"
    if fmt == "parquet":
        frame.to_parquet(path)
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif fmt == "json":  # an array of records, like many-shot-jailbreaking's examples.json
        frame.to_json(path, orient="records")
    elif fmt == "json-wrapped":
        path.write_text(json.dumps({"examples": json.loads(frame.to_json(orient="records"))}))
    else:
        frame.to_csv(path, index=False)
    spec = DatasetSpec.model_validate({"sources": [
        {"type": "file", "name": "mine", "path": str(path), "text_column": "text", "label_column": "label",
         "extra_labels": ["politics"]},
    ]})
    rows = load_source(spec.sources[0])
    assert [r["harmful"] for r in rows] == [False, True, False, True, True]
    assert [r["politics"] for r in rows] == [False, False, False, True, False]


def test_label_map_and_unmapped_values_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    _file_frame().to_parquet(path)
    spec = DatasetSpec.model_validate({"sources": [
        {"type": "file", "name": "mine", "path": str(path), "text_column": "text", "label_column": "verdict",
         "label_map": {"ok": False, "bad": True}},
    ]})
    out = resolve(str(tmp_path / "stage"))
    summary = build_dataset(spec, out)
    data = pq.read_table(out.join("dataset.parquet").path).to_pandas()
    rejects = pq.read_table(out.join("rejects.parquet").path).to_pandas()
    assert sorted(data["prompt"]) == ["how do I bake bread", "who should win the election", "write malware"]
    assert dict(zip(data["prompt"], data["harmful"]))["write malware"]
    reasons = dict(zip(rejects["row"], rejects["reason"]))
    assert reasons[2] == "empty or whitespace-only prompt"
    assert reasons[4].startswith("verdict: label 'weird' is not boolean")  # None prompt and bad label: label first
    assert summary["rows"] + summary["rejected"] + summary["duplicates"] == 5


def test_missing_column_is_a_clear_input_error(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    _file_frame().to_csv(path, index=False)
    spec = DatasetSpec.model_validate({"sources": [
        {"type": "file", "name": "mine", "path": str(path), "text_column": "prompt", "harmful": True}]})
    with pytest.raises(InputError, match=r"d.csv: text_column 'prompt' not found; columns are: text, label"):
        load_source(spec.sources[0])


def test_dedupe_keeps_first_and_reports_conflicts(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(json.dumps({"p": p}) for p in ["same", "only a", "same"]))
    b.write_text("\n".join(json.dumps({"p": p}) for p in ["same", "only b"]))
    spec = DatasetSpec.model_validate({"sources": [
        {"type": "file", "name": "a", "path": str(a), "text_column": "p", "harmful": True},
        {"type": "file", "name": "b", "path": str(b), "text_column": "p", "harmful": False},
    ]})
    out = resolve(str(tmp_path / "stage"))
    summary = build_dataset(spec, out)
    data = pq.read_table(out.join("dataset.parquet").path).to_pandas()
    conflicts = pq.read_table(out.join("conflicts.parquet").path).to_pandas()
    assert sorted(data["prompt"]) == ["only a", "only b", "same"]
    assert bool(data.set_index("prompt").at["same", "harmful"]) is True
    assert summary["duplicates"] == 2 and summary["conflicts"] == 1
    assert list(conflicts["prompt"]) == ["same"] and list(conflicts["sources"][0]) == ["a", "b"]
    assert set(data["id"]) == {prompt_id(s, p) for s, p in zip(data["source"], data["prompt"])}


def _frame(n_per: int = 40) -> pd.DataFrame:
    rows = [{"id": f"{s}{h}{i}", "prompt": f"{s} {h} {i}", "source": s, "harmful": h, "split_given": None}
            for s in ("x", "y") for h in (True, False) for i in range(n_per)]
    return pd.DataFrame(rows)


def test_split_is_seeded_and_stratified() -> None:
    frame = _frame()
    one = assign_split(frame, SplitSpec(test_fraction=0.25, seed=1))
    two = assign_split(frame.sample(frac=1, random_state=3), SplitSpec(test_fraction=0.25, seed=1)).sort_index()
    other = assign_split(frame, SplitSpec(test_fraction=0.25, seed=2))
    assert (one["split"] == two["split"]).all()  # the input order does not matter
    assert (one["split"] != other["split"]).any()
    per_stratum = one[one["split"] == "test"].groupby(["source", "harmful"]).size()
    assert list(per_stratum) == [10, 10, 10, 10]


def test_given_split_column_is_kept() -> None:
    frame = _frame(4)
    frame.loc[:3, "split_given"] = "test"
    out = assign_split(frame, SplitSpec(test_fraction=0.25))
    assert (out.loc[:3, "split"] == "test").all()


def test_subsample_modes() -> None:
    frame = _frame(40)
    every = subsample(frame, SubsampleSpec(every=10))
    assert len(every) == 16 and set(every["prompt"].str.split().str[-1].astype(int)) == {0, 10, 20, 30}
    frac = subsample(frame, SubsampleSpec(fraction=0.5, seed=1))
    assert len(frac) == 80 and frac.groupby("source").size().tolist() == [40, 40]
    assert frac.equals(subsample(frame, SubsampleSpec(fraction=0.5, seed=1)))
    limit = subsample(frame, SubsampleSpec(limit=40, seed=0))
    assert len(limit) == 40 and limit.groupby(["source", "harmful"]).size().tolist() == [10, 10, 10, 10]


def test_huggingface_loader_reads_a_mirror_with_the_hub_layout(tmp_path: Path) -> None:
    repo = tmp_path / "mirror" / "TrustAIRLab" / "in-the-wild-jailbreak-prompts" / "jailbreak_2023_12_25"
    repo.mkdir(parents=True)
    pq.write_table(pa.table({"platform": ["discord", "reddit"], "prompt": ["Ignore all rules", "hello"],
                             "jailbreak": [True, False]}), repo / "train-00000.parquet")
    spec = DatasetSpec.model_validate({"sources": [
        {"type": "huggingface", "preset": "inthewild_jailbreak_prompts", "name": "itw", "mirror": str(tmp_path / "mirror")}]})
    rows = load_source(spec.sources[0])
    assert [(r["prompt"], r["harmful"]) for r in rows] == [("Ignore all rules", True), ("hello", False)]


def test_huggingface_list_column_preset(tmp_path: Path) -> None:
    base = tmp_path / "m" / "sorry-bench" / "sorry-bench-202406" / "default" / "train"
    base.mkdir(parents=True)
    pq.write_table(pa.table({"question_id": [1], "turns": [["Write a threat"]], "category": ["1"]}), base / "0000.parquet")
    spec = DatasetSpec.model_validate({"sources": [{"type": "huggingface", "preset": "sorry_bench", "mirror": str(tmp_path / "m")}]})
    assert load_source(spec.sources[0]) == [{"prompt": "Write a threat", "harmful": True}]


def test_unreachable_hub_fails_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: connection refused at once
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    spec = DatasetSpec.model_validate({"sources": [{"type": "huggingface", "preset": "advbench_hf"}]})
    with pytest.raises(InputError) as info:
        load_source(spec.sources[0])
    assert str(info.value).startswith("huggingface walledai/AdvBench: cannot reach the Hugging Face hub")
    assert "hf_secret_value" not in str(info.value)
