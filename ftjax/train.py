"""The RL train step: capture -> credit -> loss -> grads -> update, one pure function.

Dims: B sequences (prompt + response, prompt left-padded), T tokens, V vocab.

`train_step(state, batch) -> (state, metrics)` is pure; `mesh_step.make_train_step` jits it once
with explicit in/out shardings on the mesh and donated state (`state_init` creates the state).
The captured attention comes from the same forward pass that computes the log-probs for the loss
(no extra pass); it is under stop_gradient, so credit never receives gradient. With several
optimisation epochs per rollout batch, run `prepare` once (old log-probs and credit from the
pre-update policy) and pass its gamma in the batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ftjax import credit as credit_lib
from ftjax import masked, microbatch, rl
from ftjax.capture import NONE, CaptureSpec
from ftjax.models.attention import SPLASH
from ftjax.models.transformer import check_attention_implementation, check_remat

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# fused: the training forward's captured layers give the map (no extra pass; their explicit
# softmax keeps B x H x T x S probabilities for the backward pass). separate: a gradient-free
# forward gives it first, and every layer of the training forward uses the fused kernel.
CREDIT_PASSES = ("fused", "separate")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-6  # AdamW learning rate (constant)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    b1: float = 0.9  # Adam's first-moment decay
    b2: float = 0.999  # Adam's second-moment decay
    # Adam's epsilon (optax's default 1e-8). Larger values damp the per-parameter normalisation
    # for parameters whose gradients are tiny (PPO implementations commonly use 1e-5)
    eps: float = 1e-8
    grad_clip: float = 1.0  # gradients clipped to this global norm
    max_nonfinite_steps: int = 3  # consecutive skipped steps before the loop stops

    def __post_init__(self):
        for name in ("lr", "grad_clip", "eps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"OptimConfig.{name} must be finite and > 0, got {value}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(
                f"OptimConfig.weight_decay must be finite and >= 0, got {self.weight_decay}"
            )
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"OptimConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.max_nonfinite_steps < 1:
            raise ValueError(
                f"OptimConfig.max_nonfinite_steps must be >= 1 (the loop stops after that many "
                f"skipped steps in a row), got {self.max_nonfinite_steps}"
            )


@dataclasses.dataclass(frozen=True)
class StepConfig:
    group_size: int = 8  # responses sampled per prompt (GRPO group)
    loss: rl.LossConfig = rl.LossConfig()
    credit: credit_lib.CreditConfig = credit_lib.CreditConfig()
    capture: CaptureSpec = CaptureSpec()
    optim: OptimConfig = OptimConfig()
    micro_batch: int | None = None  # rows per device per forward/backward pass; None: all
    remat: str = "none"  # recompute each layer in the backward pass: none / full / dots
    logit_chunk: int | None = None  # log-probs this many tokens at a time; None: all at once
    compute_dtype: str = "float32"  # forward/backward dtype; master params, Adam stay float32
    credit_pass: str = "fused"  # credit from the training forward, or a "separate" no-grad one
    scan_layers: bool = False  # alike layers as one lax.scan: compile time flat in depth
    # attention of the layers that do not capture: jax.nn.dot_product_attention's "xla" (every
    # backend) or "cudnn" (cuDNN flash attention: NVIDIA GPUs, compute_dtype bfloat16), or
    # "splash" (JAX's Pallas splash kernel: TPU; "splash_interpret" runs it anywhere, slowly)
    attention: str = "xla"

    def __post_init__(self):
        for name in ("micro_batch", "logit_chunk"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"StepConfig.{name} must be None or an int >= 1, got {value!r}")
        check_remat(self.remat)
        check_attention_implementation(self.attention)
        if self.attention == "cudnn" and self.compute_dtype == "float32":
            raise ValueError(
                "StepConfig.attention 'cudnn' needs StepConfig.compute_dtype 'bfloat16' "
                "(cuDNN flash attention has no float32 kernel)"
            )
        if self.credit_pass not in CREDIT_PASSES:
            raise ValueError(
                f"unknown StepConfig.credit_pass {self.credit_pass!r}; known: {CREDIT_PASSES}"
            )
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"unknown StepConfig.compute_dtype {self.compute_dtype!r}; "
                f"known: {tuple(COMPUTE_DTYPES)}"
            )
        if self.group_size < 1:
            raise ValueError(f"StepConfig.group_size must be >= 1, got {self.group_size}")
        if self.loss.scale_advantages and self.group_size < 2:
            raise ValueError(
                "StepConfig.group_size 1 with loss.scale_advantages: a group of one response has "
                "no standard deviation; use group_size >= 2 or --step.loss.scale_advantages false"
            )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array
    rng: jax.Array
    nonfinite_streak: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    """One rollout batch. log-probs are per token, log p(token_t | tokens_<t), 0 off-response.
    labels_BxT: the task's ground-truth essential tokens, present only for a credit variant that
    declares "labels_BxT" (`needs_labels`). response_start (static): no response token lies in a
    column before it (the rollout's prompt slots), so log-probs and entropies are computed from
    that column on and are 0 before it; 0 computes them everywhere."""

    tokens_BxT: jax.Array
    prompt_mask_BxT: jax.Array
    response_mask_BxT: jax.Array
    answer_mask_BxT: jax.Array
    rewards_B: jax.Array
    old_log_probs_BxT: jax.Array
    ref_log_probs_BxT: jax.Array | None = None
    gamma_BxT: jax.Array | None = None
    labels_BxT: jax.Array | None = None
    response_start: int = dataclasses.field(default=0, metadata=dict(static=True))


def needs_labels(cfg: StepConfig) -> bool:
    """Whether the configured credit variant reads the task's labels (the rollout must fill
    `Batch.labels_BxT`)."""
    return "labels_BxT" in credit_lib.get(cfg.credit.name).needs


def optimizer(
    cfg: OptimConfig, learning_rate: float | optax.Schedule | None = None
) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW at `learning_rate` (default: cfg.lr; a schedule for the
    supervised warm-up)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(
            cfg.lr if learning_rate is None else learning_rate,
            cfg.b1,
            cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        ),
    )


def policy_model(graphdef, params: nnx.State, cfg: StepConfig) -> nnx.Module:
    """The policy computing in `cfg.compute_dtype`: float parameters cast on the way in (the
    gradient flows back through the cast to the float32 master copy in the state)."""
    dtype = COMPUTE_DTYPES[cfg.compute_dtype]
    if dtype != jnp.float32:
        cast = lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p  # noqa: E731
        params = jax.tree.map(cast, params)
    return nnx.merge(graphdef, params)


def sequence_log_probs(
    model,
    batch: Batch,
    spec: CaptureSpec,
    remat: str = "none",
    logit_chunk: int | None = None,
    scan_layers: bool = False,
    attention: str = "xla",
):
    """Per-token log-probs and entropies (float32) of the batch's own tokens, and the captured
    map. With `logit_chunk`, no B x T x V logits exist: they are made and dropped that many
    tokens at a time, and recomputed in the backward pass (`rl.chunked_next_token_log_probs`).
    Logits are made only for the columns from `batch.response_start` on (0 before it): with
    long few-shot prompts most of the vocabulary projection would otherwise go to prompt tokens.
    `remat`, `scan_layers` and `attention` are the model's (`Transformer.__call__`)."""
    valid_BxT = batch.prompt_mask_BxT | batch.response_mask_BxT
    kw = dict(
        valid_BxT=valid_BxT,
        capture=spec,
        remat=remat,
        scan_layers=scan_layers,
        attention=attention,
    )
    # The hidden state of column s - 1 predicts column s: scoring starts one column earlier.
    first = max(batch.response_start - 1, 0)
    if logit_chunk is None and first == 0:
        out = model(batch.tokens_BxT, **kw)
        logp, entropy = rl.next_token_log_probs(out.logits_BxTxV, batch.tokens_BxT)
        return logp, entropy, out.attn_BxTxS
    out = model(batch.tokens_BxT, logits=False, **kw)
    hidden_BxSxE, tokens_BxS = out.hidden_BxTxE[:, first:], batch.tokens_BxT[:, first:]
    if logit_chunk is None:
        logp, entropy = rl.next_token_log_probs(model.unembed(hidden_BxSxE), tokens_BxS)
    else:
        logp, entropy = rl.chunked_next_token_log_probs(
            hidden_BxSxE, tokens_BxS, model.unembed, logit_chunk
        )
    before = ((0, 0), (first, 0))
    return jnp.pad(logp, before), jnp.pad(entropy, before), out.attn_BxTxS


