"""Train-step cost of FlowTracer credit: `flowtracer` vs `uniform`, same model, batch and mesh.

The flowtracer step captures attention in the forward pass that also computes the loss (no extra
pass) and runs the flow trace inside the same jit; goals on CPU: time ratio <= 1.10 at T = 256
and <= 1.15 at T = 1024. Memory is what XLA plans for one step (temporaries + outputs).
Usage: python -m benchmarks.bench_step [--lengths 256,1024] [--batch 8] [--repeats 5]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import compiled_bytes, environment_line, median_ms, small_llama_config
from ftjax import credit, sharding, train
from ftjax.models import transformer


def make_batch(batch: int, length: int, vocab: int) -> train.Batch:
    rng = np.random.default_rng(0)
    prompt_len = length // 4
    tokens = rng.integers(1, vocab, (batch, length)).astype(np.int32)
    prompt = np.zeros((batch, length), bool)
    prompt[:, :prompt_len] = True
    response = ~prompt
    answer = np.zeros((batch, length), bool)
    answer[:, length - 8 : length - 2] = True
    rewards = rng.integers(0, 2, batch).astype(np.float32)
    old = np.where(response, -5.0, 0.0).astype(np.float32)
    return train.Batch(*(jnp.asarray(x) for x in (tokens, prompt, response, answer, rewards, old)))


def measure(credit_name: str, batch: train.Batch, max_len: int, repeats: int):
    cfg = train.StepConfig(group_size=4, credit=credit.CreditConfig(name=credit_name))
    model = transformer.Transformer(small_llama_config(max_len), rngs=nnx.Rngs(0))
    graphdef, state = train.init_state(model, cfg, jax.random.PRNGKey(0))
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1), jax.devices()[:1])
    step_fn, state = train.make_train_step(graphdef, state, batch, cfg, mesh)
    memory = compiled_bytes(step_fn, state, batch) / 2**20

    def run(state, batch):  # keep the donated state threaded through the timed calls
        holder["state"], metrics = step_fn(holder["state"], batch)
        return metrics["loss"]

    holder = {"state": state}
    return median_ms(run, None, batch, repeats=repeats), memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,1024")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(environment_line())
    print(
        f"{'B':>2} {'T':>5} {'uniform ms':>10} {'flowtracer ms':>13} {'ratio':>6} "
        f"{'uniform MiB':>11} {'flowtracer MiB':>14}"
    )
    for length in (int(x) for x in args.lengths.split(",")):
        batch = make_batch(args.batch, length, 512)
        base_ms, base_mb = measure("uniform", batch, length, args.repeats)
        flow_ms, flow_mb = measure("flowtracer", batch, length, args.repeats)
        print(
            f"{args.batch:>2} {length:>5} {base_ms:>10.1f} {flow_ms:>13.1f} "
            f"{flow_ms / base_ms:>6.2f} {base_mb:>11.1f} {flow_mb:>14.1f}"
        )


if __name__ == "__main__":
    main()
