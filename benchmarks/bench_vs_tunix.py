"""One GRPO iteration (generate -> score -> train step): ftjax vs google-tunix's GRPOLearner, CPU.

A random Qwen3 model (float32, tied embeddings, q/k norms) is built with transformers and saved as
safetensors; ftjax (`hf.load_checkpoint`) and tunix (`qwen3.params.create_model_from_safe_tensors`,
its own Qwen3 module) both load that checkpoint, so they train the very same network: each side
reports the per-token log-probs of one fixed probe batch before training, and the parent checks
they agree. Same prompts: P prompts x G samples, temperature 1 (plain categorical on both sides),
exactly N new tokens each (the tokenizer's EOS id lies outside the model's vocabulary), one reward
on the token ids, group-std-scaled advantages, clipped surrogate (eps 0.2) summed over all
response tokens / their count (tunix `loss_agg_mode="token-mean"`, ftjax "token-mean"), no KL
(tunix `beta=0.0`, so it builds no reference model), AdamW (same lr, betas, global-norm clip
1.0, no weight decay, constant), one optimiser step per generation (tunix `num_iterations=1`, so
the old log-probs are the detached current ones), no remat on either side.

tunix runs in a virtualenv of its own, which keeps its pins and its many dependencies
(tensorflow-datasets, grain, orbax, qwix, ...) away from ours; create it once with
    python3 -m venv /work/tunix_venv && /work/tunix_venv/bin/pip install google-tunix
and pass its interpreter with --tunix-python (default: $TUNIX_PYTHON, else
/work/tunix_venv/bin/python). Each side runs in a fresh subprocess, `--rounds` times, the sides
alternating so that load on a shared machine hits all alike. Measured (as `bench_vs_trl`):
- iteration s: median wall time of one warm iteration. ftjax: `loop.run`'s own per-step timers
  (rollout + step). tunix: time between the ends of consecutive global steps of
  `GRPOLearner.train()` (after waiting for the updated parameters), i.e. all the learner does
  per step; its metric buffering has no backend here, checkpointing is off.
- fastest s: the fastest warm iteration of all rounds (what load from other jobs stretches
  least); CPU s / iteration: median process CPU time of one warm iteration (user + system, all
  threads; ftjax: from one step's prompt request to the next's; tunix: between global-step ends).
- rollout s: generation + scoring + batch assembly (ftjax `time/rollout_s`; tunix its
  `_generate_and_compute_advantage`); step s: median of iteration - rollout.
- compile s: the warm-up iterations' time beyond as many warm ones (both sides compile inside
  their loops; ftjax compiles generate a second time at step 2, for the mesh-placed params).
- peak RSS / growth: the child's `ru_maxrss`; growth = peak - RSS before the first iteration.
Goal: ftjax at least as fast as tunix.
Usage: python -m benchmarks.bench_vs_tunix [--tunix-python PATH] [--prompts 2] [--group 4]
       [--new-tokens 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import bench_vs_trl as common_grpo

# (framework, credit as shown, --side, --credit): the table's rows, in order.
SIDES = (
    ("tunix GRPOLearner", "uniform (GRPO)", "tunix", ""),
    ("ftjax", "uniform", "ftjax", "uniform"),
    ("ftjax", "flowtracer", "ftjax", "flowtracer"),
)
DEFAULT_TUNIX_PYTHON = "/work/tunix_venv/bin/python"
PAD_ID = common_grpo.PAD_ID
PROBE_ROWS = 4
LOGP_TOLERANCE = 1e-4  # float32, two implementations of the same network


@dataclasses.dataclass(frozen=True)
class Settings(common_grpo.Settings):
    """bench_vs_trl's settings (its `torch_threads` is unused here), with this side's checks."""

    def __post_init__(self):
        super().__post_init__()
        if self.repeats < 2:  # ftjax's CPU time needs two timed steps
            raise ValueError(f"repeats must be >= 2, got {self.repeats}")
        if self.hidden % 64:
            raise ValueError(f"hidden must be a multiple of 64 (32-wide heads), got {self.hidden}")


def build_checkpoint(s: Settings, directory: pathlib.Path) -> None:
    """A random Qwen3 saved by transformers; no BOS/EOS ids in its config (see the docstring)."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=3 * s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.hidden // 32,
        num_key_value_heads=s.hidden // 64,
        head_dim=32,
        max_position_embeddings=s.prompt_len + s.new_tokens,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=PAD_ID,
    )
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(directory, safe_serialization=True)


