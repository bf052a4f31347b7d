"""What a branches policy can do, token by token: teacher-forced accuracy per kind of token.

On held-out solver traces (prompts from `common.EVAL_START`), the policy predicts each response
token from the prompt and the correct trace before it; a token counts as right when it is the
argmax. Accuracy is averaged per kind of token, read from the trace's text:

    a=4=4;           root: both digits `copy` (the prompt says `a=4=?`)
    c=a+3=4+3=2;     link: `+` `operator` (copied from the prompt), `3` `copy`, `4`
                     `substituted` (the parent's value, looked up in the response), the second
                     `+` `operator`, the second `3` `copy`, `2` `link value` (the arithmetic)
    >2               the `answer` digits; names, `=`, `;`, `>` are `layout`; <eos> `eos`

(A link that does not substitute, `c=a+3=2;`, has no `substituted` token.) A warm-up that copies
but does no arithmetic scores near 1 on `copy` and near 1/modulus on `link value`: RL then has
to teach the arithmetic from the reward alone. Dims: B traces, T tokens.

As a command it draws a warm-up's learning curve per kind of token (the calibration tool: how
many steps, how wide a policy before the warm-up does the arithmetic), under the study's task,
policy and warm-up settings and their flags:

    python -m experiments.branches_skill --seed 0 --every 200 --warmup.steps 2400 \
        [--policy.hidden 128] [--task.modulus 5] [--out runs/branches_skill/curve.json]
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shlex
import sys
import time

import numpy as np

from experiments import common
from ftjax import rollout, sft
from ftjax.tasks.branches import BranchesConfig, BranchesTask
from ftjax.tasks.vocab import EOS, PAD

KINDS = ("copy", "operator", "substituted", "link value", "answer", "layout", "eos")
_ROOT = re.compile(r"[a-z]=(\d+)=(\d+);")
_LINK = re.compile(r"[a-z]=[a-z]([+\-*])(\d+)=(?:(\d+)([+\-*])(\d+)=)?(\d+);")
_ANSWER = re.compile(r">(\d+)$")


def token_kinds(text: str) -> list[str]:
    """The kind of each character of a solver trace's text (one character per token, without
    <eos>); characters outside statements and the answer are `layout`."""
    kinds = ["layout"] * len(text)

    def mark(match, groups_kinds):
        for group, kind in groups_kinds:
            if match.start(group) >= 0:
                for i in range(*match.span(group)):
                    kinds[i] = kind

    for match in _ROOT.finditer(text):
        mark(match, ((1, "copy"), (2, "copy")))
    for match in _LINK.finditer(text):
        mark(match, ((1, "operator"), (2, "copy"), (3, "substituted"), (4, "operator"),
                     (5, "copy"), (6, "link value")))  # fmt: skip
    for match in _ANSWER.finditer(text):
        mark(match, ((1, "answer"),))
    return kinds


def kind_accuracy(right_BxT, kinds_BxT) -> dict[str, float | None]:
    """Mean of right_BxT over the tokens of each kind (None for a kind with no token)."""
    right_BxT, kinds_BxT = np.asarray(right_BxT, bool), np.asarray(kinds_BxT)
    out = {}
    for kind in KINDS:
        where = kinds_BxT == kind
        out[kind] = float(right_BxT[where].mean()) if where.any() else None
    return out


def teacher_forced_skill(model, task, count: int, prompt_len: int) -> dict[str, float | None]:
    """`kind_accuracy` of the policy's argmax on `count` held-out solver traces (the right
    ones, also when the warm-up imitated a flawed teacher)."""
    pairs = task.demonstrations(common.EVAL_START, count, flawed=False)
    prompt_BxP, valid_BxP = rollout.left_pad([p for p, _ in pairs], prompt_len, task.pad_id)
    R = max(len(r) for _, r in pairs)
    response_BxR = np.full((len(pairs), R), task.pad_id, np.int32)
    kinds_BxR = np.full((len(pairs), R), "", object)
    for b, (_, response) in enumerate(pairs):
        response_BxR[b, : len(response)] = response
        text = task.vocab.decode([t for t in response if t != EOS])
        kinds_BxR[b, : len(text)] = token_kinds(text)
        kinds_BxR[b, len(text) : len(response)] = "eos"
    tokens_BxT = np.concatenate([prompt_BxP, response_BxR], axis=1)
    valid_BxT = np.concatenate([valid_BxP, kinds_BxR != ""], axis=1)
    logits_BxTxV = model(tokens_BxT, valid_BxT=valid_BxT).logits_BxTxV
    # Column P - 1 + j predicts response token j.
    predicted_BxR = np.asarray(logits_BxTxV.argmax(-1))[:, prompt_len - 1 : -1]
    return kind_accuracy(predicted_BxR == response_BxR, kinds_BxR)


# The dead-end branches study's task, policy and warm-up (experiments/branches_study.py uses
# these as its defaults; a curve drawn at them calibrates the study's warm-up). How they were
# chosen, from warm-up read-outs alone: experiments/RESULTS.md, "calibrating the warm-up".
STUDY_TASK = BranchesConfig(chain_length=2, modulus=5, substitute=True)
STUDY_POLICY = common.PolicyConfig(layers=4, hidden=128, heads=4)
STUDY_WARMUP = sft.SFTConfig(steps=800, batch_size=32, lr=1e-3, warmup_steps=80)


@dataclasses.dataclass(frozen=True)
class CurveConfig:
    """One warm-up from scratch, read every `every` steps; defaults are the study's."""

    task: BranchesConfig = STUDY_TASK
    policy: common.PolicyConfig = STUDY_POLICY
    warmup: sft.SFTConfig = STUDY_WARMUP
    seed: int = 0  # task seed and policy init seed, as the study's seed s
    every: int = 100  # read the policy after every this many steps
    count: int = 128  # held-out traces per read-out
    out: str = "runs/branches_skill/curve.json"

    def __post_init__(self):
        if not 1 <= self.every <= self.warmup.steps or self.count < 1:
            raise ValueError(
                f"CurveConfig needs 1 <= every <= warmup.steps and count >= 1, got every "
                f"{self.every}, steps {self.warmup.steps}, count {self.count}"
            )


