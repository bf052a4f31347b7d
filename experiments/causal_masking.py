"""The paper's causal check: do high-flow tokens carry the answer?

    python -m experiments.causal_masking [--run runs/quickstart] [--policy rl_flowtracer]

For responses of a trained policy (the quickstart's, by default) to held-out prompts, mask 20% of
the reasoning tokens as attention keys (no later token may read them; positions unchanged) and
re-decode the answer greedily. Three choices of the masked 20%: the highest FlowTracer throughput,
a random 20%, the lowest throughput. Reported, against the same greedy re-decoding without a mask:
the answer-change rate over all responses that have an answer, and the correctness-flip rate
(right -> wrong, by the task's verifier) over those whose unmasked re-decoded answer is right.
(Paper, GSM8K: 45.9% / 29.5% / 14.9% answer change for top / random / bottom.)

Reasoning tokens: the response tokens before the answer span, less the marker right before it.
Takes well under a minute on 2 CPU cores after the quickstart.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.quickstart import QuickstartConfig
from ftjax import credit, evaluation, overrides, train
from ftjax.tasks.chain import ChainTask

MODES = ("top", "random", "bottom")


@dataclasses.dataclass(frozen=True)
class CausalConfig:
    run: str = "runs/quickstart"
    policy: str = "rl_flowtracer"  # or rl_uniform, warmup
    responses: int = 512
    fraction: float = 0.2
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"CausalConfig.fraction must be in (0, 1), got {self.fraction}")


def masked_sets(tau_T, eligible_T, fraction: float, rng) -> dict[str, np.ndarray]:
    """Boolean masks (T,) of the top / random / bottom `fraction` of the eligible tokens."""
    idx = np.flatnonzero(eligible_T)
    k = credit.selection_count(len(idx), fraction) if len(idx) else 0
    order = idx[np.argsort(-tau_T[idx], kind="stable")]  # ties: earlier first
    picks = {
        "top": order[:k],
        "bottom": order[len(order) - k :],
        "random": rng.permutation(idx)[:k],
    }
    out = {}
    for mode, chosen in picks.items():
        mask_T = np.zeros(len(tau_T), bool)
        mask_T[chosen] = True
        out[mode] = mask_T
    return out


def redecode(model, tokens_BxT, valid_BxT, positions_BxT, start_B, steps: int) -> np.ndarray:
    """Greedy re-decoding of `steps` tokens from column start_B[b] of each row, by full forward
    passes (keys that are not valid are never attended; positions are given, so masking shifts
    nothing). Column start_B[b] + j is overwritten by the j-th decoded token before step j + 1."""
    tokens_BxT = np.array(tokens_BxT)
    rows = np.arange(len(start_B))
    decoded_BxW = np.zeros((len(start_B), steps), np.int32)
    for j in range(steps):
        logits_BxTxV = model(
            tokens_BxT, valid_BxT=valid_BxT, positions_BxT=positions_BxT
        ).logits_BxTxV
        decoded_BxW[:, j] = np.asarray(jnp.argmax(logits_BxTxV[rows, start_B + j - 1], -1))
        if j + 1 < steps:
            tokens_BxT[rows, start_B + j] = decoded_BxW[:, j]
    return decoded_BxW


def run_config(run: pathlib.Path) -> QuickstartConfig:
    """The settings a quickstart run was made with (its summary.json), not today's defaults."""
    qs = QuickstartConfig()
    if not (run / "summary.json").exists():
        raise ValueError(f"{run} has no summary.json; run `python -m experiments.quickstart` first")
    saved = json.loads((run / "summary.json").read_text())["config"]
    task = {**saved["task"], "ops": tuple(saved["task"]["ops"])}
    return dataclasses.replace(
        qs,
        policy=common.PolicyConfig(**saved["policy"]),
        task=dataclasses.replace(qs.task, **task),
        prompt_len=saved["prompt_len"],
        max_new_tokens=saved["max_new_tokens"],
    )


def trained_samples(run: pathlib.Path, policy: str, responses: int, temperature: float, seed: int):
    """(settings, task, policy, sampled responses to held-out prompts) of a quickstart run."""
    qs = run_config(run)
    task = ChainTask(qs.task)
    model = common.load_policy(run / policy / "checkpoints", qs.policy)
    got = evaluation.sample(
        model,
        task,
        common.EVAL_START,
        responses,
        qs.prompt_len,
        common.sampling_config(qs.max_new_tokens, temperature),
        jax.random.PRNGKey(seed),
    )
    return qs, task, model, got