def probe_tokens(s: Settings) -> tuple[np.ndarray, np.ndarray]:
    """A fixed prompt and completion batch (no pad or EOS ids) for the same-network check."""
    rng = np.random.default_rng(1)
    prompt_RxL = rng.integers(1, s.vocab, (PROBE_ROWS, s.prompt_len)).astype(np.int32)
    completion_RxN = rng.integers(1, s.vocab, (PROBE_ROWS, s.new_tokens)).astype(np.int32)
    return prompt_RxL, completion_RxN


def ftjax_probe_log_probs(s: Settings, checkpoint: pathlib.Path) -> list:
    from ftjax import rl
    from ftjax.models import hf

    _, model = hf.load_checkpoint(checkpoint)
    prompt_RxL, completion_RxN = probe_tokens(s)
    tokens_RxT = np.concatenate([prompt_RxL, completion_RxN], axis=1)
    logp_RxT, _ = rl.next_token_log_probs(model(tokens_RxT).logits_BxTxV, tokens_RxT)
    return np.asarray(logp_RxT[:, s.prompt_len :]).tolist()


class ClockedTask(common_grpo.TokenTask):
    """`bench_vs_trl`'s task, noting the process CPU time when step i asks for its prompts
    (start index i * P; a later call for the same start, e.g. after a setup probe, wins)."""

    def __init__(self, prompts_SxL: np.ndarray):
        super().__init__(prompts_SxL)
        self.cpu_at_start: dict[int, float] = {}

    def prompts(self, start: int, count: int) -> list[list[int]]:
        self.cpu_at_start[start] = time.process_time()
        return super().prompts(start, count)


def run_ftjax(s: Settings, checkpoint: pathlib.Path, credit_name: str, run_dir) -> dict:
    """`s.steps` iterations of `loop.run` (the production loop) from the checkpoint, as
    `bench_vs_trl` runs them, plus CPU times and the probe log-probs."""
    from ftjax import loop
    from ftjax.models import hf

    _, model = hf.load_checkpoint(checkpoint)
    task = ClockedTask(common_grpo.prompt_table_SxL(s))
    step_cfg, loop_cfg = common_grpo.ftjax_configs(s, credit_name)
    before = common_grpo.rss_mib()
    history = loop.run(model, task, step_cfg, loop_cfg, run_dir).history
    seconds = [history[i]["time/rollout_s"] + history[i]["time/step_s"] for i in range(s.steps)]
    rollout_s = [history[i]["time/rollout_s"] for i in range(s.warmup, s.steps)]
    result = common_grpo.measurement(s, seconds[s.warmup :], rollout_s, task.scored_lengths, before)
    # CPU per iteration: from one step's prompts to the next's (the last step has no next one)
    cpu = [task.cpu_at_start[i * s.prompts] for i in range(s.warmup, s.steps)]
    return {
        **result,
        "cpu_s": np.diff(cpu).tolist(),
        "warmup_s": float(sum(seconds[: s.warmup])),
        "loss": float(history[s.steps - 1]["loss"]),
        "probe_logp": ftjax_probe_log_probs(s, checkpoint),
    }


def tunix_model_config(checkpoint: pathlib.Path):
    from tunix.models.qwen3 import model as qwen3

    hf = json.loads((checkpoint / "config.json").read_text())
    rope = hf.get("rope_parameters") or {"rope_theta": hf["rope_theta"]}
    return qwen3.ModelConfig(
        num_layers=hf["num_hidden_layers"],
        vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"],
        num_heads=hf["num_attention_heads"],
        head_dim=hf["head_dim"],
        num_kv_heads=hf["num_key_value_heads"],
        rope_theta=int(rope["rope_theta"]),
        norm_eps=hf["rms_norm_eps"],
        use_tied_embedding=hf["tie_word_embeddings"],
    )


