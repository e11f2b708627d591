"""Hugging Face datasets read through their files on the hub (`hf://`), or through a mirror directory.

We read the dataset's own files (parquet, or the jsonl/csv some repos ship) rather than calling `datasets`,
so a cluster needs no `datasets` install and reads shards directly. The token comes from `HF_TOKEN` and is
never logged. Presets carry the repo, files and columns of the reference experiment's sources.
"""
from __future__ import annotations

import fnmatch
import os
from typing import Any
from urllib.parse import quote

import pyarrow.fs as pafs

from guardray.errors import InputError
from guardray.storage import Location, resolve

PARQUET_BRANCH = "refs/convert/parquet"

#: The reference experiment's Hugging Face sources (krnel-graph guardrail comparison).
#: `expected` is the row count the reference reported after its own filtering.
PRESETS: dict[str, dict[str, Any]] = {
    "alpaca": {"repo": "tatsu-lab/alpaca", "revision": "main", "data_files": "data/*.parquet",
               "text_column": "instruction", "harmful": False, "expected": 52001},
    "alert": {"repo": "Babelscape/ALERT", "revision": "main", "data_files": "alert.jsonl",
              "text_column": "prompt", "harmful": True, "expected": 14092},
    "alert_adversarial": {"repo": "Babelscape/ALERT", "revision": "main", "data_files": "alert_adversarial.jsonl",
                          "text_column": "prompt", "harmful": True, "expected": 30771},
    "inthewild_jailbreak_prompts": {"repo": "TrustAIRLab/in-the-wild-jailbreak-prompts", "revision": "main",
                                    "data_files": "**/*.parquet", "text_column": "prompt",
                                    "label_column": "jailbreak", "expected": 29376},
    "sorry_bench": {"repo": "sorry-bench/sorry-bench-202406", "config": "default", "hf_split": "train",
                    "text_column": "turns[0]", "harmful": True, "expected": 9439},
    "steering_toxic": {"repo": "Undi95/orthogonal-activation-steering-TOXIC", "revision": "main",
                       "data_files": "test.csv", "text_column": "goal", "harmful": True, "expected": 7377},
    "advbench_hf": {"repo": "walledai/AdvBench", "revision": "main", "data_files": "data/*.parquet",
                    "text_column": "prompt", "harmful": True, "expected": 520},
}


def preset_defaults(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; known: {', '.join(sorted(PRESETS))}")
    return {k: v for k, v in PRESETS[name].items() if k != "expected"}


def hub_filesystem() -> pafs.FileSystem:
    """The hub as a pyarrow filesystem; HF_TOKEN (if set) authenticates gated datasets."""
    from huggingface_hub import HfFileSystem

    return pafs.PyFileSystem(pafs.FSSpecHandler(HfFileSystem(token=os.environ.get("HF_TOKEN") or None)))


def dataset_files(spec: Any) -> list[Location]:
    """The files of a Hugging Face source, from the hub or from `mirror/<repo>/`."""
    if not spec.repo:
        raise InputError("huggingface source needs `repo` (or a `preset`)")
    pattern = spec.data_files or f"{spec.config or 'default'}/{spec.hf_split}/*.parquet"
    if spec.mirror:
        root = resolve(spec.mirror).join(spec.repo)
    else:
        revision = spec.revision or (PARQUET_BRANCH if not spec.data_files else "main")
        path = f"datasets/{spec.repo}@{quote(revision, safe='')}"
        root = Location(hub_filesystem(), path, f"hf://{path}")
    try:
        files = _glob(root, pattern)
    except Exception as e:  # noqa: BLE001 - hub client errors come from several libraries
        raise InputError(f"huggingface {spec.repo}: {_hub_problem(e)}") from None
    if not files:
        raise InputError(f"huggingface {spec.repo}: no files match '{pattern}' under {root.uri}")
    return files


def _glob(root: Location, pattern: str) -> list[Location]:
    static = pattern.split("*", 1)[0].rsplit("/", 1)[0] if "/" in pattern.split("*", 1)[0] else ""
    base = root.join(static) if static else root
    if "*" not in pattern:
        target = root.join(pattern)
        return [target] if target.fs.get_file_info(target.path).type == pafs.FileType.File else []
    infos = root.fs.get_file_info(pafs.FileSelector(base.path, recursive=True, allow_not_found=True))
    prefix = root.path.rstrip("/") + "/"
    matches = [
        i.path.removeprefix(prefix)
        for i in infos
        if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path.removeprefix(prefix), pattern)
    ]
    return [root.join(m) for m in sorted(matches)]


def _hub_problem(error: Exception) -> str:
    """A one-line reason without the token or a traceback."""
    name = type(error).__name__
    text = " ".join(str(error).split())
    if "Gated" in name or "gated" in text.lower() or "401" in text or "403" in text:
        return "the dataset is gated or private: accept its terms on huggingface.co and set HF_TOKEN"
    if "NotFound" in name or "404" in text:
        return "dataset or file not found on the hub"
    if "offline" in text.lower() or "Offline" in name:
        return "HF_HUB_OFFLINE is set; use `mirror:` to read a local copy"
    if "Connect" in name or "connect" in text.lower() or "resolve" in text.lower() or "Timeout" in name:
        return "cannot reach the Hugging Face hub (no network?); use `mirror:` to read a local copy"
    return f"{name}: {text[:200]}"
