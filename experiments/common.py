"""Pieces the experiments share: the tiny policy, the quickstart's and the chain task's RL
settings, warm-up with a checkpoint, RL runs, evaluation, restoring a quickstart run, and the
causal-masking helpers.

Dims: B responses, T tokens (prompt slots + response slots).

Task index streams never overlap: RL prompts are indices [0, ...), held-out evaluation prompts
[EVAL_START, ...), warm-up demonstrations [WARMUP_START, ...).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax import (
    checkpoint,
    credit,
    evaluation,
    loop,
    overrides,
    rl,
    rollout,
    sft,
    state_init,
    train,
)
from ftjax.checkpoint import Checkpointer
from ftjax.logging import MetricsLogger, read_jsonl
from ftjax.models import config as model_config
from ftjax.models.transformer import Transformer
from ftjax.tasks.branches import BranchesConfig, BranchesTask, max_lengths
from ftjax.tasks.chain import ChainConfig, ChainTask
from ftjax.tasks.vocab import EOS, PAD, VOCAB

EVAL_START = 10**6
WARMUP_START = 2 * 10**6


def parse(default_cfg, argv: list[str]):
    """The experiment's config from its command line. `--plugins a.py,b.py` (credit variants of
    your own) are imported first, so their names are valid anywhere on the line."""
    plugins = (overrides.peek(argv, "plugins") or "").split(",")
    credit.load_plugins([path for path in plugins if path])
    return overrides.apply(default_cfg, argv)


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """A from-scratch Llama-family policy over the task vocabulary."""

    layers: int = 4  # transformer blocks
    hidden: int = 64  # model width (the MLP is 4x)
    heads: int = 4  # attention heads; must divide hidden

    def __post_init__(self):
        if self.layers < 1 or self.heads < 1 or self.hidden % self.heads:
            raise ValueError(
                f"PolicyConfig needs layers >= 1 and hidden divisible by heads, got {self}"
            )

    def model_config(self) -> model_config.ModelConfig:
        return model_config.tiny(
            "llama",
            vocab_size=VOCAB.size,
            num_layers=self.layers,
            hidden_size=self.hidden,
            intermediate_size=4 * self.hidden,
            num_heads=self.heads,
            num_kv_heads=self.heads,
            head_dim=self.hidden // self.heads,
            max_position_embeddings=256,
            eos_token_ids=(EOS,),
            pad_token_id=PAD,
        )


def build_policy(cfg: PolicyConfig, seed: int) -> Transformer:
    return Transformer(cfg.model_config(), rngs=nnx.Rngs(seed))


@dataclasses.dataclass(frozen=True)
class ChainSetting:
    """The chain task's RL setting (the first quickstart's, until 2026-12-03): tiny policy,
    warm-up, then RL per credit variant. The credit suite's base setting; quickstart runs made
    before the switch to the branches task are read back with it."""

    out: str = "runs/quickstart"  # run directory: metrics, checkpoints, summary, plots
    seed: int = 0  # task problems, parameter init and sampling
    task: ChainConfig = ChainConfig(chain_length=3, distractors=2, ops=("+", "-"), max_constant=1)
    policy: PolicyConfig = PolicyConfig(layers=3, hidden=128, heads=4)
    warmup: sft.SFTConfig = sft.SFTConfig(steps=250, batch_size=32, lr=3e-3, warmup_steps=25)
    credits: tuple[str, ...] = ("uniform", "flowtracer")  # one RL run from the warm-up each
    plugins: tuple[str, ...] = ()  # .py files to import first (your own credit variants)
    rl_steps: int = 100  # RL steps per credit variant
    prompts_per_step: int = 8  # prompts per RL step
    group_size: int = 8  # responses per prompt (GRPO group)
    lr: float = 1e-4  # RL learning rate
    compute_dtype: str = "float32"  # the RL step's forward/backward; "bfloat16" keeps fp32 Adam
    temperature: float = 1.0  # RL sampling (and the sampled evaluation)
    eval_prompts: int = 512  # held-out prompts for greedy and sampled accuracy
    precision_responses: int = 256  # responses on which each credit's precision@40 is measured
    prompt_len: int = 44  # prompt slots
    max_new_tokens: int = 44  # response slots
    progress: bool = True  # progress bars on stderr

    def __post_init__(self):
        _check_counts(self)

    def lengths(self) -> tuple[int, int]:
        """(prompt slots, response slots)."""
        return self.prompt_len, self.max_new_tokens


# The quickstart's task: two chains of a root and one link (one queried, one dead end), mod 5,
# links that substitute their parent's value, taught by a teacher who works out 60% of the `-`
# links as `+` (experiments/RESULTS.md, "Dead-end branches with a flawed teacher").
QUICKSTART_TASK = BranchesConfig(chains=2, chain_length=2, modulus=5, substitute=True, slip=0.6)


@dataclasses.dataclass(frozen=True)
class QuickstartConfig:
    """The quickstart's setting: dead-end branches with a flawed teacher, tiny policy, warm-up
    (restored from the one shipped in experiments/assets when the settings are its own), then
    RL per credit variant from it."""

    out: str = "runs/quickstart"  # run directory: metrics, checkpoints, summary, plots
    seed: int = 0  # task problems, parameter init and sampling
    task: BranchesConfig = QUICKSTART_TASK
    policy: PolicyConfig = PolicyConfig(layers=4, hidden=128, heads=4)
    warmup: sft.SFTConfig = sft.SFTConfig(steps=600, batch_size=32, lr=1e-3, warmup_steps=60)
    # Train the warm-up even when the shipped one (experiments/assets) has these settings
    fresh_warmup: bool = False
    # Write the warm-up's parameters to this .safetensors file and stop (how the shipped one is
    # made: `--fresh_warmup true --save_warmup experiments/assets/quickstart_warmup.safetensors`)
    save_warmup: str | None = None
    credits: tuple[str, ...] = ("uniform", "flowtracer")  # one RL run from the warm-up each
    plugins: tuple[str, ...] = ()  # .py files to import first (your own credit variants)
    rl_steps: int = 60  # RL steps per credit variant
    prompts_per_step: int = 8  # prompts per RL step
    group_size: int = 8  # responses per prompt (GRPO group)
    lr: float = 3e-5  # RL learning rate
    compute_dtype: str = "float32"  # the RL step's forward/backward; "bfloat16" keeps fp32 Adam
    temperature: float = 1.0  # RL sampling (and the sampled evaluation)
    eval_prompts: int = 1024  # held-out prompts for greedy and sampled accuracy
    precision_responses: int = 256  # responses on which each credit's precision is measured
    prompt_len: int | None = None  # prompt slots; None: the task's longest prompt
    max_new_tokens: int | None = None  # response slots; None: the longest solver response + 4
    progress: bool = True  # progress bars on stderr

    def __post_init__(self):
        _check_counts(self)
        if self.task.answer_only:
            raise ValueError("QuickstartConfig.task.answer_only is a control format; leave it")
        for name in ("prompt_len", "max_new_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(
                    f"QuickstartConfig.{name} must be None or >= 1, got {getattr(self, name)}"
                )

    def lengths(self) -> tuple[int, int]:
        """(prompt slots, response slots): the task's longest prompt and solver response + 4
        (`branches.max_lengths`), unless given."""
        prompt, response = max_lengths(self.task)
        return self.prompt_len or prompt, self.max_new_tokens or response + 4


def _check_counts(cfg) -> None:
    for field in ("rl_steps", "eval_prompts", "precision_responses"):
        if getattr(cfg, field) < 1:
            raise ValueError(
                f"{type(cfg).__name__}.{field} must be >= 1, got {getattr(cfg, field)}"
            )


def make_task(task_cfg: BranchesConfig | ChainConfig, seed: int | None = None):
    """The task a setting's config describes (with `seed` when given)."""
    if seed is not None:
        task_cfg = dataclasses.replace(task_cfg, seed=seed)
    return BranchesTask(task_cfg) if isinstance(task_cfg, BranchesConfig) else ChainTask(task_cfg)