def completion_ids(text: str) -> list[int]:
    """The word tokenizer's decoded "t12 t7 ..." back to token ids."""
    return [int(word[1:]) for word in text.split() if word.startswith("t")]


def run_tunix(s: Settings, checkpoint: pathlib.Path) -> dict:
    """`s.steps` global steps of tunix's `GRPOLearner.train()` from the checkpoint."""
    import jax
    import optax
    from flax import nnx
    from tunix.models.qwen3 import params as qwen3_params
    from tunix.rl import common as tunix_common
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=auto, devices=jax.devices()[:1])
    model = qwen3_params.create_model_from_safe_tensors(
        str(checkpoint), tunix_model_config(checkpoint), mesh
    )
    tokenizer = common_grpo.word_tokenizer(s.vocab)

    prompt_RxL, completion_RxN = probe_tokens(s)
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh):
        probe = tunix_common.compute_per_token_logps(
            graphdef, state, prompt_RxL, completion_RxN, pad_id=PAD_ID, eos_id=s.vocab
        )
    probe_logp = np.asarray(probe).tolist()

    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(s.lr, 0.9, 0.999, weight_decay=0.0)
    )
    cluster = rl_cluster_lib.RLCluster(
        actor=model,
        reference=None,
        tokenizer=tokenizer,
        cluster_config=rl_cluster_lib.ClusterConfig(
            role_to_mesh={role: mesh for role in rl_cluster_lib.Role},
            rollout_engine="vanilla",
            offload_to_cpu=False,
            training_config=rl_cluster_lib.RLTrainingConfig(
                actor_optimizer=optimizer,
                eval_every_n_steps=10**9,
                max_steps=s.steps,
                pbar_description=None,
            ),
            rollout_config=base_rollout.RolloutConfig(
                max_tokens_to_generate=s.new_tokens,
                max_prompt_length=s.prompt_len,
                kv_cache_size=s.prompt_len + s.new_tokens,
                temperature=1.0,
                top_p=1.0,
                top_k=None,
            ),
        ),
    )
    lengths: list[int] = []
    masked_tokens: list[int] = []
    rollout_s: list[float] = []
    ends: list[float] = []
    cpu_at_end: list[float] = []

    def token_reward(prompts, completions, **kwargs):
        return [common_grpo.reward(completion_ids(text)) for text in completions]

    class TimedGRPOLearner(grpo_learner.GRPOLearner):
        def _generate_and_compute_advantage(self, training_input, mode=rl_cluster_lib.Mode.TRAIN):
            start = time.perf_counter()
            example = jax.block_until_ready(
                super()._generate_and_compute_advantage(training_input, mode)
            )
            rollout_s.append(time.perf_counter() - start)
            mask_BxN = np.asarray(example.completion_mask)
            lengths.extend([mask_BxN.shape[1]] * mask_BxN.shape[0])
            masked_tokens.append(int(mask_BxN.size - mask_BxN.sum()))
            return example

        def _run_global_step(self, *args, **kwargs):
            super()._run_global_step(*args, **kwargs)
            jax.block_until_ready(nnx.state(self.rl_cluster.actor_trainer.model))
            ends.append(time.perf_counter())
            cpu_at_end.append(time.process_time())

    learner = TimedGRPOLearner(
        rl_cluster=cluster,
        algo_config=grpo_learner.GRPOConfig(
            num_generations=s.group,
            num_iterations=1,
            beta=0.0,
            epsilon=0.2,
            loss_agg_mode="token-mean",
        ),
        reward_fns=token_reward,
    )
    # an array, not a list: tunix repeats each batch's leaves G times, and a list's are its strings
    prompts = np.array([" ".join(f"t{i}" for i in row) for row in common_grpo.prompt_table_SxL(s)])
    batches = [{"prompts": prompts[i * s.prompts : (i + 1) * s.prompts]} for i in range(s.steps)]
    before = common_grpo.rss_mib()
    start = time.perf_counter()
    learner.train(batches)
    if len(ends) != s.steps:
        raise RuntimeError(f"tunix ran {len(ends)} global steps, expected {s.steps}")
    iteration_s = np.diff([start, *ends])
    result = common_grpo.measurement(
        s, iteration_s[s.warmup :], rollout_s[s.warmup :], lengths, before
    )
    losses = cluster.actor_trainer.metrics_logger.get_metric_history("actor", "loss", "train")
    return {
        **result,
        "cpu_s": np.diff(cpu_at_end[s.warmup - 1 :]).tolist(),
        "warmup_s": float(np.sum(iteration_s[: s.warmup])),
        "loss": float(losses[-1]),
        "masked_sampled_tokens": int(sum(masked_tokens)),
        "probe_logp": probe_logp,
    }


