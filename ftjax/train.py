"""Train state and the RL train step: capture -> credit -> loss -> grads -> update, one jit.

Dims: B sequences (prompt + response, prompt left-padded), T tokens, V vocab.

`train_step(state, batch) -> (state, metrics)` is pure; `make_train_step` jits it once with
explicit in/out shardings on the mesh and donated state. The captured attention comes from the
same forward pass that computes the log-probs for the loss (no extra pass); it is under
stop_gradient, so credit never receives gradient. With several optimisation epochs per rollout
batch, run `prepare` once (old log-probs and credit from the pre-update policy) and pass its
gamma in the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ftjax import checkpoint, masked, microbatch, rl, sharding
from ftjax import credit as credit_lib
from ftjax.capture import NONE, CaptureSpec
from ftjax.checkpoint import Checkpointer
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
    # jax.nn.dot_product_attention's implementation for the layers that do not capture: "xla"
    # (every backend) or "cudnn" (cuDNN flash attention: NVIDIA GPUs, compute_dtype bfloat16)
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
    declares "labels_BxT" (`needs_labels`)."""

    tokens_BxT: jax.Array
    prompt_mask_BxT: jax.Array
    response_mask_BxT: jax.Array
    answer_mask_BxT: jax.Array
    rewards_B: jax.Array
    old_log_probs_BxT: jax.Array
    ref_log_probs_BxT: jax.Array | None = None
    gamma_BxT: jax.Array | None = None
    labels_BxT: jax.Array | None = None


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


def init_state(model: nnx.Module, cfg: StepConfig, rng) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, params = nnx.split(model, nnx.Param)
    state = TrainState(
        params=params,
        opt_state=optimizer(cfg.optim).init(params),
        step=jnp.zeros((), jnp.int32),
        rng=rng,
        nonfinite_streak=jnp.zeros((), jnp.int32),
    )
    return graphdef, state


def _traced_init(make_model, cfg: StepConfig):
    """fn(rng) -> the TrainState of `init_state(make_model(nnx.Rngs(rng)), cfg, rng)`, for tracing
    under jit / eval_shape; the graphdef (static) lands in the returned list when it is traced."""
    graphdefs = []

    def init(rng) -> TrainState:
        graphdef, state = init_state(make_model(nnx.Rngs(rng)), cfg, rng)
        graphdefs.append(graphdef)
        return state

    return init, graphdefs


def abstract_state(
    make_model, cfg: StepConfig, mesh: jax.sharding.Mesh
) -> tuple[nnx.GraphDef, TrainState]:
    """(graphdef, the train state as `jax.ShapeDtypeStruct`s carrying their `state_shardings`):
    what `init_state_sharded` would make, without computing or allocating anything, to plan
    (`jit(...).lower(state, batch)`) on any mesh. make_model(rngs) -> nnx.Module."""
    init, graphdefs = _traced_init(make_model, cfg)
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
    placed = state_shardings(shapes, mesh)
    like = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    return graphdefs[0], jax.tree.map(like, shapes, placed)


def init_state_sharded(
    make_model, cfg: StepConfig, rng, mesh: jax.sharding.Mesh
) -> tuple[nnx.GraphDef, TrainState]:
    """`init_state(make_model(nnx.Rngs(rng)), cfg, rng)` created already sharded: one jit whose
    outputs have `state_shardings`, so each device computes and holds only its shard of the
    parameters and Adam moments (a whole float32 state of an 8B model would not fit on one
    device). Same values as the unsharded init (jax's random bits do not depend on sharding)."""
    graphdef, like = abstract_state(make_model, cfg, mesh)
    init, _ = _traced_init(make_model, cfg)
    placed = jax.tree.map(lambda x: x.sharding, like)
    return graphdef, jax.jit(init, out_shardings=placed)(rng)


def init_state_placed(
    model: nnx.Module, cfg: StepConfig, rng, mesh: jax.sharding.Mesh
) -> tuple[nnx.GraphDef, TrainState]:
    """`init_state(model, cfg, rng)` for a model that already has its weights (a loaded
    checkpoint), made sharded: the parameters are placed FSDP-style first (nothing moves when
    the loader placed them, `sharding.param_sharding_fn`), then one jit whose outputs have
    `state_shardings` makes the Adam moments shard by shard and copies the parameters (the
    train step donates its state; the caller's model stays usable). No device ever holds the
    whole optimizer state."""
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.device_put(params, sharding.tree_shardings(params, mesh))

    def build(params, rng) -> TrainState:
        state = init_state(nnx.merge(graphdef, params), cfg, rng)[1]
        return dataclasses.replace(state, params=jax.tree.map(jnp.copy, state.params))

    placed = state_shardings(jax.eval_shape(build, params, rng), mesh)
    return graphdef, jax.jit(build, out_shardings=placed)(params, rng)


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
    `remat`, `scan_layers` and `attention` are the model's (`Transformer.__call__`)."""
    valid_BxT = batch.prompt_mask_BxT | batch.response_mask_BxT
    kw = dict(
        valid_BxT=valid_BxT,
        capture=spec,
        remat=remat,
        scan_layers=scan_layers,
        attention=attention,
    )
    if logit_chunk is None:
        out = model(batch.tokens_BxT, **kw)
        logp, entropy = rl.next_token_log_probs(out.logits_BxTxV, batch.tokens_BxT)
    else:
        out = model(batch.tokens_BxT, logits=False, **kw)
        logp, entropy = rl.chunked_next_token_log_probs(
            out.hidden_BxTxE, batch.tokens_BxT, model.unembed, logit_chunk
        )
    return logp, entropy, out.attn_BxTxS


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