def masking_table(title: str, result: dict) -> str:
    lines = [title, "| masked | answer change | correctness flip |", "|---|---|---|"]
    for mode in MODES:
        r = result[mode]
        lines.append(
            f"| {mode} flow | {r['answer_change_rate']:.3f} | {r['correctness_flip_rate']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> dict:
    cfg = overrides.apply(CausalConfig(), argv)
    run = pathlib.Path(cfg.run)
    qs, task, model, got = trained_samples(
        run, cfg.policy, cfg.responses, cfg.temperature, cfg.seed
    )
    tau_BxT, _ = evaluation.throughput(model, got.batch, train.StepConfig().capture)
    tau_BxT = np.asarray(tau_BxT)
    batch = got.batch
    answer_BxT = np.asarray(batch.answer_mask_BxT)
    valid_BxT = np.asarray(batch.prompt_mask_BxT | batch.response_mask_BxT)
    positions_BxT = np.maximum(np.cumsum(valid_BxT, -1) - 1, 0)
    choose = np.random.default_rng(cfg.seed)
    rows, starts, widths, masks = [], [], [], {m: [] for m in MODES}
    for b in np.flatnonzero(answer_BxT.any(-1)):
        start = int(np.argmax(answer_BxT[b]))  # first answer token
        reasoning_T = np.asarray(batch.response_mask_BxT[b]).copy()
        reasoning_T[start - 1 :] = False  # the answer, the marker before it, and what follows
        if not reasoning_T.any():
            continue
        rows.append(b)
        starts.append(start)
        widths.append(int(answer_BxT[b].sum()))
        for mode, mask_T in masked_sets(tau_BxT[b], reasoning_T, cfg.fraction, choose).items():
            masks[mode].append(mask_T)
    if not rows:
        raise ValueError(
            f"none of the {cfg.responses} responses of {run / cfg.policy} has an answer span "
            "with reasoning before it: nothing to mask (is the policy trained?)"
        )
    rows, starts = np.asarray(rows, int), np.asarray(starts, int)
    width = max(widths, default=0)
    tokens_RxT = np.asarray(batch.tokens_BxT)[rows]
    answer_RxW = np.arange(width)[None, :] < np.asarray(widths)[:, None]
    args = (model, tokens_RxT)
    # The baseline is the same greedy re-decoding without a mask (the sampled answer may differ
    # from the greedy one even before any masking).
    base_RxW = redecode(*args, valid_BxT[rows], positions_BxT[rows], starts, width)

    def correct(decoded_RxW) -> np.ndarray:
        out = []
        for r, b in enumerate(rows):
            response = list(got.responses[b])
            offset = starts[r] - got.prompt_slots
            response[offset : offset + widths[r]] = decoded_RxW[r, : widths[r]].tolist()
            out.append(task.score(got.prompts[b], response)[0] == 1.0)
        return np.asarray(out, bool)

    correct_R = correct(base_RxW)
    answered, correct_count = len(rows), int(correct_R.sum())
    counts = {}
    for mode in MODES:
        decoded_RxW = redecode(
            *args, valid_BxT[rows] & ~np.stack(masks[mode]), positions_BxT[rows], starts, width
        )
        changed_R = np.any((decoded_RxW != base_RxW) & answer_RxW, -1)
        flipped_R = correct_R & ~correct(decoded_RxW)
        counts[mode] = {"changed": int(changed_R.sum()), "flipped": int(flipped_R.sum())}
    result = {
        "responses_with_answer": answered,
        "correct": correct_count,
        **{
            mode: {
                "answer_change_rate": c["changed"] / max(answered, 1),
                "correctness_flip_rate": c["flipped"] / max(correct_count, 1),
            }
            for mode, c in counts.items()
        },
    }
    text = masking_table(
        f"causal masking of {cfg.fraction:.0%} of the reasoning tokens ({answered} responses "
        f"with an answer, {correct_count} of them correct unmasked; policy {run / cfg.policy})",
        result,
    )
    common.write_result(run, f"causal_masking_{cfg.policy}", result, text)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
