"""The dataset rules the schema uses, handed in from guardray.datasets, the layer above it (see `dataset.py`).

`guardray/jobspec/__init__.py` calls `link_datasets()`, so every use of the package has them. guardray.datasets is
imported when a rule is first used, not here: `import guardray.jobspec` stays light (no pyarrow) in a worker.
"""
from __future__ import annotations

from typing import Any, Iterable

from guardray.jobspec.dataset import DATASET_RULES


class DatasetsPackageRules:
    """The presets of guardray/datasets/huggingface.py and the rule tables of normalize.py and categories.py."""

    def preset_defaults(self, name: str) -> dict[str, Any]:
        from guardray.datasets.huggingface import preset_defaults

        return preset_defaults(name)

    def cache_key(self, source_types: Iterable[str]) -> dict[str, Any]:
        """Editing the normalisation rules changes which rows are dropped and grouped; the category-label rules
        of the corpora that have them change the label columns."""
        from guardray.datasets import categories, normalize

        rules = {"affixes": normalize.AFFIXES, "max_passes": normalize.MAX_AFFIX_PASSES,
                 "min_base_words": normalize.MIN_BASE_WORDS, "placeholder": normalize._PLACEHOLDER,
                 "punctuation": normalize._PUNCTUATION}
        return {"normalisation": rules, **categories.cache_key(source_types)}


def link_datasets() -> None:
    DATASET_RULES[:] = [DatasetsPackageRules()]
