"""Decode throughput: ftjax's jitted KV-cache sampler vs `transformers` generate, same weights.

A random Llama-family model is built with transformers (PyTorch, float32), saved as safetensors
and loaded into ftjax, so both decode the very same network; greedy, no early stop.
Goal on CPU: ftjax tokens/s >= transformers tokens/s. Needs the test extra (torch, transformers).
Usage: python -m benchmarks.bench_generate [--batch 8] [--new-tokens 128] [--hidden 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np

from benchmarks.common import environment_line
from ftjax import sampling
from ftjax.models import hf


def build_reference(hidden: int, layers: int, vocab: int, max_len: int):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=max_len,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def time_transformers(model, prompt: np.ndarray, new_tokens: int, repeats: int) -> float:
    import torch

    ids = torch.as_tensor(prompt, dtype=torch.long)
    kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
        attention_mask=torch.ones_like(ids),
    )
    with torch.inference_mode():
        model.generate(ids, **kwargs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = model.generate(ids, **kwargs)
            times.append(time.perf_counter() - start)
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return float(np.median(times))


def time_ftjax(model, prompt: np.ndarray, new_tokens: int, repeats: int) -> float:
    cfg = sampling.SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
    valid = np.ones_like(prompt, bool)
    run = lambda: sampling.generate(model, prompt, valid, jax.random.PRNGKey(0), cfg)  # noqa: E731
    jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch
    import transformers

    reference = build_reference(args.hidden, args.layers, args.vocab, 1024)
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp, safe_serialization=True)
        _, model = hf.load_checkpoint(tmp)
    prompt = np.random.default_rng(0).integers(1, args.vocab, (args.batch, args.prompt))
    ours = time_ftjax(model, prompt, args.new_tokens, args.repeats)
    theirs = time_transformers(reference, prompt, args.new_tokens, args.repeats)
    tokens = args.batch * args.new_tokens
    print(
        f"{environment_line()}; torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}"
    )
    print(
        f"llama hidden {args.hidden} x {args.layers} layers, batch {args.batch}, prompt "
        f"{args.prompt}, {args.new_tokens} new tokens, greedy"
    )
    print(f"{'':>14} {'seconds':>8} {'tokens/s':>9}")
    print(f"{'ftjax':>14} {ours:>8.3f} {tokens / ours:>9.1f}")
    print(f"{'transformers':>14} {theirs:>8.3f} {tokens / theirs:>9.1f}")
    print(f"ratio (ftjax tokens/s / transformers tokens/s): {theirs / ours:.2f}")


if __name__ == "__main__":
    main()