def _batch_shards(mesh: jax.sharding.Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def _check_labels(cfg: StepConfig, batch: Batch) -> None:
    """A credit variant that reads labels needs them in the batch (unless gamma is given)."""
    if needs_labels(cfg) and batch.labels_BxT is None and batch.gamma_BxT is None:
        raise ValueError(
            f"credit variant {cfg.credit.name!r} reads ground-truth labels, but the batch has "
            "no labels_BxT: the task must provide `labels(prompt, response)` and the rollout "
            "must fill them (`rollout.rollout_batch(..., labels=True)`; the RL loop does so)"
        )


def _check_credit_passes(cfg: StepConfig, batch: Batch, n: int) -> None:
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
    shards = _batch_shards(mesh)
    n = microbatch.passes(batch.tokens_BxT.shape[0], cfg.micro_batch, shards)
    _check_credit_passes(cfg, batch, n)
    weights_BxT = rl.token_weights(batch.response_mask_BxT, cfg.loss) if n > 1 else None

    def loss_fn(params, part):
        (part_batch, adv_B, weights), k = part
        model = policy_model(graphdef, params, cfg)
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
    shards = _batch_shards(mesh)
    n = microbatch.passes(batch.tokens_BxT.shape[0], cfg.micro_batch, shards)
    per_pass = n == 1 or credit_lib.get(cfg.credit.name).per_sequence
    if not per_pass and spec != NONE:
        raise ValueError(
            f"credit variant {cfg.credit.name!r} ranks across the batch and reads attention: "
            "it needs StepConfig.micro_batch None"
        )

    def one_pass(part):
        part_batch, k = part
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


def state_shardings(state: TrainState, mesh: jax.sharding.Mesh) -> TrainState:
    """Parameters and optimiser state FSDP-sharded, the scalars replicated."""
    return TrainState(
        params=sharding.tree_shardings(state.params, mesh),
        opt_state=sharding.tree_shardings(state.opt_state, mesh),
        step=sharding.replicated(mesh),
        rng=sharding.replicated(mesh),
        nonfinite_streak=sharding.replicated(mesh),
    )


def _batch_shardings(batch: Batch, mesh: jax.sharding.Mesh) -> Batch:
    return jax.tree.map(lambda _: sharding.batch_sharding(mesh), batch)


def make_train_step(
    graphdef, state: TrainState, batch: Batch, cfg: StepConfig, mesh: jax.sharding.Mesh
):
    """`train_step` jitted once for this mesh: state sharded FSDP-style and donated, batch over
    (data, fsdp), metrics replicated. Returns (step_fn, state placed on the mesh)."""
    sharding.check_batch(batch.tokens_BxT.shape[0], mesh)
    n = microbatch.passes(batch.tokens_BxT.shape[0], cfg.micro_batch, _batch_shards(mesh))
    _check_credit_passes(cfg, batch, n)
    placed = state_shardings(state, mesh)
    step_fn = jax.jit(
        functools.partial(train_step, graphdef, cfg=cfg, mesh=mesh),
        in_shardings=(placed, _batch_shardings(batch, mesh)),
        out_shardings=(placed, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    return step_fn, jax.device_put(state, placed)


def planned_bytes(step_fn, state: TrainState, batch: Batch) -> int:
    """Per-device bytes XLA plans for one step: arguments, outputs and temporaries, less what the
    donated state lets it reuse."""
    stats = step_fn.lower(state, batch).compile().memory_analysis()
    return int(
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


def device_memory_limit(mesh: jax.sharding.Mesh) -> int | None:
    """Bytes one device of the mesh can hold, where the backend says (GPU, TPU); None on CPU."""
    mine = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    stats = mine[0].memory_stats()  # only this process's own devices answer
    return None if not stats else stats.get("bytes_limit")


def check_fits(step_fn, state: TrainState, batch: Batch, mesh: jax.sharding.Mesh) -> None:
    """Refuse, before the first rollout, a step that cannot fit on the mesh's devices."""
    limit = device_memory_limit(mesh)
    if limit is None:
        return
    planned = planned_bytes(step_fn, state, batch)
    if planned > limit:
        raise ValueError(
            f"the train step plans {planned / 2**30:.2f} GiB per device, over the device's "
            f"{limit / 2**30:.2f} GiB: use fewer prompts per step or responses per prompt, "
            "shorter prompts or responses, more minibatches, or a larger fsdp axis"
        )


def make_prepare(graphdef, state: TrainState, batch: Batch, cfg: StepConfig, mesh):
    """`prepare` jitted for this mesh: fn(state, batch) -> batch with old log-probs and gamma
    (state read, not donated). `batch` gives shapes (without gamma)."""
    sharding.check_batch(batch.tokens_BxT.shape[0], mesh)
    microbatch.passes(batch.tokens_BxT.shape[0], cfg.micro_batch, _batch_shards(mesh))
    out = dataclasses.replace(batch, gamma_BxT=batch.old_log_probs_BxT)
    return jax.jit(
        functools.partial(prepare, graphdef, cfg=cfg, mesh=mesh),
        in_shardings=(state_shardings(state, mesh), _batch_shardings(batch, mesh)),
        out_shardings=_batch_shardings(out, mesh),
    )


def response_log_probs(
    graphdef,
    params: nnx.State,
    batch: Batch,
    cfg: StepConfig | None = None,
    mesh: jax.sharding.Mesh | None = None,
):
    """log p(token_t | tokens_<t) of the batch's response tokens under `params` (0 elsewhere),
    no capture, computed as the train step computes (dtype, micro-batch passes, logit chunks):
    the KL reference's log-probs."""
    cfg = StepConfig() if cfg is None else cfg
    model = policy_model(graphdef, params, cfg)
    shards = _batch_shards(mesh)
    n = microbatch.passes(batch.tokens_BxT.shape[0], cfg.micro_batch, shards)

    def one_pass(part):
        return sequence_log_probs(
            model, part, NONE, "none", cfg.logit_chunk, cfg.scan_layers, cfg.attention
        )[0]

    parts = microbatch.split(batch, n, shards, mesh)
    logp_BxT = microbatch.merge(microbatch.forward(one_pass, parts, n), shards, mesh)
    return jnp.where(batch.response_mask_BxT, logp_BxT, 0.0)


def make_reference(graphdef, params: nnx.State, batch: Batch, mesh, cfg: StepConfig | None = None):
    """The KL reference policy: a frozen copy of `params`, sharded like the policy's, and
    fn(batch) -> ref_log_probs_BxT jitted for this mesh, computed as the step `cfg` computes."""
    cfg = StepConfig() if cfg is None else cfg
    microbatch.passes(batch.tokens_BxT.shape[0], cfg.micro_batch, _batch_shards(mesh))
    placed = sharding.tree_shardings(params, mesh)
    frozen = jax.device_put(jax.tree.map(jnp.copy, params), placed)
    fn = jax.jit(
        functools.partial(response_log_probs, graphdef, cfg=cfg, mesh=mesh),
        in_shardings=(placed, _batch_shardings(batch, mesh)),
        out_shardings=sharding.batch_sharding(mesh),
    )
    return lambda batch: fn(frozen, batch)


def restore_policy(model: nnx.Module, checkpoint_dir) -> tuple[nnx.Module, int]:
    """(`model` with the parameters of the latest checkpoint in `checkpoint_dir`, its step). The
    checkpoint's record says what it holds: an RL run's whole train state (the optimiser's
    structure does not depend on its settings, so the default config describes it) or a
    warm-up's parameters alone."""
    checkpoint_dir = pathlib.Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise ValueError(f"no checkpoint directory {checkpoint_dir}")
    checkpoints = Checkpointer(checkpoint_dir, keep=1)
    try:
        if checkpoints.latest_step() is None:
            raise ValueError(f"no checkpoint in {checkpoint_dir}")
        meta = checkpoints.meta()
        kind = meta.get("kind")
        if kind == checkpoint.TRAIN_STATE:
            graphdef, like = init_state(model, StepConfig(), jax.random.PRNGKey(0))
            state, _ = checkpoints.restore(like)
            params = state.params
        elif kind == checkpoint.PARAMS:
            graphdef, like = nnx.split(model, nnx.Param)
            params, _ = checkpoints.restore(like)
        else:
            raise ValueError(
                f"checkpoint in {checkpoint_dir} records kind {kind!r}, not "
                f"{checkpoint.TRAIN_STATE!r} or {checkpoint.PARAMS!r} (written by an older ftjax?)"
            )
    finally:
        checkpoints.close()
    return nnx.merge(graphdef, params), int(meta["step"])