def step_config(cfg: QuickstartConfig | ChainSetting, credit_name: str) -> train.StepConfig:
    return train.StepConfig(
        group_size=cfg.group_size,
        loss=rl.LossConfig(clip_high=0.28),
        credit=credit.CreditConfig(name=credit_name),
        optim=train.OptimConfig(lr=cfg.lr),
        compute_dtype=cfg.compute_dtype,
    )


def loop_config(cfg: QuickstartConfig | ChainSetting) -> loop.LoopConfig:
    prompt_len, max_new_tokens = cfg.lengths()
    return loop.LoopConfig(
        steps=cfg.rl_steps,
        prompts_per_step=cfg.prompts_per_step,
        prompt_len=prompt_len,
        sampling=rollout.sampling_config(make_task(cfg.task), max_new_tokens, cfg.temperature),
        checkpoint_every=max(cfg.rl_steps // 2, 1),
        keep_checkpoints=1,
        seed=cfg.seed,
        progress=cfg.progress,
    )


def warm_up(
    model: Transformer,
    task,
    cfg: sft.SFTConfig,
    prompt_len: int,
    response_len: int,
    run_dir: pathlib.Path,
    progress: bool = True,
) -> float:
    """Supervised warm-up on the task's solver traces, logged to run_dir/metrics.jsonl and
    checkpointed; a finished warm-up in run_dir is restored instead of redone. Returns seconds."""
    checkpoints = Checkpointer(run_dir / "checkpoints", keep=1)
    params = nnx.state(model, nnx.Param)
    try:
        if checkpoints.latest_step() == cfg.steps:
            restored, _ = checkpoints.restore(params)
            nnx.update(model, restored)
            return 0.0
        logger = MetricsLogger(
            run_dir, total_steps=cfg.steps, console_keys=("loss",), progress=progress
        )
        started = time.perf_counter()
        try:
            sft.warm_up(
                model,
                lambda start, count: task.demonstrations(WARMUP_START + start, count),
                cfg,
                prompt_len,
                response_len,
                PAD,
                on_step=lambda step, loss: logger.log(step, {"loss": loss}),
            )
        finally:
            logger.close()
        seconds = time.perf_counter() - started
        meta = {"step": cfg.steps, "kind": checkpoint.PARAMS}
        checkpoints.save(cfg.steps, nnx.state(model, nnx.Param), meta)
        return seconds
    finally:
        checkpoints.close()


def rl_run(
    warm_params,
    policy: PolicyConfig,
    task,
    step_cfg: train.StepConfig,
    loop_cfg: loop.LoopConfig,
    run_dir: pathlib.Path,
) -> tuple[Transformer, dict[int, dict[str, float]]]:
    """RL from the warm-up parameters; resumes a run directory that has checkpoints. Returns
    the trained policy and every step's metrics (read back from the run's JSONL, so steps run
    before a resume are there too)."""
    model = build_policy(policy, seed=0)
    nnx.update(model, warm_params)
    result = loop.run(model, task, step_cfg, loop_cfg, run_dir)
    return result.policy(), read_jsonl(run_dir / "metrics.jsonl")


def write_result(out_dir: pathlib.Path, stem: str, result: dict, table: str) -> None:
    """Print an experiment's table and keep it as out_dir/stem.md, its numbers as stem.json."""
    print(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(table + "\n")


def median_step_seconds(history: dict[int, dict[str, float]], key: str = "time/step_s") -> float:
    """Median over steps, the first (compilation) left out."""
    times = [m[key] for step, m in sorted(history.items()) if step > min(history) and key in m]
    return float(np.median(times)) if times else float("nan")


def credit_quality(
    model,
    task,
    variants: list[str],
    count: int,
    prompt_len: int,
    max_new_tokens: int,
    rng,
    fraction: float = 0.4,
) -> dict[str, dict[str, float]]:
    """How well each variant's gamma finds the task's ground-truth essential tokens, on `count`
    sampled responses (temperature 1) to held-out prompts that have an answer span: precision at
    `fraction` ("precision"), and where the task gives each token a role (`task.roles`) the
    position-controlled same-role pairwise AUC over the response less its answer span ("auc",
    "auc_first" and "auc_later": pairs whose essential token comes first / later; 0.5 = no
    preference; `evaluation.pairwise_auc`)."""
    sampled = rollout.sampling_config(task, max_new_tokens, 1.0)
    got = evaluation.sample(model, task, EVAL_START, count, prompt_len, sampled, rng)
    labels_BxT = evaluation.task_labels(task, got)
    gammas = evaluation.credit_gammas(
        model, got.batch, variants, credit.CreditConfig(), train.StepConfig().capture, rng
    )
    answer_BxT = np.asarray(got.batch.answer_mask_BxT)
    response_BxT = np.asarray(got.batch.response_mask_BxT)
    keep_B = answer_BxT.any(-1)
    roles_BxT = evaluation.layout(got, task.roles, int, 0) if hasattr(task, "roles") else None
    eligible_BxT = (response_BxT & ~answer_BxT)[keep_B]
    out = {}
    for name, gamma_BxT in gammas.items():
        args = (gamma_BxT[keep_B], labels_BxT[keep_B])
        out[name] = {
            "precision": evaluation.precision(
                *args, answer_BxT[keep_B], response_BxT[keep_B], fraction
            )
        }
        if roles_BxT is not None:
            auc = evaluation.pairwise_auc(*args, eligible_BxT, roles_BxT[keep_B])
            out[name].update(
                auc=auc["auc"], auc_first=auc["essential_first"], auc_later=auc["essential_later"]
            )
    return out


def credit_precision(
    model,
    task,
    variants: list[str],
    count: int,
    prompt_len: int,
    max_new_tokens: int,
    rng,
    fraction: float = 0.4,
) -> dict[str, float]:
    """precision@fraction of each variant's gamma against the task's ground-truth labels
    (`credit_quality`'s "precision")."""
    quality = credit_quality(
        model, task, variants, count, prompt_len, max_new_tokens, rng, fraction
    )
    return {name: q["precision"] for name, q in quality.items()}


def load_policy(checkpoint_dir: pathlib.Path, policy: PolicyConfig) -> Transformer:
    """The policy of the latest checkpoint in `checkpoint_dir` (a warm-up's or an RL run's)."""
    if not pathlib.Path(checkpoint_dir).is_dir():
        raise ValueError(f"no checkpoint in {checkpoint_dir}; run the quickstart first")
    model, _ = state_init.restore_policy(build_policy(policy, seed=0), checkpoint_dir)
    return model


def run_config(run: pathlib.Path) -> QuickstartConfig | ChainSetting:
    """The settings a quickstart run was made with (its summary.json), not today's defaults:
    a `ChainSetting` for a run made before the quickstart moved to the branches task."""
    if not (run / "summary.json").exists():
        raise ValueError(f"{run} has no summary.json; run `python -m experiments.quickstart` first")
    saved = json.loads((run / "summary.json").read_text())["config"]
    task = {**saved["task"], "ops": tuple(saved["task"]["ops"])}
    kind, task_kind = (
        (QuickstartConfig, BranchesConfig) if "chains" in task else (ChainSetting, ChainConfig)
    )
    return dataclasses.replace(
        kind(),
        policy=PolicyConfig(**saved["policy"]),
        task=task_kind(**task),
        prompt_len=saved["prompt_len"],
        max_new_tokens=saved["max_new_tokens"],
    )


def trained_samples(run: pathlib.Path, policy: str, responses: int, temperature: float, seed: int):
    """(settings, task, policy, sampled responses to held-out prompts) of a quickstart run."""
    qs = run_config(run)
    task, (prompt_len, max_new_tokens) = make_task(qs.task), qs.lengths()
    model = load_policy(run / policy / "checkpoints", qs.policy)
    sampled = rollout.sampling_config(task, max_new_tokens, temperature)
    got = evaluation.sample(
        model, task, EVAL_START, responses, prompt_len, sampled, jax.random.PRNGKey(seed)
    )
    return qs, task, model, got


# ----------------------------------------------------------------------------- causal masking

MASKING_MODES = ("top", "random", "bottom")


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


def redecode(
    model, tokens_BxT, valid_BxT, positions_BxT, start_B, steps: int, forward=None
) -> np.ndarray:
    """Greedy re-decoding of `steps` tokens from column start_B[b] of each row, by full forward
    passes (keys that are not valid are never attended; positions are given, so masking shifts
    nothing). Column start_B[b] + j is overwritten by the j-th decoded token before step j + 1.
    `forward(model, tokens, valid, positions) -> logits` (e.g. `jitted_logits`; default: the
    model called eagerly)."""
    tokens_BxT = np.array(tokens_BxT)
    rows = np.arange(len(start_B))
    decoded_BxW = np.zeros((len(start_B), steps), np.int32)
    for j in range(steps):
        if forward is None:
            logits_BxTxV = model(
                tokens_BxT, valid_BxT=valid_BxT, positions_BxT=positions_BxT
            ).logits_BxTxV
        else:
            logits_BxTxV = forward(model, tokens_BxT, valid_BxT, positions_BxT)
        decoded_BxW[:, j] = np.asarray(jnp.argmax(logits_BxTxV[rows, start_B + j - 1], -1))
        if j + 1 < steps:
            tokens_BxT[rows, start_B + j] = decoded_BxW[:, j]
    return decoded_BxW


@jax.jit
def jitted_logits(model, tokens_BxT, valid_BxT, positions_BxT):
    """The model's logits_BxTxV under jit (one compile per shape): a `redecode` forward."""
    return model(tokens_BxT, valid_BxT=valid_BxT, positions_BxT=positions_BxT).logits_BxTxV


def answer_changes(
    model, tokens_RxT, valid_RxT, start_R, width_R, row_M, keys_MxT, chunk: int = 256
) -> np.ndarray:
    """changed_M: whether hiding the keys keys_MxT[m] (True: no query may read that column;
    positions unchanged) from response row_M[m] changes its greedily re-decoded answer (the
    width_R[r] tokens from column start_R[r]) against the same re-decoding without a mask.
    `chunk` rows per forward pass."""
    tokens_RxT, valid_RxT = np.asarray(tokens_RxT), np.asarray(valid_RxT, bool)
    start_R, width_R = np.asarray(start_R, int), np.asarray(width_R, int)
    row_M, keys_MxT = np.asarray(row_M, int), np.asarray(keys_MxT, bool)
    if keys_MxT.shape != (len(row_M), tokens_RxT.shape[1]):
        raise ValueError(f"keys_MxT has shape {keys_MxT.shape}, expected ({len(row_M)}, T)")
    if (keys_MxT & (np.arange(tokens_RxT.shape[1])[None] >= start_R[row_M][:, None])).any():
        raise ValueError("a masked key is at or after its row's answer start")
    positions_RxT = np.maximum(np.cumsum(valid_RxT, -1) - 1, 0)
    width = int(width_R.max(initial=0))

    def decode(tokens, valid, positions, start):
        parts = [
            redecode(model, tokens[i : i + chunk], valid[i : i + chunk],
                     positions[i : i + chunk], start[i : i + chunk], width, jitted_logits)
            for i in range(0, len(start), chunk)
        ]  # fmt: skip
        return np.concatenate(parts) if parts else np.zeros((0, width), np.int32)

    base_RxW = decode(tokens_RxT, valid_RxT, positions_RxT, start_R)
    masked_MxW = decode(
        tokens_RxT[row_M], valid_RxT[row_M] & ~keys_MxT, positions_RxT[row_M], start_R[row_M]
    )
    answer_MxW = np.arange(width)[None, :] < width_R[row_M][:, None]
    return np.any((masked_MxW != base_RxW[row_M]) & answer_MxW, -1)


def masking_table(title: str, result: dict) -> str:
    lines = [title, "| masked | answer change | correctness flip |", "|---|---|---|"]
    for mode in MASKING_MODES:
        r = result[mode]
        lines.append(
            f"| {mode} flow | {r['answer_change_rate']:.3f} | {r['correctness_flip_rate']:.3f} |"
        )
    return "\n".join(lines)


def arms_table(title: str, result: dict, labels: dict[str, str]) -> str:
    """`masking_table` for any set of arms: one row per key of `labels` (arm -> row label), each
    with the mean number of tokens its mask hides (`tokens_masked`), the answer-change rate and
    the correctness-flip rate of result[arm]."""
    lines = [title, "| masked | tokens masked (mean) | answer change | correctness flip |"]
    lines.append("|---|---|---|---|")
    for arm, label in labels.items():
        r = result[arm]
        lines.append(
            f"| {label} | {r['tokens_masked']:.2f} | {r['answer_change_rate']:.3f} "
            f"| {r['correctness_flip_rate']:.3f} |"
        )
    return "\n".join(lines)


def mean_se(values) -> tuple[float, float, int]:
    """(mean, standard error, count) of the finite values (None and NaN dropped)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return (float(v.mean()) if len(v) else float("nan")), se, len(v)


def show(values) -> str:
    """`mean ± SE` of the finite values, "n/a" when there are none."""
    mean, se, n = mean_se(values)
    return "n/a" if n == 0 else f"{mean:.3f} ± {se:.3f}"
