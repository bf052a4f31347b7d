"""ftjax's clipped-surrogate losses equal TRL GRPOTrainer's on the same per-token inputs.

TRL has no loss function to call: the loss is inline in `GRPOTrainer._compute_loss(model,
inputs)`. The smallest trainer-free path to it is that unbound method called on a stub which
carries the attributes `GRPOTrainer.__init__` would copy from a real `GRPOConfig` (and those
the HF Trainer sets in its loop), and whose `_get_per_token_logps_and_entropies` hands back the
test's log-probs instead of running a model. Everything from the log-probs to the loss is then
TRL's own code, gradients included (torch autograd through it).

Mapping (TRL `loss_type` -> ftjax `LossConfig.aggregation`):
  grpo -> seq-mean-token-mean; bnpo -> token-mean (one micro-batch); dapo -> token-mean (also
  across micro-batches: both normalise by the whole generation batch's token count);
  dr_grpo -> constant with max_tokens = max_completion_length.
Known differences, kept out of the compared inputs: TRL's seq mean counts an all-masked row as
0 where ftjax leaves it out (TRL never has one: EOS is always a completion token); with a KL
term TRL by default multiplies k3 by the ratio (`use_bias_correction_kl`), ftjax does not, so
the KL cases switch that off.

Needs trl (the `bench` extra, not the test extra): skipped where it is not installed.
"""

from __future__ import annotations

import collections
import functools
import types

import jax
import numpy as np
import pytest

from ftjax import rl

trl = pytest.importorskip("trl")
torch = pytest.importorskip("torch")

# GRPOConfig's own default still sets the deprecated transformers name; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated")

AGGREGATION = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "dr_grpo": "constant",
}
MAX_COMPLETION = 9  # TRL's max_completion_length = ftjax's max_tokens; the inputs' T is 7
TOLERANCE = {np.float64: 1e-6, np.float32: 1e-5}


@functools.cache
def grpo_config(loss_type: str, clip_low: float, clip_high: float, beta: float, steps: int):
    return trl.GRPOConfig(
        output_dir="unused",
        use_cpu=True,
        report_to="none",
        loss_type=loss_type,
        epsilon=clip_low,
        epsilon_high=clip_high,
        beta=beta,
        use_bias_correction_kl=False,
        max_completion_length=MAX_COMPLETION,
        per_device_train_batch_size=4,
        num_generations=2,
        gradient_accumulation_steps=steps,
        steps_per_generation=steps,
    )


def trl_loss(args, inputs: dict, logp_BxT: np.ndarray, accumulation_steps: int = 1):
    """TRL's loss and its gradient w.r.t. the per-token log-probs."""
    logp = torch.tensor(logp_BxT, requires_grad=True)

    def identity(x, **_):  # one process: nothing to gather or reduce
        return x

    stub = types.SimpleNamespace(
        args=args,
        loss_type=args.loss_type,
        epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high,
        beta=args.beta,
        max_completion_length=args.max_completion_length,
        top_entropy_quantile=args.top_entropy_quantile,
        off_policy_mask_threshold=args.off_policy_mask_threshold,
        importance_sampling_level=args.importance_sampling_level,
        use_vllm=False,
        vllm_importance_sampling_correction=args.vllm_importance_sampling_correction,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": collections.defaultdict(list)},
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=accumulation_steps,
        accelerator=types.SimpleNamespace(
            num_processes=1, gather=identity, gather_for_metrics=identity, reduce=identity
        ),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
    )
    tensors = {k: torch.tensor(v) for k, v in inputs.items()}
    B, T = logp_BxT.shape
    tensors |= {
        "prompt_ids": torch.zeros((B, 1), dtype=torch.long),
        "prompt_mask": torch.ones((B, 1), dtype=torch.long),
        "completion_ids": torch.zeros((B, T), dtype=torch.long),
    }
    loss = trl.GRPOTrainer._compute_loss(stub, None, tensors)
    loss.backward()
    return loss.item(), logp.grad.numpy()


def ftjax_loss(
    cfg: rl.LossConfig,
    logp_BxT,
    old_BxT,
    adv_B,
    gamma_BxT,
    mask_BxT,
    ref_BxT=None,
    weights_BxT=None,
):
    def loss(logp):
        value, _ = rl.policy_loss(
            logp, old_BxT, adv_B, gamma_BxT, mask_BxT, cfg, ref_BxT, weights_BxT
        )
        return value

    value, grad = jax.value_and_grad(loss)(logp_BxT)
    return float(value), np.asarray(grad)


