"""CPU quickstart: RL that fixes a flawed teacher's habit, with and without FlowTracer credit.

    python -m experiments.quickstart [--rl_steps 60] [--out runs/quickstart] [--fresh_warmup true]
    python -m experiments.quickstart --plugins my_credit.py --credits uniform,flowtracer,my_variant

The task (`ftjax/tasks/branches.py`): two independent variable chains, one queried, one a dead
end; the response works out both and then answers. The warm-up's demonstrations come from a
flawed teacher who works out 60% of the `-` links as `+`, so the warm-up policy answers wrong
whenever the queried chain has a `-` link (greedy) and right about 40% of the time there when it
samples: something the reward can fix, on a token the answer depends on, while the same slips on
the dead-end chain do not matter.

1. Warm-up: a from-scratch 4-layer policy imitates the teacher (600 supervised steps). The one
   made with these settings ships in experiments/assets/quickstart_warmup.safetensors and is
   restored when the settings match (its record says how it was made); `--fresh_warmup true`
   trains it here (about 6 minutes on 2 cores), and any change to the task, policy, warm-up or
   lengths trains it.
2. RL from that same start and seed, once per credit variant (`uniform` = plain GRPO/DAPO,
   `flowtracer`), same prompts, same sampling keys, same compute.
3. A table: held-out accuracy before/after (greedy and sampled, 1024 prompts), each credit's
   precision@40% against the ground truth (the queried chain's statements) with its base rate,
   the position-controlled same-role AUC (0.5 = no preference; split by whether the essential
   token of a pair comes first or later, which is where a preference for early tokens shows),
   median step time and FlowTracer's overhead.

Writes to --out: summary.json and summary.md (the printed table), settings.json, warmup/ (when
trained here) and rl_<credit>/ with metrics.jsonl, TensorBoard events and checkpoints,
curves.png, credit.html and credit.png (sampled responses coloured by flow throughput, gamma > 1
underlined, the queried chain marked essential and the dead-end chain marked as such),
backbone.png (one response's flow backbone). A finished stage found in --out is reused, so an
interrupted run continues; an --out made under other settings is refused.
About 6 minutes on 2 quiet cores with the shipped warm-up (experiments/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time

import jax
import numpy as np
from flax import nnx

from experiments import common
from ftjax import capture, credit, evaluation, flow, params_file, rollout, viz
from ftjax.tasks.vocab import VOCAB

SHIPPED_WARMUP = (
    pathlib.Path(__file__).resolve().parent / "assets" / "quickstart_warmup.safetensors"
)
# What defines the RL runs under --out (evaluation sizes, credits and plugins do not).
RUN_KEYS = ("seed", "task", "policy", "warmup", "rl_steps", "prompts_per_step", "group_size",
            "lr", "compute_dtype", "temperature")  # fmt: skip
STUDY = "experiments/RESULTS.md, 'Dead-end branches with a flawed teacher'"

CURVE_KEYS = [
    "reward_mean",
    "loss",
    "entropy",
    "credit/selected_fraction",
    "grad_norm",
    "response_length",
]


def warmup_settings(cfg: common.QuickstartConfig) -> dict:
    """What defines the warm-up: a shipped warm-up is used only when its record holds these."""
    task = dataclasses.replace(cfg.task, seed=cfg.seed)
    settings = {
        "task": dataclasses.asdict(task),
        "policy": dataclasses.asdict(cfg.policy),
        "warmup": dataclasses.asdict(cfg.warmup),
        "lengths": cfg.lengths(),
        "seed": cfg.seed,
    }
    return json.loads(json.dumps(settings))


def run_settings(cfg: common.QuickstartConfig) -> dict:
    chosen = {k: v for k, v in dataclasses.asdict(cfg).items() if k in RUN_KEYS}
    return json.loads(json.dumps({**chosen, "lengths": cfg.lengths()}))


def claim_out(out: pathlib.Path, cfg: common.QuickstartConfig) -> None:
    """Record the settings the runs under `out` are made with; refuse an `out` made with others
    (its finished stages would be reused as if they were this run's)."""
    mine, path = run_settings(cfg), out / "settings.json"
    if not path.exists():
        if (out / "summary.json").exists() or any(out.glob("rl_*")):
            raise ValueError(
                f"{out} holds runs of an earlier quickstart (the chain task, no settings.json); "
                "pass another --out or remove it"
            )
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(mine, indent=2) + "\n")
        return
    theirs = json.loads(path.read_text())
    if theirs != mine:
        differ = sorted(k for k in {*mine, *theirs} if mine.get(k) != theirs.get(k))
        raise ValueError(
            f"{out} holds runs made with other settings (differing: {', '.join(differ)}); "
            "pass another --out or remove it"
        )


