"""The responses stage (spec section `generate:`): the chat model answers every prompt before features run.

`stage.py` is the stage (`run_responses`, the backend registry, the joined `dataset.parquet`); `hf.py` and
`vllm.py` are its backends (the latter imported only for `generate.backend: vllm`). What decoding means
(stop ids, seeds, generation settings, the part's columns) is `guardray.decoding`, shared with serving.
"""
