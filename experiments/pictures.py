"""The quickstart's pictures: learning curves, sample responses coloured by flow throughput, and
one response's flow backbone. Everything drawn is computed here from the trained policy.

Dims: B responses, T tokens (prompt slots + response slots), K backbone edges.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np

from experiments import common
from ftjax import credit, evaluation, flow, train, viz
from ftjax.tasks.vocab import VOCAB

CURVE_KEYS = [
    "reward_mean",
    "loss",
    "entropy",
    "credit/selected_fraction",
    "grad_norm",
    "response_length",
]


def _samples(model, task, prompt_len, max_new_tokens, rng, count):
    got = evaluation.sample(
        model,
        task,
        common.EVAL_START,
        count,
        prompt_len,
        common.sampling_config(max_new_tokens, 1.0),
        rng,
    )
    spec = train.StepConfig().capture
    tau_BxT, attn_BxTxT = evaluation.throughput(model, got.batch, spec)
    gamma_BxT = evaluation.credit_gammas(
        model, got.batch, ["flowtracer"], credit.CreditConfig(), spec, rng
    )["flowtracer"]
    return got, np.asarray(tau_BxT), np.asarray(attn_BxTxT), gamma_BxT


def token_samples(task, got, tau_BxT, gamma_BxT, rows) -> list[viz.TokenSample]:
    batch, L = got.batch, got.prompt_slots
    out = []
    for b in rows:
        prompt, response = got.prompts[b], got.responses[b]
        n = len(response)
        labels = task.labels(prompt, response)
        reward = float(batch.rewards_B[b])
        out.append(
            viz.TokenSample(
                title=f"held-out prompt {b}",
                prompt_tokens=VOCAB.token_strings(prompt),
                response_tokens=VOCAB.token_strings(response),
                throughput=tau_BxT[b, L : L + n].tolist(),
                selected=(gamma_BxT[b, L : L + n] > 1.0).tolist(),
                answer=np.asarray(batch.answer_mask_BxT)[b, L : L + n].tolist(),
                essential=labels,
                reward=reward,
            )
        )
    return out


def backbone_png(path, got, attn_BxTxT, b: int, k: int = 12) -> pathlib.Path:
    """Flow backbone of response b, traced on its real tokens only (padding dropped)."""
    batch = got.batch
    valid_T = np.asarray(batch.prompt_mask_BxT[b] | batch.response_mask_BxT[b])
    keep = np.flatnonzero(valid_T)
    attn_1xTxT = attn_BxTxT[b][np.ix_(keep, keep)][None]
    source_1xT = np.asarray(batch.prompt_mask_BxT)[b, keep][None]
    sink_1xT = np.asarray(batch.answer_mask_BxT)[b, keep][None]
    tr = flow.trace(attn_1xTxT, source_1xT, sink_1xT)
    bb = jax.device_get(flow.backbone(attn_1xTxT, tr, k=min(k, len(keep))))
    edges = [
        (int(s), int(d), float(f))
        for s, d, f in zip(bb.edge_src_BxK[0], bb.edge_dst_BxK[0], bb.edge_flow_BxK[0], strict=True)
        if f > 0
    ]
    tokens = VOCAB.token_strings(np.asarray(batch.tokens_BxT)[b, keep])
    return viz.plot_backbone_png(
        path,
        tokens,
        np.asarray(tr.throughput_BxT)[0].tolist(),
        edges,
        source_1xT[0].tolist(),
        sink_1xT[0].tolist(),
        title=f"flow backbone of one correct response (top {len(edges)} edges by flow)",
    )


def write_all(
    out: pathlib.Path, model, task, histories, prompt_len, max_new_tokens, rng, count: int = 8
):
    """curves.png, credit.html, credit.png and backbone.png under `out`."""
    keys = [k for k in CURVE_KEYS if any(k in m for h in histories.values() for m in h.values())]
    viz.plot_curves_png(out / "curves.png", histories, keys, "RL from the same warm-up")
    got, tau_BxT, attn_BxTxT, gamma_BxT = _samples(
        model, task, prompt_len, max_new_tokens, rng, count
    )
    samples = token_samples(task, got, tau_BxT, gamma_BxT, range(count))
    title = "FlowTracer throughput on sampled responses of the RL-trained policy"
    viz.write_credit_html(out / "credit.html", samples, title)
    viz.plot_credit_png(out / "credit.png", samples, title)
    rewards = np.asarray(got.batch.rewards_B)
    answered = np.asarray(got.batch.answer_mask_BxT).any(-1)
    pick = int(np.argmax(rewards + answered))  # a correct response if there is one
    backbone_png(out / "backbone.png", got, attn_BxTxT, pick)