def credit_inputs(
    batch: Batch, attn_BxTxT=None, logp_BxT=None, entropy_BxT=None, rng=None
) -> credit_lib.CreditInputs:
    """The batch's masks and tokens with the signals a credit variant may read, all under
    stop_gradient: credit never receives gradient."""
    frozen = lambda x: None if x is None else jax.lax.stop_gradient(x)  # noqa: E731
    return credit_lib.CreditInputs(
        prompt_mask_BxT=batch.prompt_mask_BxT,
        response_mask_BxT=batch.response_mask_BxT,
        answer_mask_BxT=batch.answer_mask_BxT,
        attn_BxTxT=frozen(attn_BxTxT),
        log_probs_BxT=frozen(logp_BxT),
        entropy_BxT=frozen(entropy_BxT),
        tokens_BxT=batch.tokens_BxT,
        rng=rng,
        labels_BxT=batch.labels_BxT,
    )


def credit_weights(batch: Batch, cfg: StepConfig, logp_BxT, entropy_BxT, attn_BxTxT, rng):
    """gamma_BxT of the configured credit variant."""
    inputs = credit_inputs(batch, attn_BxTxT, logp_BxT, entropy_BxT, rng)
    return credit_lib.compute(inputs, cfg.credit)


def _capture_spec(cfg: StepConfig, batch: Batch) -> CaptureSpec:
    needs_attn = "attn_BxTxT" in credit_lib.get(cfg.credit.name).needs
    return cfg.capture if needs_attn and batch.gamma_BxT is None else NONE


