"""Compare finished RL runs that differ only in credit and seed: held-out evaluation before and
after, mean rollout reward, and each credit's paired difference to a baseline at the same seed.

    python -m experiments.compare_runs runs/gemma_rl/*_seed* [--baseline uniform]
        [--plot runs/gemma_rl/rewards.png] [--json runs/gemma_rl/compare.json]

A run directory is what `experiments.math_rl` writes: config.json, metrics.jsonl (per step) and
eval.jsonl (held-out metrics at step 0 and later). Runs whose configs differ in anything but the
credit name, the loop's seed and the run directory are refused (they would not be paired arms).
With --plot, the rollout reward per step of every run (colour: credit, line style: seed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

from experiments.common import mean_se
from ftjax import rundir
from ftjax.logging import read_jsonl

ARM_KEYS = ("step.credit.name", "loop.seed", "run_dir")  # what may differ between paired runs


@dataclasses.dataclass(frozen=True)
class Run:
    path: str
    credit: str
    seed: int
    config: dict[str, str]  # rundir.flatten of config.json
    rewards: list[float]  # reward_mean per step, in step order
    before: dict[str, float]  # the held-out evaluation at step 0
    after: dict[str, float]  # the last held-out evaluation

    @property
    def mean_reward(self) -> float:
        return sum(self.rewards) / len(self.rewards)


def load_run(path: str | pathlib.Path) -> Run:
    """One finished run directory; a ValueError names what is missing."""
    root = pathlib.Path(path)
    for name in ("config.json", "metrics.jsonl", "eval.jsonl"):
        if not (root / name).is_file():
            raise ValueError(f"{root} has no {name}: not a finished math_rl run directory")
    flat = rundir.flatten(json.loads((root / "config.json").read_text()))
    metrics = read_jsonl(root / "metrics.jsonl")
    evals = read_jsonl(root / "eval.jsonl")
    if not metrics or not all("reward_mean" in m for m in metrics.values()):
        raise ValueError(f"{root}/metrics.jsonl has steps without reward_mean")
    if 0 not in evals or len(evals) < 2:
        raise ValueError(f"{root}/eval.jsonl needs the evaluation at step 0 and one after it")
    return Run(
        path=str(root),
        credit=json.loads(flat["step.credit.name"]),
        seed=json.loads(flat["loop.seed"]),
        config=flat,
        rewards=[metrics[s]["reward_mean"] for s in sorted(metrics)],
        before=evals[0],
        after=evals[max(evals)],
    )


def check_paired(runs: list[Run]) -> None:
    """Every run has the same config but for ARM_KEYS, and no (credit, seed) twice."""
    first = runs[0]
    for run in runs[1:]:
        keys = set(first.config) | set(run.config)
        differ = sorted(k for k in keys - set(ARM_KEYS) if first.config.get(k) != run.config.get(k))
        if differ:
            raise ValueError(
                f"{run.path} and {first.path} differ in {', '.join(differ[:5])}: not paired arms"
            )
    arms = [(r.credit, r.seed) for r in runs]
    if len(set(arms)) != len(arms):
        raise ValueError(f"a (credit, seed) pair appears twice among the runs: {sorted(arms)}")
    lengths = {len(r.rewards) for r in runs}
    if len(lengths) > 1:
        raise ValueError(f"the runs have different numbers of steps: {sorted(lengths)}")


def eval_keys(runs: list[Run]) -> list[str]:
    """Held-out metrics every run reports (pass@1, avg@k, pass@k), in the first run's order."""
    keys = [k for k in runs[0].before if k != "problems"]
    return [k for k in keys if all(k in r.before and k in r.after for r in runs)]


def paired(runs: list[Run], baseline: str) -> dict[str, dict[str, list[float]]]:
    """credit -> metric -> per-seed differences credit - baseline (seeds both have)."""
    by_arm = {(r.credit, r.seed): r for r in runs}
    out = {}
    for credit in sorted({r.credit for r in runs} - {baseline}):
        seeds = sorted(s for c, s in by_arm if c == credit and (baseline, s) in by_arm)
        diffs = {"mean reward": [], **{f"{k} after": [] for k in eval_keys(runs)}}
        for s in seeds:
            arm, base = by_arm[(credit, s)], by_arm[(baseline, s)]
            diffs["mean reward"].append(arm.mean_reward - base.mean_reward)
            for k in eval_keys(runs):
                diffs[f"{k} after"].append(arm.after[k] - base.after[k])
        out[credit] = diffs
    return out


def table(runs: list[Run], baseline: str) -> str:
    keys = eval_keys(runs)
    head = ["credit", "seed", "steps", "mean rollout reward"]
    head += [f"{k} {when}" for k in keys for when in ("before", "after")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(runs, key=lambda r: (r.credit != baseline, r.credit, r.seed)):
        cells = [r.credit, str(r.seed), str(len(r.rewards)), f"{r.mean_reward:.3f}"]
        cells += [f"{r.before[k]:.3f} | {r.after[k]:.3f}" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    for credit, diffs in paired(runs, baseline).items():
        lines.append("")
        lines.append(f"{credit} - {baseline}, paired by seed (mean ± SE over seeds; per seed):")
        for metric, values in diffs.items():
            mean, se, n = mean_se(values)
            each = ", ".join(f"{v:+.3f}" for v in values)
            lines.append(f"- {metric}: {mean:+.3f} ± {se:.3f} (n = {n}; {each})")
    return "\n".join(lines)


def plot(runs: list[Run], path: pathlib.Path) -> pathlib.Path:
    from matplotlib.figure import Figure

    credits = sorted({r.credit for r in runs})
    seeds = sorted({r.seed for r in runs})
    styles = ("-", "--", ":", "-.")
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for r in sorted(runs, key=lambda r: (r.credit, r.seed)):
        ax.plot(
            range(len(r.rewards)),
            r.rewards,
            color=f"C{credits.index(r.credit)}",
            linestyle=styles[seeds.index(r.seed) % len(styles)],
            marker="o",
            markersize=3,
            label=f"{r.credit}, seed {r.seed}",
        )
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean rollout reward")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--baseline", default="uniform", help="the credit others are paired with")
    parser.add_argument("--plot", default=None, help="write the reward curves to this PNG")
    parser.add_argument("--json", default=None, help="write the numbers to this JSON file")
    args = parser.parse_args(argv)
    runs = [load_run(p) for p in args.runs]
    check_paired(runs)
    if args.baseline not in {r.credit for r in runs}:
        raise ValueError(f"no run has the baseline credit {args.baseline!r}")
    text = table(runs, args.baseline)
    print(text)
    if args.plot:
        print(f"wrote {plot(runs, pathlib.Path(args.plot))}")
    if args.json:
        record = {
            "runs": [
                {k: v for k, v in dataclasses.asdict(r).items() if k != "config"} for r in runs
            ],
            "paired": paired(runs, args.baseline),
        }
        pathlib.Path(args.json).write_text(json.dumps(record, indent=1))
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
