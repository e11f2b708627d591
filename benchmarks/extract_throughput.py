"""Activation-extraction throughput: guardray's actor code path against the common reference loop.

Both run in this process on the same prompts (a realistic mix from the offline corpora, long jailbreaks
included). The reference is written the common way: prompts in dataset order, right padding, the whole
rendered sequence truncated from the right, `output_hidden_states=True`, and one full forward pass per
requested layer. guardray sorts by length inside a shard, stops after the deepest layer and captures every
layer in one pass. Prints prompts/s, tokens/s and the speed-up for 1 and 4 layers, then (with `--guard`) the
guard's own throughput with the HF backend, the vLLM backend, or both, on the same prompts.

    python benchmarks/extract_throughput.py                       # SmolLM2 on CPU
    python benchmarks/extract_throughput.py --model random-llama3-8b --n 512 --batch-size 32 --guard hf vllm  # GPU

`random-llama3-8b` is a randomly initialised Llama-3-8B (no hub access needed; speed does not depend on the
weights). vLLM gets the same config with `load_format="dummy"` (random weights of its own).
"""
from __future__ import annotations

import argparse
import time

import torch

from guardray.activations import decoder_layers, resolve_layers
from guardray.datasets.splitting import subsample
from guardray.features import FeatureExtractor
from guardray.models import LoadedModel, load_model, load_tokenizer
from guardray.rendering import chat_renderer
from guardray.jobspec import ExtractSpec, ModelSpec, SubsampleSpec


def realistic_prompts(n: int) -> list[str]:
    """A mix in the proportions of the smoke job's corpora, in dataset order (not sorted by length)."""
    import pandas as pd

    from guardray.datasets.packaged import CORPORA

    frames = [pd.DataFrame({"prompt": [r["prompt"] for r in CORPORA[name].rows()], "source": name})
              for name in ("advbench", "harmbench", "donotanswer", "inthewild_jailbreaks", "sharegpt")]
    mix = pd.concat(frames, ignore_index=True)
    return list(subsample(mix.assign(harmful=True), SubsampleSpec(limit=n, seed=0))["prompt"])[:n]


def llama3_8b_config() -> "LlamaConfig":  # noqa: F821
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, attn_implementation="sdpa", bos_token_id=1, eos_token_id=2)


def random_llama3_8b(device: str, dtype: torch.dtype) -> LoadedModel:
    """A randomly initialised Llama-3-8B-sized model (speed does not depend on the weights' values)."""
    from transformers import LlamaForCausalLM

    config = llama3_8b_config()
    config.dtype = dtype
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    spec = ModelSpec(id="random-llama3-8b", dtype="bfloat16", device=device)
    tokenizer = load_tokenizer(ModelSpec())  # SmolLM2's tokenizer and chat template; ids fit in the vocab
    return LoadedModel(spec, model, tokenizer, torch.device(device))


@torch.inference_mode()
def reference_loop(loaded: LoadedModel, prompts: list[str], layers: list[int], batch_size: int, max_length: int) -> tuple[float, int]:
    """The common approach; returns (seconds, real tokens)."""
    tok = loaded.tokenizer
    tok.padding_side = "right"
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    start, real = time.perf_counter(), 0
    for layer in layers:  # one full pass per requested layer
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                      max_length=max_length, add_special_tokens=False).to(loaded.device)
            out = loaded.model(**enc, output_hidden_states=True)
            last = enc["attention_mask"].sum(1) - 1
            out.hidden_states[layer + 1][torch.arange(len(last)), last].float().cpu()
            real += int(enc["attention_mask"].sum()) if layer == layers[0] else 0
    _sync(loaded)
    return time.perf_counter() - start, real


def guardray_path(loaded: LoadedModel, prompts: list[str], layers: list[int], batch_size: int, max_length: int) -> tuple[float, int]:
    spec = loaded.spec.model_copy(update={"max_length": max_length})
    loaded = LoadedModel(spec, loaded.model, loaded.tokenizer, loaded.device)
    extract = ExtractSpec(layers=tuple(layers), poolings=("last",), batch_size=batch_size)
    extractor = FeatureExtractor(loaded, chat_renderer(loaded.tokenizer, loaded.spec), layers, extract.poolings, extract)
    start = time.perf_counter()
    extractor.process(prompts)
    _sync(loaded)
    return time.perf_counter() - start, extractor.stats.tokens


