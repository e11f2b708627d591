"""Tiny random-weight models built in the tests, with the real SmolLM2 tokenizer (and chat template)."""
from __future__ import annotations

from pathlib import Path

import torch


def smollm2_dir() -> str:
    from guardray.models import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")


def build_tiny(path: Path, kind: str = "llama", n_positions: int = 4096) -> str:
    """Save a 4-block random model of the given architecture with SmolLM2's tokenizer to `path`."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    vocab = len(tokenizer)
    if kind == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=n_positions,
                             bos_token_id=1, eos_token_id=2, pad_token_id=2)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=4, n_head=4, n_positions=n_positions,
                            bos_token_id=1, eos_token_id=2, pad_token_id=2)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