def warm_policy(cfg: common.QuickstartConfig, task, out: pathlib.Path):
    """(warm-up policy, seconds spent training it, where it came from)."""
    model = common.build_policy(cfg.policy, cfg.seed)
    settings = warmup_settings(cfg)
    shipped = (
        not cfg.fresh_warmup
        and cfg.save_warmup is None
        and SHIPPED_WARMUP.is_file()
        and params_file.record(SHIPPED_WARMUP).get("settings") == settings
    )
    if shipped:
        params_file.load(SHIPPED_WARMUP, model)
        here = pathlib.Path.cwd()
        shown = SHIPPED_WARMUP.relative_to(here) if SHIPPED_WARMUP.is_relative_to(here) else None
        return model, 0.0, f"restored from {shown or SHIPPED_WARMUP}"
    prompt_len, new = cfg.lengths()
    seconds = common.warm_up(model, task, cfg.warmup, prompt_len, new, out / "warmup", cfg.progress)
    source = f"trained in {seconds:.0f} s" if seconds else f"restored from {out / 'warmup'}"
    return model, seconds, source


def save_warmup(path: pathlib.Path, cfg, model, seconds: float, argv: list[str]) -> None:
    record = {
        "settings": warmup_settings(cfg),
        "command": " ".join(["python -m experiments.quickstart", *argv]),
        "train_seconds": round(seconds, 1),
        "versions": {"jax": jax.__version__, "numpy": np.__version__},
    }
    params_file.save(path, nnx.state(model, nnx.Param), record)


def evaluate(model, task, cfg: common.QuickstartConfig, variants) -> dict[str, float]:
    rng = jax.random.PRNGKey(cfg.seed + 7)
    prompt_len, new = cfg.lengths()
    greedy = rollout.sampling_config(task, new, 0.0)
    sampled = rollout.sampling_config(task, new, cfg.temperature)
    args = (task, common.EVAL_START, cfg.eval_prompts, prompt_len)
    out = {
        "accuracy_greedy": evaluation.accuracy(model, *args, greedy, rng),
        "accuracy_sampled": evaluation.accuracy(model, *args, sampled, rng),
    }
    quality = common.credit_quality(
        model, task, list(variants), cfg.precision_responses, prompt_len, new, rng
    )
    for name, scores in quality.items():
        out.update({f"{key}/{name}": value for key, value in scores.items()})
    return out


