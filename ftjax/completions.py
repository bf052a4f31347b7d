"""Sampled completions written for reading: completions.jsonl and an HTML credit page per step.

Dims: B rows of the rollout batch, T = L + N token slots, R rows this process holds.

Every `LoopConfig.log_completions_every` steps, and at every step after which an evaluation
runs, the RL loop writes the step's completions: one JSON line per row to run_dir/
completions.jsonl,

    {"step", "row", "prompt", "completion", "reward", "answer_span", "answer",
     "answer_tokens", "tokens", "gamma", "tau"}

(`step` as in metrics.jsonl; `row`: the row of the rollout batch; `answer_span`: [start, end)
characters of the completion its answer tokens cover, or null, and `answer` that text;
`answer_tokens`: their indices; `tokens`: each response token's text, joining to the completion;
`gamma`: the credit's weight per token; `tau`: FlowTracer's throughput per token, present when
the credit variant reads attention) and run_dir/completions/step_NNNNNN.html, the first
`HTML_ROWS` of them drawn like the quickstart's credit page (`viz.credit_html`). With several
processes, process 0 writes its own rows. A resumed run appends: readers keep the last line of
each (step, row).

gamma and tau come from `credit_tokens`: one gradient-free forward of the batch under the state
the step starts from, with the step's own credit key, so gamma is the step's gamma (the train
step itself returns scalars only). It costs one forward pass on the steps that log.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import credit, logging, microbatch, multihost, sharding, state_init, train, viz

HTML_ROWS = 16  # rows drawn on each step's page (all of them go to completions.jsonl)
JSONL = "completions.jsonl"
HTML_DIR = "completions"


def due(steps_done: int, every: int, evaluation_due: bool) -> bool:
    """Whether the step that makes `steps_done` logs its completions (`every` 0: never)."""
    return every > 0 and (steps_done % every == 0 or evaluation_due)


def reads_attention(cfg: train.StepConfig) -> bool:
    return "attn_BxTxT" in credit.get(cfg.credit.name).needs


def credit_tokens(graphdef, state: train.TrainState, batch: train.Batch, cfg, mesh=None):
    """(gamma_BxT, tau_BxT or None) that the train step from `state` computes for `batch`: the
    same credit key (`jax.random.split(state.rng)[1]`) and micro-batch passes. tau is FlowTracer's
    throughput (source prompt, sink answer) of the same captured map, for a variant that reads
    attention."""
    credit_rng = jax.random.split(state.rng)[1]
    if batch.gamma_BxT is not None:
        raise ValueError("credit_tokens takes a rollout batch without gamma_BxT")
    if not reads_attention(cfg):
        return train.forward_credit(graphdef, state.params, batch, cfg, credit_rng, mesh)[2], None
    model = train.policy_model(graphdef, state.params, cfg)
    shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    n = microbatch.passes(batch.tokens_BxT.shape[0], cfg.micro_batch, shards)

    def one_pass(part):
        part_batch, k = part
        logp, entropy, attn = train.sequence_log_probs(
            model, part_batch, cfg.capture, "none", cfg.logit_chunk, cfg.scan_layers
        )
        key = credit_rng if n == 1 else jax.random.fold_in(credit_rng, k)
        gamma = train.credit_weights(part_batch, cfg, logp, entropy, attn, key)
        tau, _ = credit.throughput(train.credit_inputs(part_batch, attn), cfg.credit)
        return gamma, tau

    parts = (microbatch.split(batch, n, shards, mesh), jnp.arange(n))
    return jax.lax.stop_gradient(
        microbatch.merge(microbatch.forward(one_pass, parts, n), shards, mesh)
    )


def make_credit_tokens(graphdef, state: train.TrainState, batch: train.Batch, cfg, mesh):
    """`credit_tokens` jitted for this mesh: fn(state, batch) -> (gamma_BxT, tau_BxT or None),
    batch-sharded (`multihost.host_rows` reads this process's rows). `batch` gives shapes."""
    rows = sharding.batch_sharding(mesh)
    return jax.jit(
        lambda state, batch: credit_tokens(graphdef, state, batch, cfg, mesh),
        in_shardings=(state_init.state_shardings(state, mesh), jax.tree.map(lambda _: rows, batch)),
        out_shardings=rows,
    )


def token_strings(task, ids: Sequence[int]) -> list[str]:
    """Each token's text: `task.token_strings` where the task has it, else "<id>"."""
    named = getattr(task, "token_strings", None)
    if callable(named):
        return list(named(list(ids)))
    return [f"<{int(i)}>" for i in ids]


def _rounded(values_T) -> list[float]:
    return [float(f"{float(v):.6g}") for v in values_T]


def records(
    task,
    step: int,
    rows_R: Sequence[int],
    batch: Mapping[str, np.ndarray],
    gamma_RxT: np.ndarray,
    tau_RxT: np.ndarray | None,
) -> list[dict]:
    """One record per row (module docstring). `batch`: this process's rows of tokens_BxT,
    prompt_mask_BxT, response_mask_BxT, answer_mask_BxT and rewards_B, as NumPy arrays."""
    prompts: dict[tuple, str] = {}  # a group's rows share their prompt
    out = []
    for r, row in enumerate(rows_R):
        tokens_T = batch["tokens_BxT"][r]
        prompt = tuple(int(t) for t in tokens_T[batch["prompt_mask_BxT"][r]])
        if prompt not in prompts:
            prompts[prompt] = "".join(token_strings(task, prompt))
        columns = np.flatnonzero(batch["response_mask_BxT"][r])
        strings = token_strings(task, tokens_T[columns])
        starts = np.concatenate([[0], np.cumsum([len(s) for s in strings])]).astype(int)
        completion = "".join(strings)
        answer = np.flatnonzero(batch["answer_mask_BxT"][r][columns])
        span = None if answer.size == 0 else [int(starts[answer[0]]), int(starts[answer[-1] + 1])]
        record = {
            "step": int(step),
            "row": int(row),
            "prompt": prompts[prompt],
            "completion": completion,
            "reward": float(batch["rewards_B"][r]),
            "answer_span": span,
            "answer": None if span is None else completion[span[0] : span[1]],
            "answer_tokens": answer.tolist(),
            "tokens": strings,
            "gamma": _rounded(gamma_RxT[r][columns]),
        }
        if tau_RxT is not None:
            record["tau"] = _rounded(tau_RxT[r][columns])
        out.append(record)
    return out


def _shown(values) -> list[float]:
    """Values a page can shade: non-finite and negative ones drawn as 0 (the JSONL keeps them)."""
    return [v if math.isfinite(v) and v > 0 else 0.0 for v in values]


def samples(records_: Sequence[Mapping]) -> tuple[list[viz.TokenSample], str]:
    """(the records as credit-page samples, what shades them: tau, else gamma)."""
    shade = "tau" if records_ and all("tau" in r for r in records_) else "gamma"
    out = []
    for record in records_:
        answer = set(record["answer_tokens"])
        out.append(
            viz.TokenSample(
                title=f"step {record['step']}, row {record['row']}",
                prompt_tokens=[record["prompt"]],
                response_tokens=list(record["tokens"]),
                throughput=_shown(record[shade]),
                selected=[g > 1.0 for g in record["gamma"]],
                answer=[t in answer for t in range(len(record["tokens"]))],
                reward=record["reward"],
                gamma=list(record["gamma"]),
            )
        )
    return out, shade


def write(run_dir: str | pathlib.Path, step: int, records_: Sequence[Mapping]) -> pathlib.Path:
    """Append the records to completions.jsonl and draw the first HTML_ROWS; returns the page."""
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / JSONL).open("a", encoding="utf-8") as file:
        for record in records_:
            file.write(json.dumps(record) + "\n")
    shown, shade = samples(records_[:HTML_ROWS])
    title = f"Completions at step {step}: background {shade}, underlined gamma > 1"
    return viz.write_credit_html(run_dir / HTML_DIR / f"step_{step:06d}.html", shown, title, shade)


def host_records(task, step: int, batch: train.Batch, gamma_BxT, tau_BxT, mesh) -> list[dict]:
    """`records` of this process's rows of a global batch and its credit."""
    rows_R = multihost.batch_rows(batch.tokens_BxT.shape[0], mesh)
    names = ("tokens_BxT", "prompt_mask_BxT", "response_mask_BxT", "answer_mask_BxT", "rewards_B")
    local = {name: multihost.host_rows(getattr(batch, name), mesh) for name in names}
    tau_RxT = None if tau_BxT is None else multihost.host_rows(tau_BxT, mesh)
    return records(task, step, rows_R, local, multihost.host_rows(gamma_BxT, mesh), tau_RxT)


def read(path: str | pathlib.Path) -> dict[tuple[int, int], dict]:
    """(step, row) -> the last record written for it."""
    return {(int(r["step"]), int(r["row"])): r for r in logging.jsonl_records(path)}
