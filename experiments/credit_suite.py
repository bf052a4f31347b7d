"""Every built-in credit variant x both tasks x several seeds, same compute per run.

    python -m experiments.credit_suite [--seeds 5] [--tasks chain,countdown] [--rl_steps 40]

Per (task, seed): one supervised warm-up (shared by all variants, so every variant starts from the
same policy), then one RL run per credit variant with the same prompts, rollout budget and
optimiser. Reported per (task, variant), mean +/- standard error over seeds:
- final accuracy: mean reward of one temperature-1 sample per held-out prompt (what RL
  optimises), and greedy accuracy, after RL;
- steps to target: the first step whose 5-step running mean of the rollout reward reaches
  --target.<task> (runs that never reach it count as --rl_steps + 1, and are counted);
- credit precision@40% (chain task): of the tokens a variant ranks in each response's top 40%
  (by gamma, ties at random), the share on the answer's dependency chain, from the task's
  ground-truth labels, on responses of the final policy. A variant without a preference scores
  the base rate.
Each finished run is saved as JSON under --out and reused when the suite is run again.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time

import jax
import numpy as np
from flax import nnx

from experiments import common
from ftjax import credit, evaluation, rollout, sft, tasks
from ftjax.logging import read_jsonl
from ftjax.tasks.countdown import CountdownConfig

BUILT_IN = (
    "uniform",
    "flowtracer",
    "flowtracer_soft",
    "flowtracer_inverse",
    "random",
    "entropy",
    "entropy_select",
    "attention_received",
    "attention_received_mean",
    "attention_max",
)  # `oracle` is left out: it needs labels, which countdown has not


@dataclasses.dataclass(frozen=True)
class TaskSetting:
    prompt_len: int
    max_new_tokens: int
    target: float  # rollout reward the "steps to target" column waits for


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    out: str = "runs/credit_suite"
    seeds: int = 5
    tasks: tuple[str, ...] = ("chain", "countdown")
    credits: tuple[str, ...] = BUILT_IN
    plugins: tuple[str, ...] = ()  # .py files to import first (your own credit variants)
    rl_steps: int = 40
    eval_prompts: int = 256
    precision_responses: int = 128
    base: common.ChainSetting = common.ChainSetting(progress=False)
    countdown: CountdownConfig = CountdownConfig(num_numbers=3, max_number=9, max_target=30)
    countdown_warmup: sft.SFTConfig = sft.SFTConfig(
        steps=400, batch_size=32, lr=3e-3, warmup_steps=40
    )
    chain_setting: TaskSetting = TaskSetting(prompt_len=44, max_new_tokens=44, target=0.35)
    countdown_setting: TaskSetting = TaskSetting(prompt_len=12, max_new_tokens=24, target=0.2)

    def __post_init__(self):
        for name in self.tasks:
            if name not in tasks.TASKS:
                raise ValueError(f"unknown task {name!r}; known: {sorted(tasks.TASKS)}")
        if self.seeds < 1 or self.rl_steps < 1:
            raise ValueError(f"seeds and rl_steps must be >= 1, got {self.seeds}, {self.rl_steps}")


def _task(cfg: SuiteConfig, name: str, seed: int):
    if name == "chain":
        return tasks.ChainTask(dataclasses.replace(cfg.base.task, seed=seed)), cfg.chain_setting
    return tasks.CountdownTask(dataclasses.replace(cfg.countdown, seed=seed)), cfg.countdown_setting


def steps_to_target(rewards: list[float], target: float, window: int = 5) -> int | None:
    for step in range(len(rewards)):
        if np.mean(rewards[max(0, step - window + 1) : step + 1]) >= target:
            return step
    return None


def run_one(cfg: SuiteConfig, task_name: str, seed: int, name: str, warm_params, out) -> dict:
    path = out / f"{task_name}_seed{seed}_{name}.json"
    run_dir = out / f"{task_name}_seed{seed}" / f"rl_{name}"
    task, setting = _task(cfg, task_name, seed)
    if path.exists():  # a finished run; steps to target are re-read for today's --target
        result = json.loads(path.read_text())
        history = read_jsonl(run_dir / "metrics.jsonl")
        rewards = [history[s]["reward_mean"] for s in sorted(history)]
        return {**result, "steps_to_target": steps_to_target(rewards, setting.target)}
    qs = dataclasses.replace(
        cfg.base,
        seed=seed,
        rl_steps=cfg.rl_steps,
        prompt_len=setting.prompt_len,
        max_new_tokens=setting.max_new_tokens,
    )
    started = time.perf_counter()
    model, history = common.rl_run(
        warm_params,
        qs.policy,
        task,
        common.step_config(qs, name),
        common.loop_config(qs),
        run_dir,
    )
    rng = jax.random.PRNGKey(seed + 7)
    args = (model, task, common.EVAL_START, cfg.eval_prompts, setting.prompt_len)
    result = {
        "accuracy": evaluation.accuracy(
            *args, rollout.sampling_config(task, setting.max_new_tokens, 1.0), rng
        ),
        "accuracy_greedy": evaluation.accuracy(
            *args, rollout.sampling_config(task, setting.max_new_tokens, 0.0), rng
        ),
        "steps_to_target": steps_to_target(
            [history[s]["reward_mean"] for s in sorted(history)], setting.target
        ),
        "step_seconds": common.median_step_seconds(history),
        "wall_seconds": time.perf_counter() - started,
    }
    if task_name == "chain":
        result["precision"] = common.credit_precision(
            model,
            task,
            [name],
            cfg.precision_responses,
            setting.prompt_len,
            setting.max_new_tokens,
            rng,
        )[name]
    path.write_text(json.dumps(result) + "\n")
    return result


def table(cfg: SuiteConfig, results: dict) -> str:
    lines = [
        "| task | credit | final accuracy (sampled) | final accuracy (greedy) | "
        "steps to target (reached) | precision@40% |",
        "|---|---|---|---|---|---|",
    ]
    for task_name in cfg.tasks:
        for name in cfg.credits:
            runs = [results[(task_name, seed, name)] for seed in range(cfg.seeds)]
            reached = [r["steps_to_target"] for r in runs if r["steps_to_target"] is not None]
            steps = [
                r["steps_to_target"] if r["steps_to_target"] is not None else cfg.rl_steps + 1
                for r in runs
            ]
            precision = (
                common.show([r.get("precision") for r in runs]) if task_name == "chain" else "-"
            )
            lines.append(
                f"| {task_name} | {name} | {common.show([r['accuracy'] for r in runs])} | "
                f"{common.show([r['accuracy_greedy'] for r in runs])} | "
                f"{common.show(steps)} ({len(reached)}/{len(runs)}) | {precision} |"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> str:
    cfg = common.parse(SuiteConfig(), argv)
    credit.load_plugins(cfg.base.plugins)
    for name in cfg.credits:
        credit.get(name)  # unknown names fail here, before any work
    out = pathlib.Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results, before = {}, {}
    for task_name in cfg.tasks:
        for seed in range(cfg.seeds):
            task, setting = _task(cfg, task_name, seed)
            warmup = cfg.base.warmup if task_name == "chain" else cfg.countdown_warmup
            model = common.build_policy(cfg.base.policy, seed)
            common.warm_up(
                model,
                task,
                warmup,
                setting.prompt_len,
                setting.max_new_tokens,
                out / f"{task_name}_seed{seed}" / "warmup",
                progress=False,
            )
            before[(task_name, seed)] = evaluation.accuracy(
                model,
                task,
                common.EVAL_START,
                cfg.eval_prompts,
                setting.prompt_len,
                rollout.sampling_config(task, setting.max_new_tokens, 1.0),
                jax.random.PRNGKey(seed + 7),
            )
            warm_params = nnx.state(model, nnx.Param)
            for name in cfg.credits:
                results[(task_name, seed, name)] = run_one(
                    cfg, task_name, seed, name, warm_params, out
                )
                r = results[(task_name, seed, name)]
                print(
                    f"{task_name} seed {seed} {name:>20}: accuracy {before[(task_name, seed)]:.3f}"
                    f" -> {r['accuracy']:.3f}, steps to target {r['steps_to_target']}, "
                    f"{r['wall_seconds']:.0f} s",
                    flush=True,
                )
    text = table(cfg, results)
    lines = [text, ""]
    for task_name in cfg.tasks:
        accs = [before[(task_name, s)] for s in range(cfg.seeds)]
        lines.append(f"{task_name}: sampled accuracy after warm-up (before RL) {common.show(accs)}")
    lines.append(f"wall time {time.perf_counter() - started:.0f} s")
    text = "\n".join(lines)
    (out / "table.md").write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