def table(summary: dict) -> str:
    before = summary["before"]
    lines = [
        "| credit | greedy acc before -> after | sampled acc before -> after | "
        "precision@40% (base rate) | same-role AUC (essential first / later) | "
        "median step s | credit overhead |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in summary["runs"].items():
        lines.append(
            f"| {name} | {before['accuracy_greedy']:.3f} -> {run['accuracy_greedy']:.3f} | "
            f"{before['accuracy_sampled']:.3f} -> {run['accuracy_sampled']:.3f} | "
            f"{run[f'precision/{name}']:.3f} ({run['precision/uniform']:.3f}) | "
            f"{run[f'auc/{name}']:.3f} ({run[f'auc_first/{name}']:.3f} / "
            f"{run[f'auc_later/{name}']:.3f}) | {run['step_seconds']:.3f} | "
            f"{run['credit_overhead']:+.1%} |"
        )
    return "\n".join(lines)


def _samples(model, task, prompt_len, max_new_tokens, rng, count):
    sampling = rollout.sampling_config(task, max_new_tokens, 1.0)
    got = evaluation.sample(model, task, common.EVAL_START, count, prompt_len, sampling, rng)
    spec = capture.CaptureSpec()
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
        dead_end = [c >= 1 for c in task.chain_ids(prompt, response)]
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
                dead_end=dead_end,
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


def write_pictures(
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


def main(argv: list[str]) -> dict:
    cfg = common.parse(common.QuickstartConfig(), argv)
    for name in cfg.credits:
        credit.get(name)  # unknown names fail here, before any work
    out = pathlib.Path(cfg.out)
    started = time.perf_counter()
    task = common.make_task(cfg.task, cfg.seed)
    prompt_len, max_new_tokens = cfg.lengths()
    variants = sorted(set(cfg.credits) | {"uniform", "flowtracer"})
    if cfg.save_warmup is None:
        claim_out(out, cfg)

    print(f"[1/3] warm-up: {cfg.warmup.steps} supervised steps on the teacher's traces", flush=True)
    model, warmup_s, source = warm_policy(cfg, task, out)
    if cfg.save_warmup is not None:
        save_warmup(pathlib.Path(cfg.save_warmup), cfg, model, warmup_s, argv)
        print(f"      {source}; written to {cfg.save_warmup}", flush=True)
        return {"saved_warmup": cfg.save_warmup, "warmup_seconds": warmup_s}
    warm_params = nnx.state(model, nnx.Param)
    before = evaluate(model, task, cfg, variants)
    print(
        f"      {source}; held-out accuracy greedy {before['accuracy_greedy']:.3f}, "
        f"sampled {before['accuracy_sampled']:.3f}",
        flush=True,
    )

    runs, histories, trained = {}, {}, {}
    for i, name in enumerate(cfg.credits):
        print(
            f"[2/3] RL with {name!r} credit ({i + 1}/{len(cfg.credits)}), {cfg.rl_steps} steps",
            flush=True,
        )
        trained[name], histories[name] = common.rl_run(
            warm_params,
            cfg.policy,
            task,
            common.step_config(cfg, name),
            common.loop_config(cfg),
            out / f"rl_{name}",
        )
        runs[name] = evaluate(trained[name], task, cfg, variants)
        runs[name]["step_seconds"] = common.median_step_seconds(histories[name])
        runs[name]["reward_mean"] = float(
            np.mean([histories[name][s]["reward_mean"] for s in sorted(histories[name])])
        )
    baseline = runs.get("uniform", {}).get("step_seconds", float("nan"))
    for run in runs.values():
        run["credit_overhead"] = run["step_seconds"] / baseline - 1.0

    print("[3/3] pictures", flush=True)
    shown = "flowtracer" if "flowtracer" in trained else cfg.credits[-1]
    write_pictures(
        out,
        trained[shown],
        task,
        histories,
        prompt_len,
        max_new_tokens,
        jax.random.PRNGKey(cfg.seed + 11),
    )

    summary = {
        "config": dataclasses.asdict(cfg),
        "lengths": [prompt_len, max_new_tokens],
        "warmup": source,
        "before": before,
        "runs": runs,
        "warmup_seconds": warmup_s,
        "wall_seconds": time.perf_counter() - started,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = table(summary) + (
        f"\n\nOne seed, {cfg.eval_prompts} held-out prompts. What the multi-seed study of this "
        f"setting found: {STUDY}."
    )
    (out / "summary.md").write_text(text + "\n")
    print(text)
    print(f"wall time {summary['wall_seconds']:.0f} s; outputs in {out}/")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
