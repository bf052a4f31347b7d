"""Train-step cost of scoring only the response columns (`Batch.response_start`) against scoring
every column (`response_start 0`, what the step did before), same model, batch and credit.

The few-shot layout of a base model is a long prompt and a short response: Gemma-3-270M's
3-shot arithmetic is 160 prompt slots and 24 response slots with a 262,144-token vocabulary, so
most of the vocabulary projection (and its backward pass) went to prompt columns, whose
log-probs the loss never reads. Both steps are timed alternately in one run (a shared machine
slows both alike) and XLA's planned memory (temporaries + outputs) is read for each.
Usage: python -m benchmarks.bench_response_start [--prompt_len 160] [--response_len 24]
       [--vocab 65536] [--batch 8] [--logit_chunk 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
from flax import nnx

from benchmarks import bench_step
from benchmarks.common import (
    compiled_bytes,
    environment_line,
    interleaved_median_ms,
    small_llama_config,
)
from ftjax import credit, mesh_step, sharding, state_init, train
from ftjax.models import transformer


def make_batch(batch: int, prompt_len: int, response_len: int, vocab: int) -> train.Batch:
    """`bench_step`'s batch with `prompt_len` prompt columns, saying where its responses start
    (as `rollout.rollout_batch` does: the prompt slots)."""
    full = bench_step.make_batch(batch, prompt_len + response_len, vocab, prompt_len)
    return dataclasses.replace(full, response_start=prompt_len)


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt_len", type=int, default=160)
    parser.add_argument("--response_len", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--logit_chunk", type=int, default=64, help="0: full logits")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    for name in ("prompt_len", "response_len", "vocab", "batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.batch % 4:
        parser.error(f"--batch must be a multiple of 4 (groups of 4), got {args.batch}")
    T = args.prompt_len + args.response_len
    model_cfg = dataclasses.replace(small_llama_config(T), vocab_size=args.vocab)
    cfg = train.StepConfig(
        group_size=4,
        credit=credit.CreditConfig(name="flowtracer"),
        logit_chunk=args.logit_chunk or None,
    )
    late = make_batch(args.batch, args.prompt_len, args.response_len, args.vocab)
    every = dataclasses.replace(late, response_start=0)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1), jax.devices()[:1])
    runs = []
    for batch in (every, late):
        model = transformer.Transformer(model_cfg, rngs=nnx.Rngs(0))
        graphdef, state = state_init.init_state(model, cfg, jax.random.PRNGKey(0))
        step_fn, state = mesh_step.make_train_step(graphdef, state, batch, cfg, mesh)
        memory = compiled_bytes(step_fn, state, batch) / 2**20
        holder = {"state": state}

        def run(batch, step_fn=step_fn, holder=holder):  # the donated state threads through
            holder["state"], metrics = step_fn(holder["state"], batch)
            return metrics["loss"]

        runs.append((run, batch, memory))
    times = interleaved_median_ms([(run, (batch,)) for run, batch, _ in runs], args.repeats)
    print(environment_line())
    print(
        f"model: {model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}, vocab "
        f"{args.vocab}; batch {args.batch} x ({args.prompt_len} prompt + {args.response_len} "
        f"response); flowtracer credit; logit_chunk {cfg.logit_chunk}"
    )
    print(f"{'scored columns':<22} {'step ms':>9} {'planned MiB':>12}")
    labels = ("all (before)", f"from {args.prompt_len} (now)")
    for label, (_, _, memory), ms in zip(labels, runs, times, strict=True):
        print(f"{label:<22} {ms:>9.1f} {memory:>12.1f}")
    print(
        f"ratio now / before: time {times[1] / times[0]:.2f}, memory {runs[1][2] / runs[0][2]:.2f}"
    )
    return times


if __name__ == "__main__":
    main()