def batch_shards(mesh: jax.sharding.Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def kernel_mesh(cfg: StepConfig, mesh: jax.sharding.Mesh | None):
    """The mesh as tracing context for a kernel that must see its own rows only (splash attention
    runs under `jax.shard_map` on it); no context otherwise."""
    if mesh is None or cfg.attention not in SPLASH:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def _check_labels(cfg: StepConfig, batch: Batch) -> None:
    """A credit variant that reads labels needs them in the batch (unless gamma is given)."""
    if needs_labels(cfg) and batch.labels_BxT is None and batch.gamma_BxT is None:
        raise ValueError(
            f"credit variant {cfg.credit.name!r} reads ground-truth labels, but the batch has "
            "no labels_BxT: the task must provide `labels(prompt, response)` and the rollout "
            "must fill them (`rollout.rollout_batch(..., labels=True)`; the RL loop does so)"
        )


def check_credit_passes(cfg: StepConfig, batch: Batch, n: int) -> None:
    """A batch-level credit variant needs the whole batch in one pass, or gamma given; a variant
    that reads labels needs them."""
    _check_labels(cfg, batch)
    variant = credit_lib.get(cfg.credit.name)
    fused = batch.gamma_BxT is None and cfg.credit_pass == "fused"
    if n > 1 and fused and not variant.per_sequence:
        raise ValueError(
            f"credit variant {cfg.credit.name!r} ranks across the whole batch, so it cannot be "
            f"computed one micro-batch at a time: use StepConfig.micro_batch None, or compute "
            f"gamma first with `prepare` (loop: epochs or minibatches > 1)"
        )


def _credit_metrics(gamma_BxT, batch: Batch, entropy_BxT):
    response_BxT = batch.response_mask_BxT
    mean = lambda x: masked.mean(x, response_BxT)  # noqa: E731
    position_BxT = jnp.cumsum(response_BxT, axis=-1).astype(jnp.float32)

    def corr(x_BxT, y_BxT):
        xc, yc = x_BxT - mean(x_BxT), y_BxT - mean(y_BxT)
        return mean(xc * yc) / jnp.sqrt(mean(xc * xc) * mean(yc * yc) + 1e-12)

    has_response_B = jnp.any(response_BxT, -1)
    no_answer_B = has_response_B & ~jnp.any(batch.answer_mask_BxT & response_BxT, -1)
    return {
        "credit/gamma_mean": mean(gamma_BxT),
        "credit/selected_fraction": mean((gamma_BxT > 1.0).astype(jnp.float32)),
        "credit/no_answer_fraction": masked.mean(no_answer_B, has_response_B),
        "credit/corr_entropy": corr(gamma_BxT, entropy_BxT),
        "credit/corr_position": corr(gamma_BxT, position_BxT),
        "entropy": mean(entropy_BxT),
    }


def batch_grads(
    graphdef,
    params: nnx.State,
    batch: Batch,
    advantages_B,
    cfg: StepConfig,
    credit_rng,
    mesh: jax.sharding.Mesh | None = None,
):
    """Gradient of the whole batch's policy loss, and each token's (log-prob, entropy, gamma).

    With `cfg.micro_batch` the batch goes through the model in passes of that many rows per
    device (`microbatch`), gradients summed: the loss of every pass is its tokens' share of the
    whole batch's aggregation (`rl.token_weights`), so the sum is the one-pass gradient. Credit
    is computed per pass (it is per sequence); a `random` variant then draws per pass, a
    different draw of the same distribution. `mesh` places the passes' rows.

    With `cfg.credit_pass` "separate", gamma comes from a gradient-free forward first
    (`forward_credit`) and the training forward captures nothing."""
    if cfg.credit_pass == "separate" and batch.gamma_BxT is None:
        _, _, gamma_BxT = forward_credit(graphdef, params, batch, cfg, credit_rng, mesh)
        batch = dataclasses.replace(batch, gamma_BxT=gamma_BxT)
    spec = _capture_spec(cfg, batch)
    shards = batch_shards(mesh)
    n = microbatch.passes(batch.tokens_BxT.shape[0], cfg.micro_batch, shards)
    check_credit_passes(cfg, batch, n)
    weights_BxT = rl.token_weights(batch.response_mask_BxT, cfg.loss) if n > 1 else None

    def loss_fn(params, part):
        (part_batch, adv_B, weights), k = part
        model = policy_model(graphdef, params, cfg)
        with kernel_mesh(cfg, mesh):
            logp, entropy, attn = sequence_log_probs(
                model, part_batch, spec, cfg.remat, cfg.logit_chunk, cfg.scan_layers, cfg.attention
            )
        gamma = part_batch.gamma_BxT
        if gamma is None:
            key = credit_rng if n == 1 else jax.random.fold_in(credit_rng, k)
            gamma = credit_weights(part_batch, cfg, logp, entropy, attn, key)
        loss, _ = rl.policy_loss(
            logp,
            part_batch.old_log_probs_BxT,
            adv_B,
            gamma,
            part_batch.response_mask_BxT,
            cfg.loss,
            part_batch.ref_log_probs_BxT,
            weights,
        )
        return loss, (logp, entropy, gamma)

    parts = (microbatch.split((batch, advantages_B, weights_BxT), n, shards, mesh), jnp.arange(n))
    _, grads, aux = microbatch.grads(loss_fn, params, parts, n)
    return grads, jax.lax.stop_gradient(microbatch.merge(aux, shards, mesh))


def train_step(
    graphdef,
    state: TrainState,
    batch: Batch,
    cfg: StepConfig,
    mesh: jax.sharding.Mesh | None = None,
):
    """One policy-gradient update (`batch_grads`, then AdamW); the step is skipped (and
    counted) if the rewards, the loss, the gradients, or the new parameters and optimiser state
    hold a non-finite value, so no non-finite value ever enters the state."""
    rng, credit_rng = jax.random.split(state.rng)
    advantages_B = rl.group_advantages(
        batch.rewards_B, cfg.group_size, cfg.loss.scale_advantages, cfg.loss.std_eps
    )
    grads, (logp, entropy, gamma) = batch_grads(
        graphdef, state.params, batch, advantages_B, cfg, credit_rng, mesh
    )
    # The loss and its metrics over the whole batch, from the passes' log-probs.
    loss, metrics = rl.policy_loss(
        logp,
        batch.old_log_probs_BxT,
        advantages_B,
        gamma,
        batch.response_mask_BxT,
        cfg.loss,
        batch.ref_log_probs_BxT,
    )
    metrics = {**metrics, **_credit_metrics(gamma, batch, entropy)}
    updates, opt_state = optimizer(cfg.optim).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    # Where a non-finite value would come from, in the order it would spread: each is logged
    # (`nonfinite/*`), and any of them skips the step. The update is checked through one norm:
    # with finite gradients (clipped before Adam) Adam's moments stay finite, so a non-finite
    # new parameter can only come from a non-finite update (a learning rate gone wrong). Testing
    # every new parameter and moment instead made XLA's fusion pass superlinear in the layer
    # count (12 small layers: 115 s of compile against 16 s; a Qwen3-4B step did not finish).
    checks = {
        "rewards": jnp.all(jnp.isfinite(batch.rewards_B)),
        "loss": jnp.isfinite(loss),
        "grads": jnp.isfinite(grad_norm),
        "update": jnp.isfinite(optax.tree.norm(updates)),
    }
    finite = functools.reduce(jnp.logical_and, checks.values())
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new_state = TrainState(
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        step=state.step + finite.astype(jnp.int32),
        rng=rng,
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
    )
    metrics = {
        **metrics,
        "grad_norm": grad_norm,
        "advantage_abs_mean": jnp.mean(jnp.abs(advantages_B)),
        "reward_mean": jnp.mean(batch.rewards_B),
        "skipped_nonfinite": 1.0 - finite,
        **{f"nonfinite/{name}": 1.0 - ok for name, ok in checks.items()},
    }
    return new_state, metrics


def forward_credit(
    graphdef,
    params: nnx.State,
    batch: Batch,
    cfg: StepConfig,
    credit_rng,
    mesh: jax.sharding.Mesh | None = None,
):
    """(log-probs, entropies, gamma) of every token from a gradient-free forward pass, in
    `cfg.micro_batch` passes; a batch-level credit variant is computed after the passes from
    their log-probs and entropies (so it may not read attention with micro-batches)."""
    _check_labels(cfg, dataclasses.replace(batch, gamma_BxT=None))
    model = policy_model(graphdef, params, cfg)
    spec = cfg.capture if "attn_BxTxT" in credit_lib.get(cfg.credit.name).needs else NONE
    shards = batch_shards(mesh)
    n = microbatch.passes(batch.tokens_BxT.shape[0], cfg.micro_batch, shards)
    per_pass = n == 1 or credit_lib.get(cfg.credit.name).per_sequence
    if not per_pass and spec != NONE:
        raise ValueError(
            f"credit variant {cfg.credit.name!r} ranks across the batch and reads attention: "
            "it needs StepConfig.micro_batch None"
        )

    def one_pass(part):
        part_batch, k = part
        with kernel_mesh(cfg, mesh):
            logp, entropy, attn = sequence_log_probs(
                model, part_batch, spec, "none", cfg.logit_chunk, cfg.scan_layers, cfg.attention
            )
        key = credit_rng if n == 1 else jax.random.fold_in(credit_rng, k)
        gamma = credit_weights(part_batch, cfg, logp, entropy, attn, key) if per_pass else logp
        return logp, entropy, gamma

    parts = (microbatch.split(batch, n, shards, mesh), jnp.arange(n))
    logp, entropy, gamma = microbatch.merge(microbatch.forward(one_pass, parts, n), shards, mesh)
    if not per_pass:
        gamma = credit_weights(batch, cfg, logp, entropy, None, credit_rng)
    return jax.lax.stop_gradient((logp, entropy, gamma))


def prepare(
    graphdef,
    state: TrainState,
    batch: Batch,
    cfg: StepConfig,
    mesh: jax.sharding.Mesh | None = None,
) -> Batch:
    """Old log-probs and credit from the pre-update policy, computed once per rollout batch, for
    several optimisation epochs over it (each epoch then passes this batch to `train_step`)."""
    credit_rng = jax.random.split(state.rng)[1]  # the key the fused step would use
    logp, _, gamma = forward_credit(graphdef, state.params, batch, cfg, credit_rng, mesh)
    return dataclasses.replace(
        batch, old_log_probs_BxT=jnp.where(batch.response_mask_BxT, logp, 0.0), gamma_BxT=gamma
    )
