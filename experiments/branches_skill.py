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
"""

from __future__ import annotations

import re

import numpy as np

from experiments import common
from ftjax import rollout
from ftjax.tasks.vocab import EOS

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
    """`kind_accuracy` of the policy's argmax on `count` held-out solver traces."""
    pairs = task.demonstrations(common.EVAL_START, count)
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
