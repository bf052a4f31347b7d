"""One GRPO iteration (generate -> score -> train step): ftjax vs TRL's GRPOTrainer, both on CPU.

A random Llama-family model is built with transformers (float32), saved as safetensors, and both
frameworks load that checkpoint, so they train the very same network on the same prompts: P
prompts x G samples, temperature 1, exactly N new tokens each (the tokenizer's EOS id lies outside
the model's vocabulary, so no sequence stops early), one reward on the token ids, group-normalised
advantages, clipped surrogate summed over all response tokens / their count (TRL "dapo", ftjax
"token-mean"), no KL, AdamW (same lr, betas, clip 1.0, constant schedule), one optimiser step per
generation, no activation checkpointing (ftjax has none; TRL turns it on by default).

Each framework runs in its own fresh subprocess (torch with as many threads as JAX's CPU pool),
`--rounds` times, the sides alternating so that load on a shared machine hits all alike. Measured:
- iteration s: median wall time of one warm iteration. ftjax: `loop.run`'s own per-step timers
  (rollout + step: everything but the metric sinks and the end-of-run checkpoint). TRL: time
  between consecutive `on_step_end` callbacks of `trainer.train()`, i.e. all the trainer does
  per step (logging and saving switched off).
- rollout s: generation + scoring + batch assembly (ftjax: `time/rollout_s`; TRL: its
  `_generate_and_score_completions`); step s: median of iteration - rollout.
- peak RSS: the process's `ru_maxrss` (Linux, KiB) at the end; growth = peak - RSS just before
  the first iteration (after imports and model load), i.e. what the iterations (including ftjax's
  XLA compilations) add. Both the largest over the rounds.
Goal: ftjax at least as fast as TRL. Needs the bench extra (trl, datasets) for the TRL side.
Usage: python -m benchmarks.bench_vs_trl [--prompts 2] [--group 4] [--new-tokens 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

# (framework, credit as shown, --side, --credit): the table's rows, in order.
SIDES = (
    ("TRL GRPOTrainer", "uniform (GRPO)", "trl", ""),
    ("ftjax", "uniform", "ftjax", "uniform"),
    ("ftjax", "flowtracer", "ftjax", "flowtracer"),
)
ANSWER_TOKENS = 8  # the answer span (FlowTracer's sink) is each response's last tokens
PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class Settings:
    prompts: int = 2
    group: int = 4
    prompt_len: int = 16
    new_tokens: int = 64
    hidden: int = 256
    layers: int = 4
    vocab: int = 1024
    lr: float = 1e-6
    warmup: int = 2  # ftjax compiles generate twice: for the loaded and the mesh-placed params
    repeats: int = 5
    torch_threads: int = os.cpu_count() or 1

    def __post_init__(self):
        if self.group < 2:
            raise ValueError(f"GRPO needs a group of >= 2 samples, got {self.group}")
        if self.warmup < 1 or self.repeats < 1:
            raise ValueError(f"warmup and repeats must be >= 1, got {self.warmup}, {self.repeats}")

    @property
    def steps(self) -> int:
        return self.warmup + self.repeats


def prompt_table_SxL(s: Settings) -> np.ndarray:
    """Every prompt of the run, in order: rows i*P .. (i+1)*P - 1 are iteration i's prompts."""
    rng = np.random.default_rng(0)
    return rng.integers(1, s.vocab, (s.steps * s.prompts, s.prompt_len)).astype(np.int32)


def reward(response: list[int]) -> float:
    """Share of even token ids: cheap, deterministic, and varies within a group."""
    return float(np.mean(np.asarray(response) % 2 == 0)) if response else 0.0


class TokenTask:
    """`rollout.Task` over the fixed prompt table; records each scored response's length."""

    def __init__(self, prompts_SxL: np.ndarray):
        self.prompts_SxL = prompts_SxL
        self.scored_lengths: list[int] = []

    def prompts(self, start: int, count: int) -> list[list[int]]:
        return self.prompts_SxL[start : start + count].tolist()

    def score(self, prompt: list[int], response: list[int]) -> tuple[float, list[bool]]:
        self.scored_lengths.append(len(response))
        span = [i >= len(response) - ANSWER_TOKENS for i in range(len(response))]
        return reward(response), span