def learning_curve(cfg: CurveConfig, on_read=None) -> list[dict]:
    """[{"step", "seconds", "loss", **kind accuracies}] every cfg.every steps of one warm-up;
    on_read(rows so far) after each read-out (to save a curve a stopped run has drawn)."""
    from experiments.branches_study import StudyConfig  # its lengths() rule, one place

    study = StudyConfig(task=cfg.task, policy=cfg.policy, warmup=cfg.warmup)
    prompt_len, response_len = study.lengths()
    task = BranchesTask(dataclasses.replace(cfg.task, seed=cfg.seed))
    model = common.build_policy(cfg.policy, cfg.seed)
    losses, rows, started = [], [], time.perf_counter()

    def read(done, trained):
        skill = teacher_forced_skill(trained, task, cfg.count, prompt_len)
        rows.append({"step": done, "seconds": time.perf_counter() - started,
                     "loss": float(np.mean(losses[-cfg.every :])), **skill})  # fmt: skip
        print(f"step {done:>5} ({rows[-1]['seconds']:.0f} s) loss {rows[-1]['loss']:.3f}: "
              + ", ".join(f"{k} {v:.2f}" for k, v in skill.items() if v is not None),
              flush=True)  # fmt: skip
        if on_read is not None:
            on_read(rows)

    sft.warm_up(
        model,
        lambda start, count: task.demonstrations(common.WARMUP_START + start, count),
        cfg.warmup,
        prompt_len,
        response_len,
        PAD,
        on_step=lambda step, loss: losses.append(float(loss)),
        probe=(cfg.every, read),
    )
    return rows


def main(argv: list[str]) -> list[dict]:
    cfg = common.parse(CurveConfig(), argv)
    out = pathlib.Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "experiments.branches_skill", *argv])

    def save(rows):  # after every read-out: a stopped run keeps what it has drawn
        record = {"config": dataclasses.asdict(cfg), "command": command, "curve": rows}
        out.write_text(json.dumps(record, indent=1) + "\n")

    return learning_curve(cfg, on_read=save)


if __name__ == "__main__":
    main(sys.argv[1:])