def tunix_python(path: str) -> str:
    """The tunix venv's interpreter, or a clear exit saying how to make it."""
    if not pathlib.Path(path).is_file():
        raise SystemExit(
            f"no tunix interpreter at {path}. tunix runs in a virtualenv of its own (its pins "
            "and dependencies stay out of ours); create it with:\n"
            "  python3 -m venv /work/tunix_venv && /work/tunix_venv/bin/pip install google-tunix\n"
            "then pass --tunix-python /work/tunix_venv/bin/python (or set TUNIX_PYTHON)"
        )
    return path


def spawn(python: str, side: str, credit: str, s: Settings, checkpoint, work: pathlib.Path):
    """Run one side in a fresh interpreter (its own peak RSS) and read back its JSON result."""
    out = work / f"{side}-{credit}.json"
    flags = [f"--{f.name.replace('_', '-')}={getattr(s, f.name)}" for f in dataclasses.fields(s)]
    command = [python, "-m", "benchmarks.bench_vs_tunix", f"--side={side}"]
    command += [f"--credit={credit}", f"--checkpoint={checkpoint}", f"--out={out}", *flags]
    repo = pathlib.Path(__file__).resolve().parents[1]
    # the tunix venv has no ftjax installed: the children import benchmarks/ from the repository
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(command, capture_output=True, text=True, cwd=repo, env=env)
    if done.returncode:
        raise SystemExit(f"{side} side failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return json.loads(out.read_text())


def combine(rounds: list[dict], warmup: int) -> dict:
    """`bench_vs_trl.combine` plus: the fastest warm iteration, the median CPU time of one, and
    compile s, the warm-up iterations' time beyond `warmup` warm ones (median over the rounds;
    mostly XLA compilation, on both sides)."""
    combined = common_grpo.combine(rounds)
    extra = [r["warmup_s"] - warmup * float(np.median(r["iteration_s"])) for r in rounds]
    return {
        **combined,
        "fastest_s": float(min(min(r["iteration_s"]) for r in rounds)),
        "cpu_s": float(np.median(np.concatenate([r["cpu_s"] for r in rounds]))),
        "compile_s": float(np.median(extra)),
    }


def table(rows: list[tuple[str, str, dict]]) -> str:
    """Markdown table. The last column divides this row's median iteration, fastest iteration
    and CPU time per iteration by tunix's (<= 1: at least as fast). Under other jobs' load the
    wall times stretch; the fastest iteration and the CPU time stretch less."""
    tunix = next(r for name, _, r in rows if name.startswith("tunix"))
    lines = [
        "| framework | credit | batch (B x T) | iteration s | fastest s | rollout s | step s "
        "| CPU s / iteration | compile s | peak RSS MiB | RSS growth MiB "
        "| / tunix's: median, fastest, CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, credit_name, r in rows:
        B, T = r["batch_BxT"]
        ratios = ", ".join(
            f"{r[key] / tunix[key]:.2f}" for key in ("iteration_s", "fastest_s", "cpu_s")
        )
        lines.append(
            f"| {name} | {credit_name} | {B} x {T} | {r['iteration_s']:.3f} "
            f"| {r['fastest_s']:.3f} | {r['rollout_s']:.3f} | {r['step_s']:.3f} "
            f"| {r['cpu_s']:.3f} | {r['compile_s']:.1f} | {r['peak_rss_mib']:.0f} "
            f"| {r['rss_growth_mib']:.0f} | {ratios} |"
        )
    return "\n".join(lines)


def probe_gap(results: list[dict]) -> float:
    """Largest |log p| difference between any side's probe log-probs and the first's."""
    first = np.asarray(results[0]["probe_logp"])
    return max(float(np.max(np.abs(np.asarray(r["probe_logp"]) - first))) for r in results)


def versions_line(python: str) -> str:
    import flax
    import jax
    import transformers

    query = (
        "import importlib.metadata as m; print(' '.join(m.version(p) for p in "
        "('google-tunix', 'jax', 'flax', 'optax')))"
    )
    tunix, tjax, tflax, toptax = subprocess.run(
        [python, "-c", query], capture_output=True, text=True, check=True
    ).stdout.split()
    return (
        f"ftjax side: jax {jax.__version__}, flax {flax.__version__}; tunix side: google-tunix "
        f"{tunix}, jax {tjax}, flax {tflax}, optax {toptax}; checkpoint by transformers "
        f"{transformers.__version__}; {os.cpu_count()} CPU cores"
    )


def parse_args(argv=None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(Settings):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default
        )
    parser.add_argument("--rounds", type=int, default=2, help="times each side is run, alternating")
    parser.add_argument(
        "--tunix-python",
        default=os.environ.get("TUNIX_PYTHON", DEFAULT_TUNIX_PYTHON),
        help="interpreter of a virtualenv with google-tunix installed",
    )
    parser.add_argument("--side", choices=("ftjax", "tunix"), help=argparse.SUPPRESS)
    parser.add_argument("--credit", default="", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=pathlib.Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    return args, settings


def child(args: argparse.Namespace, s: Settings) -> None:
    if args.side == "tunix":
        result = run_tunix(s, args.checkpoint)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            run_dir = pathlib.Path(scratch)
            result = run_ftjax(s, args.checkpoint, args.credit, run_dir)
    args.out.write_text(json.dumps(result))


def main(argv=None) -> None:
    args, s = parse_args(argv)
    if args.side:
        child(args, s)
        return
    python = tunix_python(args.tunix_python)
    load_before = os.getloadavg()[0]
    runs = {row: [] for row in SIDES}
    with tempfile.TemporaryDirectory() as scratch:
        work = pathlib.Path(scratch)
        build_checkpoint(s, work / "model")
        for _ in range(args.rounds):  # alternate the sides so that load changes hit all alike
            for row in SIDES:
                exe = python if row[2] == "tunix" else sys.executable
                runs[row].append(spawn(exe, row[2], row[3], s, work / "model", work))
    gap = probe_gap([results[0] for results in runs.values()])
    if gap > LOGP_TOLERANCE:
        raise SystemExit(f"the sides do not run the same network: probe log-probs differ by {gap}")
    masked = sum(r["masked_sampled_tokens"] for r in runs[SIDES[0]])
    print(versions_line(python))
    print(
        f"qwen3 hidden {s.hidden} x {s.layers} layers, vocab {s.vocab}, tied embeddings; "
        f"{s.prompts} prompts x {s.group} samples, prompt {s.prompt_len}, {s.new_tokens} new "
        f"tokens (temperature 1, no early stop); medians of {args.rounds} x {s.repeats} "
        f"iterations, each run after {s.warmup} warm-up; probe log-probs agree to {gap:.1e}; "
        f"tunix masked {masked} sampled pad tokens over its rounds; 1-min load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    print(table([(row[0], row[1], combine(results, s.warmup)) for row, results in runs.items()]))


if __name__ == "__main__":
    main()
