"""The dataset stage: every source read, normalised, deduplicated and split into `dataset.parquet`
(`guardray.datasets.assemble`)."""
from guardray.stages.base import Stage

# 2: dataset.parquet with 1,024-row row groups; 3: a JSON prompt that is not a string is rejected
STAGE = Stage("dataset", inputs=(), key=lambda spec: spec.dataset.cache_payload(),
              run="guardray.datasets.assemble:run_dataset", format=3, offload=True)
