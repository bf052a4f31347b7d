"""Supervised warm-up on solver traces, so RL starts from a policy that is right sometimes.

Dims: B examples, P prompt slots (left-padded, as the RL loop lays prompts out), N response slots
(right-padded), T = P + N, V vocab.

The loss is the mean next-token cross-entropy over response tokens (the solver's trace and its
<eos>); prompt tokens are context only.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import numpy as np
import optax
from flax import nnx

from ftjax import masked, rl, train
from ftjax.rollout import left_pad


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    steps: int = 500  # supervised steps on the task's solver traces
    batch_size: int = 64  # demonstrations per step
    lr: float = 3e-3  # peak of the warm-up then cosine-decay schedule
    warmup_steps: int = 50  # linear ramp to lr
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # gradients clipped to this global norm

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SFTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(
                f"SFTConfig.warmup_steps must be in [0, steps], got {self.warmup_steps}"
            )
        if not self.lr > 0:
            raise ValueError(f"SFTConfig.lr must be > 0, got {self.lr}")


def pack(pairs, prompt_slots: int, response_slots: int, pad_id: int):
    """(prompt, response) id lists -> tokens_BxT, valid_BxT, target_BxT (response positions)."""
    long = [i for i, (_, r) in enumerate(pairs) if len(r) > response_slots]
    if long:
        raise ValueError(
            f"response {long[0]} has {len(pairs[long[0]][1])} tokens, over the "
            f"{response_slots} response slots"
        )
    prompt_BxP, prompt_valid_BxP = left_pad([p for p, _ in pairs], prompt_slots, pad_id)
    response_BxN = np.full((len(pairs), response_slots), pad_id, np.int32)
    response_valid_BxN = np.zeros((len(pairs), response_slots), bool)
    for row, (_, response) in enumerate(pairs):
        response_BxN[row, : len(response)] = response
        response_valid_BxN[row, : len(response)] = True
    tokens_BxT = np.concatenate([prompt_BxP, response_BxN], axis=1)
    valid_BxT = np.concatenate([prompt_valid_BxP, response_valid_BxN], axis=1)
    target_BxT = np.concatenate([np.zeros_like(prompt_valid_BxP), response_valid_BxN], axis=1)
    return tokens_BxT, valid_BxT, target_BxT


def loss(model, tokens_BxT, valid_BxT, target_BxT):
    """Mean cross-entropy of the target tokens given everything before them."""
    logits_BxTxV = model(tokens_BxT, valid_BxT=valid_BxT).logits_BxTxV
    logp_BxT, _ = rl.next_token_log_probs(logits_BxTxV, tokens_BxT)
    # Column 0 predicts nothing (and is never a target): leave it out of the sum.
    return -masked.mean(logp_BxT[:, 1:], target_BxT[:, 1:])


def optimizer(cfg: SFTConfig) -> optax.GradientTransformation:
    """The RL step's optimizer (clipping, AdamW) on a warm-up then cosine-decay schedule."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, cfg.steps)
    adamw = train.OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
    return train.optimizer(adamw, schedule)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"), donate_argnums=(1, 2))
def _step(graphdef, params, opt_state, tokens_BxT, valid_BxT, target_BxT, cfg: SFTConfig):
    def loss_fn(p):
        return loss(nnx.merge(graphdef, p), tokens_BxT, valid_BxT, target_BxT)

    value, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer(cfg).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value


def warm_up(
    model: nnx.Module,
    demonstrations: Callable[[int, int], list],
    cfg: SFTConfig,
    prompt_slots: int,
    response_slots: int,
    pad_id: int,
    on_step: Callable[[int, float], None] | None = None,
    probe: tuple[int, Callable[[int, nnx.Module], None]] | None = None,
) -> nnx.Module:
    """Train `model` (in place and returned) on `demonstrations(start, count)`, a stream of
    (prompt ids, response ids) pairs; batch s is demonstrations(s * batch_size, batch_size).
    `probe=(every, fn)` calls fn(steps done, model) with the model as trained so far after every
    `every` steps (a learning curve of anything the model can be asked)."""
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = optimizer(cfg).init(params)
    for step in range(cfg.steps):
        pairs = demonstrations(step * cfg.batch_size, cfg.batch_size)
        arrays = pack(pairs, prompt_slots, response_slots, pad_id)
        params, opt_state, value = _step(graphdef, params, opt_state, *arrays, cfg=cfg)
        if on_step is not None:
            on_step(step, value)
        if probe is not None and (step + 1) % probe[0] == 0:
            nnx.update(model, params)
            probe[1](step + 1, model)
    nnx.update(model, params)
    return model
