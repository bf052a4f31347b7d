"""Stage `analysis` of the dead-end branches study (experiments/branches_study.py): on the
warm-up policy's sampled responses, how precisely each score finds the queried chain, how much
of it leaks into distractor chains, and which statements the answer causally depends on.

Scores: FlowTracer's throughput tau and the point-wise attention scores (read from each single
layer, the default middle third and all layers; tau also for each sink/source choice), next-token
entropy, a position-only score, random and a constant. Per score: precision@fraction against the
queried chain's tokens and its value tokens, the same-role pairwise AUC (overall, essential token
first, essential token later) and, for scores read from attention, the share of the score's total
on distractor-chain and queried-chain statements. Eligible tokens: the response less its answer
span. Per layer, where the sink rows look (`sink_rows`): the share of the answer row's and of its
predictor row's attention on the queried chain, the distractor chains, the prompt and the queried
chain's last value (the one token the answer must read), over correctly answered responses.
Dims: B responses, T tokens, S keys, M masks.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np

from experiments import common
from experiments.common import show
from ftjax import capture, credit, evaluation, rollout, train
from ftjax.tasks.branches import BranchesTask
from ftjax.tasks.vocab import VOCAB

FLOW_SCORES = ("flowtracer", *evaluation.ATTENTION_SCORES)  # read attention; leakage reported
FIXED_SCORES = ("position", "entropy", "random", "constant")  # the same for every layer choice
SEMICOLON = VOCAB.encode(";")[0]
# FlowTracer's (sink, source) choices the analysis reads; the first is the paper's (the default).
ENDPOINTS = tuple((k, s) for k in credit.SINKS for s in credit.SOURCES)


def score_metrics(score_BxT, truth: dict, nonnegative: bool, fraction: float) -> dict:
    """precision@fraction and same-role AUC against both essential sets; leakage shares."""
    eligible_BxT, roles_BxT, chains_BxT = truth["eligible"], truth["roles"], truth["chains"]
    out = {}
    for prefix, essential_BxT in (("", truth["labels"]), ("value_", truth["values"])):
        out[f"{prefix}precision"] = evaluation.precision(
            score_BxT, essential_BxT, ~eligible_BxT, eligible_BxT, fraction
        )
        auc = evaluation.pairwise_auc(score_BxT, essential_BxT, eligible_BxT, roles_BxT)
        out.update({f"{prefix}{k}": v for k, v in auc.items() if "pairs" not in k})
    if nonnegative:
        mass_BxT = np.where(eligible_BxT, score_BxT, 0.0)
        total_B = mass_BxT.sum(-1)
        live_B = total_B > 0
        for name, where_BxT in (("leak", chains_BxT >= 1), ("queried", chains_BxT == 0)):
            share_B = (mass_BxT * where_BxT).sum(-1)[live_B] / total_B[live_B]
            out[f"{name}_share"] = float(share_B.mean()) if live_B.any() else float("nan")
    return out


SINK_ROWS = (("predictor", -1), ("answer", 0))  # the row before the answer's first token; its own
SINK_TARGETS = ("queried", "distractors", "prompt", "queried_last_value")


def sink_rows(attn_BxTxS, answer_BxT, chains_BxT, prompt_BxT, values_BxT) -> dict:
    """Mean over responses of where each sink row's attention goes (SINK_TARGETS); responses
    without an answer or without a queried-chain value are skipped."""
    targets_BxS = {
        "queried": chains_BxT == 0,
        "distractors": chains_BxT >= 1,
        "prompt": prompt_BxT,
        "queried_last_value": np.zeros_like(prompt_BxT, bool),
    }
    queried_values_BxT = values_BxT & (chains_BxT == 0)
    live_B = answer_BxT.any(-1) & queried_values_BxT.any(-1)
    rows_B = np.flatnonzero(live_B)
    last_B = answer_BxT.shape[1] - 1 - queried_values_BxT[:, ::-1].argmax(-1)
    targets_BxS["queried_last_value"][rows_B, last_B[rows_B]] = True
    first_B = answer_BxT.argmax(-1)
    out = {}
    for row, offset in SINK_ROWS:
        attn_BxS = attn_BxTxS[rows_B, first_B[rows_B] + offset]
        out[row] = {
            name: float((attn_BxS * where_BxS[rows_B]).sum(-1).mean()) if rows_B.size else None
            for name, where_BxS in targets_BxS.items()
        }
    return out


def statements(chains_T, tokens_T) -> list[tuple[int, int, int]]:
    """(chain id, first column, end column) of every well-formed statement (each ends at `;`)."""
    spans, start = [], None
    for t, chain in enumerate(chains_T):
        if chain >= 0 and start is None:
            start = t
        if start is not None and (chain < 0 or tokens_T[t] == SEMICOLON):
            end = t + 1 if chain >= 0 else t
            spans.append((int(chains_T[start]), start, end))
            start = None
    return spans


def causal(model, task, got, keep_B, chains_BxT) -> dict:
    """Answer-change rates when the keys of one statement (or one whole set) are hidden."""
    batch = got.batch
    tokens_BxT, answer_BxT = np.asarray(batch.tokens_BxT), np.asarray(batch.answer_mask_BxT)
    valid_BxT = np.asarray(batch.prompt_mask_BxT | batch.response_mask_BxT)
    rows = np.flatnonzero(keep_B)
    masks = []  # (row among `rows`, kind, keys_T)
    for r, b in enumerate(rows):
        query = task.parse_prompt(got.prompts[b]).query
        spans = statements(chains_BxT[b], tokens_BxT[b])
        for chain, start, end in spans:
            kinds = ["queried statement" if chain == 0 else "distractor statement"]
            if chain == 0 and VOCAB.decode([int(tokens_BxT[b, start])]) == query:
                kinds.append("queried last statement")
            for kind in kinds:
                mask_T = np.zeros(tokens_BxT.shape[1], bool)
                mask_T[start:end] = True
                masks.append((r, kind, mask_T))
        for kind, queried in (("whole queried chain", True), ("all distractor chains", False)):
            mask_T = np.zeros(tokens_BxT.shape[1], bool)
            for chain, start, end in spans:
                if (chain == 0) == queried:
                    mask_T[start:end] = True
            if mask_T.any():
                masks.append((r, kind, mask_T))
    if not masks:
        return {}
    row_M, kind_M, keys = zip(*masks, strict=True)
    changed_M = common.answer_changes(
        model, tokens_BxT[rows], valid_BxT[rows], answer_BxT[rows].argmax(-1),
        answer_BxT[rows].sum(-1), row_M, np.stack(keys),
    )  # fmt: skip
    kind_M = np.asarray(kind_M)
    return {
        kind: {"answer_change_rate": float(changed_M[kind_M == kind].mean()),
               "masks": int((kind_M == kind).sum())}
        for kind in dict.fromkeys(kind_M)
    }  # fmt: skip


def saved(cfg, out: pathlib.Path) -> dict | None:
    """A seed's saved analysis made under the current settings, or None."""
    path = out / "analysis.json"
    if path.exists() and (found := json.loads(path.read_text()))["settings"] == settings(cfg):
        return found
    return None