def build_checkpoint(s: Settings, directory: pathlib.Path) -> None:
    """A random Llama saved by transformers; no EOS id in its configs (see the module docstring)."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=3 * s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=max(s.hidden // 32, 1),
        num_key_value_heads=max(s.hidden // 64, 1),
        max_position_embeddings=s.prompt_len + s.new_tokens,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=PAD_ID,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(directory, safe_serialization=True)


def rss_mib() -> float:
    """Current resident set size (Linux /proc)."""
    pages = int(pathlib.Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: KiB


def measurement(s: Settings, iteration_s, rollout_s, lengths: list[int], before_mib: float):
    """One side's timed iterations, the batch shape it trained and its memory figures."""
    peak = peak_rss_mib()
    return {
        "iteration_s": [float(x) for x in iteration_s],
        "rollout_s": [float(x) for x in rollout_s],
        "batch_BxT": [len(lengths) // s.steps, s.prompt_len + max(lengths)],
        "min_new_tokens": min(lengths),
        "peak_rss_mib": peak,
        "rss_growth_mib": peak - before_mib,
    }


def combine(rounds: list[dict]) -> dict:
    """Medians over every round's timed iterations (step = iteration - rollout, per iteration);
    the largest memory figures; the batch shape, which must be the same in every round."""
    iteration_s = np.concatenate([r["iteration_s"] for r in rounds])
    rollout_s = np.concatenate([r["rollout_s"] for r in rounds])
    shapes = {tuple(r["batch_BxT"]) for r in rounds}
    if len(shapes) != 1:
        raise ValueError(f"rounds trained different batch shapes: {shapes}")
    return {
        "iteration_s": float(np.median(iteration_s)),
        "rollout_s": float(np.median(rollout_s)),
        "step_s": float(np.median(iteration_s - rollout_s)),
        "batch_BxT": shapes.pop(),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in rounds),
        "rss_growth_mib": max(r["rss_growth_mib"] for r in rounds),
    }


def ftjax_configs(s: Settings, credit_name: str):
    """(StepConfig, LoopConfig) of ftjax's side: GRPO token-mean, no KL, one device."""
    from ftjax import credit, loop, rl, sampling, sharding, train
    step_cfg = train.StepConfig(
        group_size=s.group,
        loss=rl.LossConfig(aggregation="token-mean"),
        credit=credit.CreditConfig(name=credit_name),
        optim=train.OptimConfig(lr=s.lr),
    )
    loop_cfg = loop.LoopConfig(
        steps=s.steps,
        prompts_per_step=s.prompts,
        prompt_len=s.prompt_len,
        sampling=sampling.SamplingConfig(
            max_new_tokens=s.new_tokens, temperature=1.0, pad_id=PAD_ID
        ),
        checkpoint_every=s.steps,
        mesh=sharding.MeshConfig(data=1, fsdp=1),
        progress=False,
    )
    return step_cfg, loop_cfg


def run_ftjax(s: Settings, checkpoint: pathlib.Path, credit_name: str, run_dir) -> dict:
    """`s.steps` iterations of `loop.run` (the production loop) from the checkpoint."""
    from ftjax import loop
    from ftjax.models import hf

    _, model = hf.load_checkpoint(checkpoint)
    task = TokenTask(prompt_table_SxL(s))
    step_cfg, loop_cfg = ftjax_configs(s, credit_name)
    before = rss_mib()
    history = loop.run(model, task, step_cfg, loop_cfg, run_dir).history
    timed = [history[i] for i in range(s.warmup, s.steps)]
    rollout_s = [m["time/rollout_s"] for m in timed]
    iteration_s = [m["time/rollout_s"] + m["time/step_s"] for m in timed]
    result = measurement(s, iteration_s, rollout_s, task.scored_lengths, before)
    return {**result, "loss": float(timed[-1]["loss"])}


def require_trl():
    try:
        import datasets  # noqa: F401
        import trl
    except ImportError as error:
        raise SystemExit(
            f"the TRL side needs trl and datasets ({error}); "
            "install them with: pip install -e '.[bench]'"
        ) from None
    return trl


def word_tokenizer(vocab: int):
    """Token id i <-> word "t{i}", plus an EOS id (= vocab) the model can never sample."""
    import tokenizers
    import transformers

    words = {f"t{i}": i for i in range(vocab)} | {"eos": vocab}
    inner = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token=f"t{PAD_ID}"))
    inner.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=inner, pad_token=f"t{PAD_ID}", eos_token="eos", padding_side="left"
    )


