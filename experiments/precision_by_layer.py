"""Which attention layers locate the essential tokens? Credit precision@40% of FlowTracer's
ranking when it reads each layer of the quickstart's policy alone, the default middle third, and
all layers, against the chain task's ground truth (and the point-wise `attention_received`
ranking on the same maps, and the base rate, for scale), and the share of the unit of flow that
goes from a question token straight into the answer, bypassing the response.

    python -m experiments.precision_by_layer [--run runs/quickstart] [--policy rl_flowtracer]

Forward passes only: well under a minute on 2 CPU cores after the quickstart.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import jax
import numpy as np

from experiments import common
from ftjax import capture, credit, evaluation, flow, overrides, train


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    run: str = "runs/quickstart"
    policy: str = "rl_flowtracer"
    responses: int = 256
    seed: int = 0


def main(argv: list[str]) -> dict:
    cfg = overrides.apply(LayerConfig(), argv)
    run = pathlib.Path(cfg.run)
    qs, task, model, got = common.trained_samples(run, cfg.policy, cfg.responses, 1.0, cfg.seed)
    rng = jax.random.PRNGKey(cfg.seed)
    labels_BxT = evaluation.task_labels(task, got)
    answer_BxT = np.asarray(got.batch.answer_mask_BxT)
    keep_B = answer_BxT.any(-1)
    response_BxT = np.asarray(got.batch.response_mask_BxT)
    L = qs.policy.layers
    specs = {f"layer {i}": capture.CaptureSpec(mode="layers", layers=(i,)) for i in range(L)}
    specs["middle third (default)"] = capture.CaptureSpec()
    specs["all layers"] = capture.CaptureSpec(mode="layers", layers=tuple(range(L)))
    result = {}
    batch = got.batch
    prompt_BxT = np.asarray(batch.prompt_mask_BxT)[keep_B]
    for label, spec in specs.items():
        _, _, attn_BxTxT = train.sequence_log_probs(model, batch, spec)
        attn_BxTxT = attn_BxTxT[keep_B]
        tr = flow.trace(
            attn_BxTxT, prompt_BxT, answer_BxT[keep_B], prompt_BxT | response_BxT[keep_B]
        )
        phi_BxTxT = np.asarray(flow.edge_flow(attn_BxTxT, tr))
        into_answer_BxT = np.einsum("bki,bk->bi", phi_BxTxT, answer_BxT[keep_B])
        direct = float(np.sum(into_answer_BxT * prompt_BxT) / np.sum(into_answer_BxT))
        gammas = evaluation.credit_gammas(
            model,
            got.batch,
            ["flowtracer", "attention_received", "uniform"],
            credit.CreditConfig(),
            spec,
            rng,
        )
        result[label] = {
            name: evaluation.precision(
                g[keep_B], labels_BxT[keep_B], answer_BxT[keep_B], response_BxT[keep_B], 0.4
            )
            for name, g in gammas.items()
        }
        result[label]["direct_flow_share"] = direct
    lines = [
        f"credit precision@40% by captured layers ({int(keep_B.sum())} responses with an answer; "
        f"policy {run / cfg.policy})",
        "| captured layers | flowtracer | attention_received | base rate | flow prompt -> answer "
        "directly |",
        "|---|---|---|---|---|",
    ]
    for label, r in result.items():
        lines.append(
            f"| {label} | {r['flowtracer']:.3f} | {r['attention_received']:.3f} | "
            f"{r['uniform']:.3f} | {r['direct_flow_share']:.3f} |"
        )
    text = "\n".join(lines)
    common.write_result(run, f"precision_by_layer_{cfg.policy}", result, text)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