def settings(cfg) -> dict:
    return {
        "responses": cfg.analysis_responses, "fraction": cfg.fraction, "endpoints": 1,
        "sink_rows": 1,
    }  # fmt: skip


def analyse(cfg, task: BranchesTask, seed: int, model, out: pathlib.Path) -> dict:
    """Stage `analysis` of one seed (cfg: the study's StudyConfig), saved in `out` and reused
    while its settings hold."""
    if (found := saved(cfg, out)) is not None:
        return found
    prompt_len, new = cfg.lengths()
    got = evaluation.sample(
        model, task, common.EVAL_START, cfg.analysis_responses, prompt_len,
        rollout.sampling_config(task, new, 1.0), jax.random.PRNGKey(seed + 13),
    )  # fmt: skip
    batch = got.batch
    keep_B = np.asarray(batch.answer_mask_BxT).any(-1)
    response_BxT = np.asarray(batch.response_mask_BxT)
    chains_BxT = evaluation.layout(got, task.chain_ids, int, -1)
    truth = {
        "eligible": (response_BxT & ~np.asarray(batch.answer_mask_BxT))[keep_B],
        "labels": evaluation.layout(got, task.labels)[keep_B],
        "values": evaluation.layout(got, task.value_labels)[keep_B],
        "roles": evaluation.layout(got, task.roles, int, 0)[keep_B],
        "chains": chains_BxT[keep_B],
    }
    _, entropy_BxT, _ = jax.jit(lambda m, b: train.sequence_log_probs(m, b, capture.NONE))(
        model, batch
    )
    shape = response_BxT[keep_B].shape
    fixed = {
        "position": evaluation.position_score_BxT(response_BxT[keep_B]),
        "entropy": np.asarray(entropy_BxT)[keep_B],
        "random": np.random.default_rng(seed).random(shape),
        "constant": np.zeros(shape),
    }
    rows = {
        f"{name} | -": score_metrics(s, truth, False, cfg.fraction) for name, s in fixed.items()
    }
    L = cfg.policy.layers
    specs = {f"layer {i}": capture.CaptureSpec(mode="layers", layers=(i,)) for i in range(L)}
    middle = capture.captured_layers(capture.CaptureSpec(), L)
    specs[f"middle third {list(middle)} (default)"] = capture.CaptureSpec()
    specs["all layers"] = capture.CaptureSpec(mode="layers", layers=tuple(range(L)))
    prompt_BxT, done, looks = np.asarray(batch.prompt_mask_BxT), {}, {}
    solved_B = keep_B & (np.asarray(batch.rewards_B) > 0)
    sink_truth = (
        np.asarray(batch.answer_mask_BxT)[solved_B], chains_BxT[solved_B],
        prompt_BxT[solved_B], evaluation.layout(got, task.value_labels)[solved_B],
    )  # fmt: skip
    for label, spec in specs.items():
        layers = capture.captured_layers(spec, L)
        if layers not in done:  # the same layers read twice give the same numbers
            tau_BxT, attn_BxTxT = jax.jit(lambda m, b, s=spec: evaluation.throughput(m, b, s))(
                model, batch
            )
            scores = {"flowtracer": np.asarray(tau_BxT, np.float64)}
            scores.update(evaluation.attention_scores(attn_BxTxT, prompt_BxT, response_BxT))
            done[layers] = {
                name: score_metrics(s[keep_B], truth, True, cfg.fraction)
                for name, s in scores.items()
            }
            if len(layers) == 1:
                looks[label] = sink_rows(np.asarray(attn_BxTxT)[solved_B], *sink_truth)
        rows.update({f"{name} | {label}": m for name, m in done[layers].items()})
    default = f"middle third {list(middle)} (default)"
    for sink, source in ENDPOINTS[1:]:  # FlowTracer's other sinks and sources, default layers
        ends = credit.CreditConfig(sink=sink, source=source)
        tau_BxT, _ = jax.jit(
            lambda m, b, c=ends: evaluation.throughput(m, b, capture.CaptureSpec(), c)
        )(model, batch)
        row = score_metrics(np.asarray(tau_BxT, np.float64)[keep_B], truth, True, cfg.fraction)
        rows[f"flowtracer sink={sink} source={source} | {default}"] = row
    result = {
        "settings": settings(cfg),
        "responses_with_answer": int(keep_B.sum()),
        "correct": float(np.asarray(batch.rewards_B).mean()),
        "base_rate": float(truth["labels"][truth["eligible"]].mean()) if keep_B.any() else None,
        "rows": rows,
        "causal": causal(model, task, got, keep_B, chains_BxT),
        "sink_rows": looks,  # per single layer, over correctly answered responses
    }
    out.mkdir(parents=True, exist_ok=True)  # absent when the warm-up came from --warmups_from
    (out / "analysis.json").write_text(json.dumps(result) + "\n")
    return result


