"""Train-step cost of FlowTracer credit: `flowtracer` vs `uniform`, same model, batch and mesh.

The fused flowtracer step captures attention in the forward pass that also computes the loss (no
extra pass) and runs the flow trace inside the same jit; goals on CPU: time ratio <= 1.10 at
T = 256 and <= 1.15 at T = 1024. `--separate` adds the other way to take the map
(`StepConfig.credit_pass separate`: a gradient-free forward first, then a training forward with
no captured layer). Memory is what XLA plans for one step (temporaries + outputs).
Usage: python -m benchmarks.bench_step [--lengths 256,1024] [--batch 8] [--repeats 5]
       [--separate] [--remat none|full|dots] [--micro_batch N]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import compiled_bytes, environment_line, median_ms, small_llama_config
from ftjax import credit, mesh_step, sharding, state_init, train
from ftjax.models import transformer


def make_batch(batch: int, length: int, vocab: int, prompt_len: int | None = None) -> train.Batch:
    """Prompt columns (`prompt_len`, default a quarter of `length`) then response columns."""
    rng = np.random.default_rng(0)
    prompt_len = length // 4 if prompt_len is None else prompt_len
    tokens = rng.integers(1, vocab, (batch, length)).astype(np.int32)
    prompt = np.zeros((batch, length), bool)
    prompt[:, :prompt_len] = True
    response = ~prompt
    answer = np.zeros((batch, length), bool)
    answer[:, length - 8 : length - 2] = True
    rewards = rng.integers(0, 2, batch).astype(np.float32)
    old = np.where(response, -5.0, 0.0).astype(np.float32)
    return train.Batch(*(jnp.asarray(x) for x in (tokens, prompt, response, answer, rewards, old)))


def measure(
    credit_name: str,
    batch: train.Batch,
    max_len: int,
    repeats: int,
    credit_pass: str = "fused",
    remat: str = "none",
    micro_batch: int | None = None,
):
    cfg = train.StepConfig(
        group_size=min(4, batch.tokens_BxT.shape[0]),  # groups of 4 (or the batch, if smaller)
        credit=credit.CreditConfig(name=credit_name),
        credit_pass=credit_pass,
        remat=remat,
        micro_batch=micro_batch,
    )
    model = transformer.Transformer(small_llama_config(max_len), rngs=nnx.Rngs(0))
    graphdef, state = state_init.init_state(model, cfg, jax.random.PRNGKey(0))
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1), jax.devices()[:1])
    step_fn, state = mesh_step.make_train_step(graphdef, state, batch, cfg, mesh)
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
    parser.add_argument("--separate", action="store_true", help="also time credit_pass separate")
    parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    parser.add_argument("--micro_batch", type=int, default=None)
    args = parser.parse_args()
    if args.batch < 2 or (args.batch > 4 and args.batch % 4):
        parser.error(f"--batch must be 2, 3, 4 or a multiple of 4 (groups of 4), got {args.batch}")
    knobs = dict(remat=args.remat, micro_batch=args.micro_batch)
    print(environment_line())
    print(f"remat {args.remat}, micro_batch {args.micro_batch}")
    arms = [("uniform", "fused"), ("flowtracer", "fused")]
    arms += [("flowtracer", "separate")] if args.separate else []
    names = ["uniform", "fused", "separate"][: len(arms)]
    header = f"{'B':>2} {'T':>5} " + " ".join(f"{n + ' ms':>11}" for n in names)
    header += " " + " ".join(f"{n + '/uni':>12}" for n in names[1:])
    header += " " + " ".join(f"{n + ' MiB':>12}" for n in names)
    print(header)
    for length in (int(x) for x in args.lengths.split(",")):
        batch = make_batch(args.batch, length, 512)
        results = [measure(c, batch, length, args.repeats, p, **knobs) for c, p in arms]
        base_ms = results[0][0]
        row = f"{args.batch:>2} {length:>5} " + " ".join(f"{ms:>11.1f}" for ms, _ in results)
        row += " " + " ".join(f"{ms / base_ms:>12.2f}" for ms, _ in results[1:])
        row += " " + " ".join(f"{mb:>12.1f}" for _, mb in results)
        print(row, flush=True)


if __name__ == "__main__":
    main()