def _sync(loaded: LoadedModel) -> None:
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()


def guard_throughput(backend: str, loaded: LoadedModel, model_name: str, prompts: list[str]) -> None:
    """Guard scoring alone (the built-in moderation prompt, one forward per prompt, two label logits)."""
    from guardray.guard import HFGuard
    from guardray.jobspec import GuardSpec

    spec = GuardSpec(max_length=1024)
    if backend == "hf":
        guard = HFGuard.create(loaded, spec)
    else:
        from guardray.guard.vllm import VLLMGuard

        model_spec, engine = loaded.spec, {}
        if model_name == "random-llama3-8b":  # a config-only directory; vLLM draws its own random weights
            import tempfile

            directory = tempfile.mkdtemp(prefix="random-llama3-8b-")
            llama3_8b_config().save_pretrained(directory)
            loaded.tokenizer.save_pretrained(directory)
            model_spec, engine = ModelSpec(id=directory, dtype="bfloat16"), {"load_format": "dummy"}
        engine["gpu_memory_utilization"] = 0.35  # the HF model stays resident beside it
        guard = VLLMGuard.create(model_spec, spec.model_copy(update={"vllm_engine_args": engine}), loaded.tokenizer)
    encoded = [guard.renderer.encode(p) for p in prompts]
    guard.score(encoded[:4])  # warm-up
    _sync(loaded)
    start = time.perf_counter()
    for i in range(0, len(encoded), 16):
        guard.score(encoded[i:i + 16])
    _sync(loaded)
    seconds = time.perf_counter() - start
    tokens = sum(len(e.ids) for e in encoded)
    print(f"guard {backend:4}: {len(prompts) / seconds:8.2f} prompts/s {tokens / seconds:10.0f} tokens/s "
          f"({seconds:.1f} s, {tokens // len(prompts)} tokens/prompt with the moderation prompt)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--guard", nargs="*", choices=["hf", "vllm"], default=[],
                        help="also time the guard with these backends (the chat model as its own guard)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.model == "random-llama3-8b":
        loaded = random_llama3_8b("cuda", torch.bfloat16)
    else:
        loaded = load_model(ModelSpec(id=args.model))
    prompts = realistic_prompts(args.n)
    n_layers = loaded.model.config.num_hidden_layers
    params = sum(p.numel() for p in loaded.model.parameters())
    print(f"model {args.model}: {n_layers} layers, {params / 1e6:.0f}M params, device {loaded.device}; "
          f"{len(prompts)} prompts, batch {args.batch_size}, max_length {args.max_length}")
    guardray_path(loaded, prompts[:4], [n_layers - 1], args.batch_size, args.max_length)  # warm-up
    for layers in ([n_layers - 1], resolve_layers([n_layers // 4, n_layers // 2, 3 * n_layers // 4, -1], n_layers)):
        ref_s, ref_tokens = reference_loop(loaded, prompts, layers, args.batch_size, args.max_length)
        our_s, our_tokens = guardray_path(loaded, prompts, layers, args.batch_size, args.max_length)
        print(f"{len(layers)} layer(s) {layers}:")
        print(f"  reference: {len(prompts) / ref_s:8.2f} prompts/s {ref_tokens / ref_s:10.0f} tokens/s ({ref_s:.1f} s)")
        print(f"  guardray : {len(prompts) / our_s:8.2f} prompts/s {our_tokens / our_s:10.0f} tokens/s ({our_s:.1f} s)")
        print(f"  speed-up : {ref_s / our_s:.2f}x")
        if loaded.device.type == "cuda":  # 2 FLOPs per weight per token, over the blocks the pass runs
            run = sum(p.numel() for block in decoder_layers(loaded.model)[: max(layers) + 1] for p in block.parameters())
            flops = 2 * run * our_tokens / our_s
            print(f"  guardray model FLOP/s: {flops / 1e12:.1f} TFLOP/s = {100 * flops / (args.peak_tflops * 1e12):.1f}% of peak")
    for backend in args.guard:
        guard_throughput(backend, loaded, args.model, prompts)


if __name__ == "__main__":
    main()
