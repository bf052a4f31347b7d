"""Dead-end branches (issue 13): does a credit find the queried chain, and does credit on it help?

    python -m experiments.branches_study --stage warmup|analysis|gate|arms|control [--seeds 8]
        [--out runs/branches_study] [--arms uniform,oracle,flowtracer] [--rl_steps 60]

Task: `ftjax/tasks/branches.py`, K = 3 chains of 2 variables (a root and one link), one queried,
mod 5, + and -, links that substitute their parent's value (`c=a+3=4+3=2;`). Policy: 4 layers,
128 wide. Per seed s (task seed s, policy init seed s): ONE supervised warm-up on solver traces
(out/seed{s}/warmup, reused when present) that every stage and arm of that seed starts from.

- `warmup`: each seed's warm-up, its held-out accuracy and its teacher-forced accuracy per kind
  of response token (`experiments/branches_skill.py`: copies, operators, substituted values, link
  values), which says what RL is left to teach.
- `analysis` (the warm-up policy, no RL; `experiments/branches_analysis.py`): on
  `analysis_responses` sampled held-out responses with an answer, each score's precision@40%,
  same-role pairwise AUC and leakage into distractor chains, per captured layer and per FlowTracer
  sink/source; and the causal ground truth: each statement's tokens masked as attention keys and
  the answer re-decoded greedily (the answer-change rate per kind of statement masked).
- `gate`: RL with `uniform`, `oracle` and `oracle_answer` credit from the same warm-up, same
  prompts, same sampling keys (the loop's seed is s in every arm; only the credit name differs).
  PRIMARY ENDPOINT, fixed before any run: per seed the paired difference oracle - uniform of the
  mean rollout reward over all RL steps (`reward_mean` of the run's metrics.jsonl); mean +/- SE
  over seeds, and whether it is more than 2 SE from 0. The same for oracle_answer - uniform
  (added after the first gate: the labels mark what the answer depends on, not the answer, which
  FlowTracer can up-weight). Secondary: greedy and sampled held-out accuracy after RL, paired.
- `arms`: the same for every arm in --arms, each against uniform.
- `control`: the warm-up trained on answer-only demonstrations (`>value<eos>`, same steps), its
  held-out accuracy against chance (1/modulus) and the worksheet warm-up's.

Every finished run and analysis is saved as JSON under --out and reused when run again; the
settings that define them are kept beside them, and a rerun under other settings is refused.
Each stage prints and writes out/<stage>.md and out/<stage>.json.
The defaults were chosen from warm-up read-outs; no RL result bore on the choice
(experiments/RESULTS.md, "Dead-end branches: calibrating the warm-up"). Tiny policies learn the
worksheet's layout first, then to copy digits, then the arithmetic. The first default (800
steps at lr 3e-3) copied every number but did little arithmetic (teacher-forced link values
0.33 over 8 seeds), and the oracle gate at it failed (oracle - uniform -0.000 +/- 0.002). Its
learning rate was the cause: at lr 3e-3 seed 0's warm-up had not learned to copy the operator
by step 500, at lr 1e-3 it did the arithmetic (link values 0.99) by step 750
(`python -m experiments.branches_skill`). Where the arithmetic appears differs by seed: at
500 steps seed 0 had it (teacher-forced link values 0.91), seed 1 had not (0.30). The default
now is 800 steps at lr 1e-3: over 8 seeds every number and operator is copied, link values
0.56-1.00 (mean 0.89), held-out greedy accuracy 0.28-1.00 (mean 0.60) against chance 0.2; the
remaining errors are in the arithmetic on some seeds and in the answer lookup on others, and
two seeds solve the task. The oracle gate at it failed again (experiments/RESULTS.md): uniform
RL at lr 1e-4 lowers accuracy, and credit on the queried chain's statements lowers it more.
The RL rate is now 3e-5, chosen with uniform credit alone: on 1024 held-out prompts uniform RL
at 3e-5 raises sampled accuracy (seed 0: 0.568 -> 0.619 in 40 steps, 0.664 in 200) and leaves
greedy accuracy flat (0.693 -> 0.691), where 1e-4 lowers it (0.646); over the 8 seeds it
raises sampled accuracy on 2 of them (the gate at 3e-5 in RESULTS). Held-out accuracy is read
on 1024 prompts (128 gave a binomial SE of 0.04, larger than the effects). A warm-up takes
about 8 min on 2 quiet cores.

On these defaults uniform RL raises sampled accuracy on some seeds and greedy accuracy on none:
the warm-up's errors are guesses that a few thousand rollouts do not teach. The flawed-teacher
setting gives RL something to fix (`--task.slip 0.6 --task.chains 2 --warmup.steps 600
--warmup.warmup_steps 60 --rl_steps 60`; the quickstart's task): the warm-up imitates a teacher
who works out 60% of the `-` links as `+`, and uniform RL raises greedy accuracy
(experiments/RESULTS.md, "Dead-end branches with a flawed teacher").
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shlex
import sys
import time

import jax
import numpy as np
from flax import nnx

from experiments import branches_analysis, branches_skill, common
from experiments.common import mean_se, show
from ftjax import credit, evaluation, loop, rl, rollout, sft, train
from ftjax.tasks.branches import BranchesConfig, BranchesTask, max_lengths

STAGES = ("warmup", "analysis", "gate", "arms", "control")
GATE_ARMS = ("uniform", "oracle", "oracle_answer")
ARMS = (
    "uniform",
    "oracle",
    "oracle_answer",
    "flowtracer",
    "flowtracer_inverse",
    "random",
    "attention_received_mean",
    "entropy",
)


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    stage: str = "gate"
    out: str = "runs/branches_study"
    seeds: int = 8
    # First seed to run (seeds seed_from .. seeds-1): split a study over processes; a last call
    # with seed_from 0 finds every run saved and writes the whole table
    seed_from: int = 0
    task: BranchesConfig = branches_skill.STUDY_TASK
    policy: common.PolicyConfig = branches_skill.STUDY_POLICY
    warmup: sft.SFTConfig = branches_skill.STUDY_WARMUP
    arms: tuple[str, ...] = ARMS  # stage `arms`; stage `gate` runs GATE_ARMS
    plugins: tuple[str, ...] = ()  # .py files to import first (your own credit variants)
    rl_steps: int = 40
    prompts_per_step: int = 8
    group_size: int = 8
    lr: float = 3e-5
    adam_eps: float = 1e-8  # the RL optimizer's Adam epsilon (train.OptimConfig.eps)
    gamma: float = 1.5  # the weight of each arm's selected tokens (the paper's 1.5)
    temperature: float = 1.0
    eval_prompts: int = 1024
    precision_responses: int = 32
    analysis_responses: int = 128
    fraction: float = 0.4
    prompt_len: int | None = None  # None: the longest prompt the task can make
    max_new_tokens: int | None = None  # None: the longest solver response + 4
    # Another study's --out whose warm-ups to start from (made under the same task, policy,
    # warm-up and lengths; checked), e.g. to try another RL budget on the same seeds
    warmups_from: str | None = None
    progress: bool = False

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"unknown StudyConfig.stage {self.stage!r}; known: {STAGES}")
        for name in ("seeds", "rl_steps", "eval_prompts", "precision_responses"):
            if getattr(self, name) < 1:
                raise ValueError(f"StudyConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.seed_from < self.seeds:
            raise ValueError(
                f"StudyConfig.seed_from must be in [0, seeds = {self.seeds}), got {self.seed_from}"
            )
        if self.analysis_responses < 1:
            raise ValueError(
                f"StudyConfig.analysis_responses must be >= 1, got {self.analysis_responses}"
            )
        for name in ("prompt_len", "max_new_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(
                    f"StudyConfig.{name} must be None or >= 1, got {getattr(self, name)}"
                )
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"StudyConfig.fraction must be in (0, 1), got {self.fraction}")
        if self.task.answer_only:
            raise ValueError("StudyConfig.task.answer_only is for stage `control` alone; leave it")
        if "uniform" not in self.arms or len(set(self.arms)) != len(self.arms):
            raise ValueError(
                f"StudyConfig.arms needs 'uniform' (the baseline), no repeats: {self.arms}"
            )
        for name in self.arms:  # an unknown name or a bad gamma: a ValueError before any work
            credit.CreditConfig(name=name, gamma=self.gamma)

    def lengths(self) -> tuple[int, int]:
        """(prompt slots, response slots): the longest prompt and solver response (+ 4) of the
        worksheet task (`branches.max_lengths`), unless given."""
        prompt, response = max_lengths(self.task)
        return self.prompt_len or prompt, self.max_new_tokens or response + 4


WARMUP_KEYS = ("task", "policy", "warmup", "lengths")  # what defines a warm-up


def identity(cfg: StudyConfig) -> dict:
    """The settings every saved warm-up and run under --out was made with."""
    keys = ("task", "policy", "warmup", "rl_steps", "prompts_per_step", "group_size", "lr",
            "adam_eps", "gamma", "temperature", "eval_prompts", "precision_responses",
            "fraction")  # fmt: skip
    out = {k: v for k, v in dataclasses.asdict(cfg).items() if k in keys}
    return json.loads(json.dumps({**out, "lengths": cfg.lengths()}))


def task_of(cfg: StudyConfig, seed: int, answer_only: bool = False) -> BranchesTask:
    return BranchesTask(dataclasses.replace(cfg.task, seed=seed, answer_only=answer_only))


def warm_policy(cfg: StudyConfig, seed: int, out: pathlib.Path, answer_only: bool = False):
    """(the seed's warm-up policy, its held-out accuracy record), trained or restored (from
    --warmups_from's seed directory when it is set). The record is this study's own (under
    `out`, made with its eval_prompts), evaluated when it is missing."""
    home = out if cfg.warmups_from is None else pathlib.Path(cfg.warmups_from) / out.name
    task, (prompt_len, new) = task_of(cfg, seed, answer_only), cfg.lengths()
    name = "warmup_answer_only" if answer_only else "warmup"
    model = common.build_policy(cfg.policy, seed)
    seconds = common.warm_up(model, task, cfg.warmup, prompt_len, new, home / name, cfg.progress)
    path = out / f"{name}.json"
    if path.exists():
        return model, json.loads(path.read_text())
    if (trained := home / f"{name}.json").exists() and seconds == 0.0:  # restored: its time
        seconds = json.loads(trained.read_text())["warmup_seconds"]
    evaluated = task_of(cfg, seed)  # scored as the worksheet task: same prompts, same verifier
    record = {"warmup_seconds": seconds, **accuracies(model, evaluated, cfg, seed)}
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record) + "\n")
    return model, record


def warm_start(cfg: StudyConfig, seed: int, out: pathlib.Path, arms) -> tuple[dict, object]:
    """(the warm-up's accuracy record, its parameters), or (the record, None) without training
    or restoring anything when every arm of this seed has a saved result (a study continued
    from its saved JSON files alone, e.g. experiments/results/branches_study)."""
    record = out / "warmup.json"
    if record.exists() and all((out / f"{arm}.json").exists() for arm in arms):
        return json.loads(record.read_text()), None
    model, before = warm_policy(cfg, seed, out)
    return before, nnx.state(model, nnx.Param)


def accuracies(model, task, cfg: StudyConfig, seed: int) -> dict[str, float]:
    prompt_len, new = cfg.lengths()
    rng = jax.random.PRNGKey(seed + 7)
    args = (model, task, common.EVAL_START, cfg.eval_prompts, prompt_len)
    return {
        "accuracy_greedy": evaluation.accuracy(*args, rollout.sampling_config(task, new, 0.0), rng),
        "accuracy_sampled": evaluation.accuracy(
            *args, rollout.sampling_config(task, new, 1.0), rng
        ),
    }


# ----------------------------------------------------------------------------- RL arms


def arm_configs(cfg: StudyConfig, seed: int, arm: str):
    """(StepConfig, LoopConfig) of one arm's RL run."""
    task, (prompt_len, new) = task_of(cfg, seed), cfg.lengths()
    step_cfg = train.StepConfig(
        group_size=cfg.group_size,
        loss=rl.LossConfig(clip_high=0.28),
        credit=credit.CreditConfig(name=arm, gamma=cfg.gamma),
        optim=train.OptimConfig(lr=cfg.lr, eps=cfg.adam_eps),
    )
    loop_cfg = loop.LoopConfig(
        steps=cfg.rl_steps,
        prompts_per_step=cfg.prompts_per_step,
        prompt_len=prompt_len,
        sampling=rollout.sampling_config(task, new, cfg.temperature),
        checkpoint_every=max(cfg.rl_steps // 2, 1),
        keep_checkpoints=1,
        seed=seed,  # the same prompts and sampling keys for every arm of this seed
        progress=cfg.progress,
    )
    return step_cfg, loop_cfg


def run_arm(cfg: StudyConfig, seed: int, arm: str, warm_params, out: pathlib.Path) -> dict:
    path = out / f"{arm}.json"
    if path.exists():
        return json.loads(path.read_text())
    task, (prompt_len, new) = task_of(cfg, seed), cfg.lengths()
    step_cfg, loop_cfg = arm_configs(cfg, seed, arm)
    started = time.perf_counter()
    model, history = common.rl_run(
        warm_params, cfg.policy, task, step_cfg, loop_cfg, out / f"rl_{arm}"
    )
    rewards = [history[s]["reward_mean"] for s in sorted(history)]
    if len(rewards) != cfg.rl_steps:
        raise RuntimeError(f"{out / f'rl_{arm}'} logged {len(rewards)} of {cfg.rl_steps} steps")
    result = {
        "reward_mean": float(np.mean(rewards)),  # the primary endpoint's per-run number
        **accuracies(model, task, cfg, seed),
        "step_seconds": common.median_step_seconds(history),
        "wall_seconds": time.perf_counter() - started,
    }
    # Precision of the arm's own credit on the trained policy; evaluation does not fill labels,
    # and a credit made of the labels is precise by construction: skipped for such arms.
    if not labelled(arm):
        result["precision"] = common.credit_precision(
            model, task, [arm], cfg.precision_responses, prompt_len, new,
            jax.random.PRNGKey(seed + 7), cfg.fraction,
        )[arm]  # fmt: skip
    path.write_text(json.dumps(result) + "\n")
    return result


def paired(results: dict, arm: str, key: str, seeds: range) -> list[float]:
    return [results[(s, arm)][key] - results[(s, "uniform")][key] for s in seeds]


def verdict(diffs: list[float]) -> str:
    mean, se, n = mean_se(diffs)
    if n < 2:
        return "n/a (1 seed)"
    return f"{'yes' if abs(mean) > 2 * se else 'no'} ({mean / se:+.1f} SE)" if se > 0 else "n/a"


def labelled(arm: str) -> bool:
    """Whether the arm's credit is made of the task's labels (its precision is 1 by design)."""
    return "labels_BxT" in credit.get(arm).needs


def arms_table(cfg: StudyConfig, arms, results: dict, before: dict) -> str:
    seeds = range(cfg.seed_from, cfg.seeds)
    lines = [
        f"RL on branches: {len(seeds)} seeds, {cfg.rl_steps} steps of {cfg.prompts_per_step} "
        f"prompts x {cfg.group_size}; mean ± SE over seeds; diff = arm - uniform, paired by seed",
        "| arm | mean rollout reward (all steps) | diff (PRIMARY) | diff > 2 SE | greedy acc "
        "after | diff | sampled acc after | diff | precision@40 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        runs = [results[(s, arm)] for s in seeds]
        diff = show if arm != "uniform" else (lambda _: "-")  # noqa: E731
        reward_diffs = paired(results, arm, "reward_mean", seeds)
        lines.append(
            f"| {arm} | {show(r['reward_mean'] for r in runs)} | {diff(reward_diffs)} | "
            f"{verdict(reward_diffs) if arm != 'uniform' else '-'} | "
            f"{show(r['accuracy_greedy'] for r in runs)} | "
            f"{diff(paired(results, arm, 'accuracy_greedy', seeds))} | "
            f"{show(r['accuracy_sampled'] for r in runs)} | "
            f"{diff(paired(results, arm, 'accuracy_sampled', seeds))} | "
            f"{'by construction' if labelled(arm) else show(r.get('precision') for r in runs)} |"
        )
    lines.append(
        f"\nwarm-up (before RL): greedy {show(b['accuracy_greedy'] for b in before.values())}, "
        f"sampled {show(b['accuracy_sampled'] for b in before.values())}"
    )
    return "\n".join(lines)


def warmup_table(cfg: StudyConfig, rows: dict) -> str:
    runs = list(rows.values())
    lines = [
        f"warm-up policies ({len(runs)} seeds, mean ± SE): held-out accuracy on "
        f"{cfg.eval_prompts} prompts (chance {1 / cfg.task.modulus:.3f}), and teacher-forced "
        "argmax accuracy per kind of token on as many held-out solver traces",
        "| measure | value |",
        "|---|---|",
        f"| greedy accuracy | {show(r['accuracy_greedy'] for r in runs)} |",
        f"| sampled accuracy | {show(r['accuracy_sampled'] for r in runs)} |",
    ]
    for kind in branches_skill.KINDS:
        values = (r["teacher_forced"][kind] for r in runs)
        lines.append(f"| teacher-forced: {kind} | {show(values)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- stages


def check_identity(cfg: StudyConfig, out: pathlib.Path) -> None:
    """Refuse, before any work, an --out whose saved runs were made under other settings."""
    path, current = out / "study.json", identity(cfg)
    if cfg.warmups_from is not None:
        source = pathlib.Path(cfg.warmups_from) / "study.json"
        if not source.exists():
            raise ValueError(f"--warmups_from {cfg.warmups_from}: no study.json there")
        theirs = json.loads(source.read_text())
        changed = [k for k in WARMUP_KEYS if theirs.get(k) != current.get(k)]
        if changed:
            raise ValueError(
                f"--warmups_from {cfg.warmups_from} made its warm-ups under other settings "
                f"({', '.join(changed)}); they cannot start this study"
            )
    if path.exists():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if changed:
            raise ValueError(
                f"{out} holds runs made with other settings ({', '.join(changed)}: "
                f"{[saved.get(k) for k in changed]} there, {[current.get(k) for k in changed]} "
                "now); use another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=2) + "\n")


def main(argv: list[str]) -> dict:
    cfg = common.parse(StudyConfig(), argv)
    out = pathlib.Path(cfg.out)
    check_identity(cfg, out)
    started = time.perf_counter()
    seeds = range(cfg.seed_from, cfg.seeds)
    result: dict = {"config": dataclasses.asdict(cfg)}
    if cfg.stage == "warmup":
        rows = {}
        for s in seeds:
            model, record = warm_policy(cfg, s, out / f"seed{s}")
            skill = branches_skill.teacher_forced_skill(
                model, task_of(cfg, s), cfg.eval_prompts, cfg.lengths()[0]
            )
            rows[s] = {**record, "teacher_forced": skill}
            print(f"seed {s} warm-up: greedy {record['accuracy_greedy']:.3f}, teacher-forced "
                  + ", ".join(f"{k} {v:.2f}" for k, v in skill.items() if v is not None),
                  flush=True)  # fmt: skip
        result["per_seed"] = rows
        text = warmup_table(cfg, rows)
    elif cfg.stage == "analysis":
        per_seed = {}
        for s in seeds:
            t = time.perf_counter()
            per_seed[s] = branches_analysis.saved(cfg, out / f"seed{s}")
            if per_seed[s] is None:  # no warm-up is trained or restored for a saved analysis
                model, _ = warm_policy(cfg, s, out / f"seed{s}")
                per_seed[s] = branches_analysis.analyse(
                    cfg, task_of(cfg, s), s, model, out / f"seed{s}"
                )
            print(f"seed {s} analysis: {per_seed[s]['responses_with_answer']} responses with an "
                  f"answer, {time.perf_counter() - t:.0f} s", flush=True)  # fmt: skip
        result["per_seed"] = per_seed
        text = branches_analysis.analysis_table(per_seed)
    elif cfg.stage == "control":
        rows = {}
        for s in seeds:
            _, worksheet = warm_policy(cfg, s, out / f"seed{s}")
            _, answer_only = warm_policy(cfg, s, out / f"seed{s}", answer_only=True)
            rows[s] = {"worksheet": worksheet, "answer_only": answer_only}
            print(f"seed {s} control: answer-only greedy {answer_only['accuracy_greedy']:.3f}, "
                  f"worksheet greedy {worksheet['accuracy_greedy']:.3f}", flush=True)  # fmt: skip
        result["per_seed"] = rows
        lines = [
            f"held-out accuracy after {cfg.warmup.steps} warm-up steps ({len(seeds)} seeds, mean ± "
            f"SE); chance = 1/modulus = {1 / cfg.task.modulus:.3f}",
            "| demonstrations | greedy | sampled |",
            "|---|---|---|",
        ]
        for kind in ("answer_only", "worksheet"):
            lines.append(f"| {kind} | {show(rows[s][kind]['accuracy_greedy'] for s in seeds)} | "
                         f"{show(rows[s][kind]['accuracy_sampled'] for s in seeds)} |")  # fmt: skip
        text = "\n".join(lines)
    else:
        arms = GATE_ARMS if cfg.stage == "gate" else cfg.arms
        results, before = {}, {}
        for s in seeds:
            before[s], warm_params = warm_start(cfg, s, out / f"seed{s}", arms)
            for arm in arms:
                results[(s, arm)] = r = run_arm(cfg, s, arm, warm_params, out / f"seed{s}")
                print(f"seed {s} {arm:>24}: reward {r['reward_mean']:.3f}, greedy acc "
                      f"{before[s]['accuracy_greedy']:.3f} -> {r['accuracy_greedy']:.3f}, "
                      f"{r['wall_seconds']:.0f} s", flush=True)  # fmt: skip
        result["runs"] = {f"seed{s}/{arm}": r for (s, arm), r in results.items()}
        result["before"] = before
        result["primary"] = {
            arm: dict(
                zip(
                    ("mean", "se", "seeds"),
                    mean_se(paired(results, arm, "reward_mean", seeds)),
                    strict=True,
                )
            )
            for arm in arms
            if arm != "uniform"
        }
        text = arms_table(cfg, arms, results, before)
    result["wall_seconds"] = time.perf_counter() - started
    command = shlex.join(["python", "-m", "experiments.branches_study", *argv])
    text += (
        f"\n\nseeds {len(seeds)}; wall time {result['wall_seconds']:.0f} s\ncommand: `{command}`"
    )
    result["command"] = command
    common.write_result(out, cfg.stage, result, text)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