def run_trl(s: Settings, checkpoint: pathlib.Path, out_dir) -> dict:
    """`s.steps` steps of `GRPOTrainer.train()` from the checkpoint, timed by a callback."""
    trl = require_trl()
    import datasets
    import torch
    import transformers

    torch.set_num_threads(s.torch_threads)
    lengths: list[int] = []

    def token_reward(prompts, completions, completion_ids, **kwargs):
        lengths.extend(len(ids) for ids in completion_ids)
        return [reward(ids) for ids in completion_ids]

    rollout_s: list[float] = []

    class TimedGRPOTrainer(trl.GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            start = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            rollout_s.append(time.perf_counter() - start)
            return out

    class StepClock(transformers.TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    prompts = [" ".join(f"t{i}" for i in row) for row in prompt_table_SxL(s)]
    config = trl.GRPOConfig(
        output_dir=str(out_dir),
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        max_steps=s.steps,
        per_device_train_batch_size=s.prompts * s.group,
        num_generations=s.group,
        gradient_accumulation_steps=1,
        num_iterations=1,
        shuffle_dataset=False,
        max_completion_length=s.new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        learning_rate=s.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=1.0,
        activation_checkpointing=False,
        dataloader_num_workers=0,
    )
    clock = StepClock()
    trainer = TimedGRPOTrainer(
        model=transformers.LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32),
        reward_funcs=token_reward,
        args=config,
        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
        processing_class=word_tokenizer(s.vocab),
        callbacks=[clock],
    )
    before = rss_mib()
    output = trainer.train()
    iteration_s = np.diff(clock.ends)[s.warmup - 1 :]
    result = measurement(s, iteration_s, rollout_s[s.warmup :], lengths, before)
    return {**result, "loss": float(output.training_loss)}


def spawn(side: str, credit: str, s: Settings, checkpoint: pathlib.Path, work: pathlib.Path):
    """Run one side in a fresh interpreter (its own peak RSS) and read back its JSON result."""
    out = work / f"{side}-{credit}.json"
    flags = [f"--{f.name.replace('_', '-')}={getattr(s, f.name)}" for f in dataclasses.fields(s)]
    command = [sys.executable, "-m", "benchmarks.bench_vs_trl", f"--side={side}"]
    command += [f"--credit={credit}", f"--checkpoint={checkpoint}", f"--out={out}", *flags]
    repo = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run(command, capture_output=True, text=True, cwd=repo)
    if done.returncode:
        raise SystemExit(f"{side} side failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return json.loads(out.read_text())


def table(rows: list[tuple[str, str, dict]]) -> str:
    """Markdown table; speed-up = TRL iteration time / this row's (>= 1: at least as fast)."""
    trl_s = next(r["iteration_s"] for name, _, r in rows if name == "TRL GRPOTrainer")
    lines = [
        "| framework | credit | batch (B x T) | iteration s | rollout s | step s | peak RSS MiB "
        "| RSS growth MiB | speed-up vs TRL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, credit_name, r in rows:
        B, T = r["batch_BxT"]
        lines.append(
            f"| {name} | {credit_name} | {B} x {T} | {r['iteration_s']:.3f} | {r['rollout_s']:.3f} "
            f"| {r['step_s']:.3f} | {r['peak_rss_mib']:.0f} | {r['rss_growth_mib']:.0f} "
            f"| {trl_s / r['iteration_s']:.2f} |"
        )
    return "\n".join(lines)


def versions_line(s: Settings) -> str:
    import flax
    import jax
    import torch
    import transformers
    import trl

    return (
        f"jax {jax.__version__}, flax {flax.__version__}, torch {torch.__version__} "
        f"({s.torch_threads} threads), transformers {transformers.__version__}, "
        f"trl {trl.__version__}, {os.cpu_count()} CPU cores"
    )


def parse_args() -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(Settings):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default
        )
    parser.add_argument("--rounds", type=int, default=2, help="times each side is run, alternating")
    parser.add_argument("--side", choices=("ftjax", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--credit", default="", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=pathlib.Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    return args, settings


def main() -> None:
    args, s = parse_args()
    if args.side:  # a child: one side, result as JSON
        with tempfile.TemporaryDirectory() as scratch:
            if args.side == "trl":
                result = run_trl(s, args.checkpoint, scratch)
            else:
                result = run_ftjax(s, args.checkpoint, args.credit, scratch)
        args.out.write_text(json.dumps(result))
        return
    require_trl()
    load_before = os.getloadavg()[0]
    runs = {row: [] for row in SIDES}
    with tempfile.TemporaryDirectory() as scratch:
        work = pathlib.Path(scratch)
        build_checkpoint(s, work / "model")
        for _ in range(args.rounds):  # alternate the sides so that load changes hit all alike
            for row in SIDES:
                runs[row].append(spawn(row[2], row[3], s, work / "model", work))
    print(versions_line(s))
    print(
        f"llama hidden {s.hidden} x {s.layers} layers, vocab {s.vocab}; {s.prompts} prompts x "
        f"{s.group} samples, prompt {s.prompt_len}, {s.new_tokens} new tokens (temperature 1, no "
        f"early stop); medians of {args.rounds} x {s.repeats} iterations, each run after "
        f"{s.warmup} warm-up; 1-min load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after"
    )
    print(table([(row[0], row[1], combine(results)) for row, results in runs.items()]))


if __name__ == "__main__":
    main()