ANALYSIS_COLUMNS = (
    ("precision", "precision@40"), ("auc", "AUC"), ("essential_first", "AUC first"),
    ("essential_later", "AUC later"), ("value_precision", "value precision@40"),
    ("value_auc", "value AUC"), ("leak_share", "share on distractors"),
    ("queried_share", "share on queried chain"),
)  # fmt: skip


def analysis_table(per_seed: dict) -> str:
    runs = list(per_seed.values())
    head = " | ".join(label for _, label in ANALYSIS_COLUMNS)
    lines = [
        f"scores on the warm-up policies' sampled responses ({len(runs)} seeds; mean ± SE over "
        "seeds; answer span not eligible; AUC over same-role pairs)",
        f"| score | layers | {head} |",
        "|---|---|" + "---|" * len(ANALYSIS_COLUMNS),
    ]
    for row in runs[0]["rows"]:
        cells = [show(r["rows"][row].get(key) for r in runs) for key, _ in ANALYSIS_COLUMNS]
        cells = ["-" if c == "n/a" and "share" in key else c
                 for c, (key, _) in zip(cells, ANALYSIS_COLUMNS, strict=True)]  # fmt: skip
        lines.append(f"| {row} | {' | '.join(cells)} |")
    lines += [
        "\nbase rate (queried-chain share of eligible tokens) "
        + show(r["base_rate"] for r in runs)
        + "; responses with an answer per seed "
        + show(r["responses_with_answer"] for r in runs)
        + "; sampled accuracy "
        + show(r["correct"] for r in runs),
        "\ncausal ground truth: answer change when a statement's tokens are hidden as keys",
        "| masked | answer change rate | masks (all seeds) |",
        "|---|---|---|",
    ]
    for kind in dict.fromkeys(k for r in runs for k in r["causal"]):
        found = [r["causal"][kind] for r in runs if kind in r["causal"]]
        lines.append(
            f"| {kind} | {show(c['answer_change_rate'] for c in found)} | "
            f"{sum(c['masks'] for c in found)} |"
        )
    lines += [
        "\nwhere the sink rows look: share of the row's attention (mean over heads), over "
        "correctly answered responses",
        f"| layer | row | {' | '.join(SINK_TARGETS)} |",
        "|---|---|" + "---|" * len(SINK_TARGETS),
    ]
    for layer in dict.fromkeys(k for r in runs for k in r.get("sink_rows", {})):
        for row, _ in SINK_ROWS:
            found = [r["sink_rows"][layer][row] for r in runs if layer in r.get("sink_rows", {})]
            cells = [show(f[name] for f in found) for name in SINK_TARGETS]
            lines.append(f"| {layer} | {row} | {' | '.join(cells)} |")
    return "\n".join(lines)