def random_inputs(seed: int, dtype, B: int = 8, T: int = 7):
    """Log-probs, old ones within ~ +-0.4 (so both clip sides are hit), signed advantages, ref
    log-probs, a positive token credit, and right-padded masks of 1..T tokens."""
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.05, 4.0, (B, T))
    lengths = rng.integers(1, T + 1, B)
    lengths[0] = T
    return {
        "logp": logp.astype(dtype),
        "old": (logp + rng.normal(0.0, 0.25, (B, T))).astype(dtype),
        "ref": (logp + rng.normal(0.0, 0.5, (B, T))).astype(dtype),
        "adv": rng.normal(size=B).astype(dtype),
        "gamma": rng.uniform(0.0, 2.0, (B, T)).astype(dtype),
        "mask": (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64),
    }


def check(ours, theirs, dtype):
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(ours[0], theirs[0], rtol=tol, atol=tol)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=tol, atol=tol)


@pytest.fixture(params=[np.float64, np.float32], ids=["float64", "float32"])
def dtype(request):
    with jax.enable_x64(request.param == np.float64):
        yield request.param


@pytest.mark.parametrize("loss_type", sorted(AGGREGATION))
@pytest.mark.parametrize(("clip_low", "clip_high"), [(0.2, 0.2), (0.2, 0.28)])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradient_equal_trl(loss_type, clip_low, clip_high, beta, dtype):
    x = random_inputs(0, dtype)
    cfg = rl.LossConfig(
        clip_low=clip_low,
        clip_high=clip_high,
        aggregation=AGGREGATION[loss_type],
        max_tokens=MAX_COMPLETION,
        kl_coef=beta,
        kl_estimator="k3",
    )
    ours = ftjax_loss(
        cfg, x["logp"], x["old"], x["adv"], x["mask"].astype(dtype), x["mask"], x["ref"]
    )
    inputs = {
        "old_per_token_logps": x["old"],
        "advantages": x["adv"],
        "completion_mask": x["mask"],
        "ref_per_token_logps": x["ref"],
        "num_items_in_batch": x["mask"].sum(),
    }
    args = grpo_config(loss_type, clip_low, clip_high, beta, 1)
    theirs = trl_loss(args, inputs, x["logp"])
    check(ours, theirs, dtype)
    ratio = np.exp(x["logp"] - x["old"])[x["mask"] == 1]
    assert (ratio < 1 - clip_low).any() and (ratio > 1 + clip_high).any()  # both clips exercised


@pytest.mark.parametrize("loss_type", sorted(AGGREGATION))
def test_token_credit_equals_trl_token_level_advantages(loss_type, dtype):
    """ftjax's gamma_BxT * A_B is what TRL takes as (B, T) advantages."""
    x = random_inputs(1, dtype)
    cfg = rl.LossConfig(aggregation=AGGREGATION[loss_type], max_tokens=MAX_COMPLETION)
    ours = ftjax_loss(cfg, x["logp"], x["old"], x["adv"], x["gamma"], x["mask"])
    inputs = {
        "old_per_token_logps": x["old"],
        "advantages": x["gamma"] * x["adv"][:, None],
        "completion_mask": x["mask"],
        "num_items_in_batch": x["mask"].sum(),
    }
    check(ours, trl_loss(grpo_config(loss_type, 0.2, 0.2, 0.0, 1), inputs, x["logp"]), dtype)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_equal_trl_gradient_accumulation(loss_type, dtype):
    """ftjax's micro-batch shares (`token_weights` of the whole batch) equal TRL's loss over the
    same micro-batches with gradient accumulation, one micro-batch per accumulation step. (bnpo
    normalises each micro-batch by its own tokens, which ftjax has no mode for.)"""
    steps, x = 2, random_inputs(2, dtype)
    cfg = rl.LossConfig(
        clip_high=0.28, aggregation=AGGREGATION[loss_type], max_tokens=MAX_COMPLETION
    )
    weights = np.asarray(rl.token_weights(x["mask"], cfg))
    args = grpo_config(loss_type, 0.2, 0.28, 0.0, steps)
    for rows in np.split(np.arange(len(x["adv"])), steps):
        part = {k: v[rows] for k, v in x.items()}
        ours = ftjax_loss(
            cfg,
            part["logp"],
            part["old"],
            part["adv"],
            part["mask"].astype(dtype),
            part["mask"],
            weights_BxT=weights[rows],
        )
        inputs = {
            "old_per_token_logps": part["old"],
            "advantages": part["adv"],
            "completion_mask": part["mask"],
            "num_items_in_batch": x["mask"].sum(),
        }
        check(ours, trl_loss(args, inputs, part["logp"], accumulation_steps=steps), dtype)
