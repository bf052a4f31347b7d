"""Tests for ftjax.rl against the float64 loop references in reference_rl, plus properties.

Dims: B sequences (N groups of G consecutive responses), T tokens, V vocabulary.
"""

from __future__ import annotations

import itertools
import math
import re

import chex
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
import reference_rl as ref

from ftjax.rl import (
    LossConfig,
    aggregate,
    group_advantages,
    kl_estimate,
    policy_loss,
    token_log_probs,
)

B, G, T = 8, 4, 7
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "constant")
# "low-zero" clips rho < 1 from below at 1 (clip_low = 0 is the tightest lower clip, not "off");
# "off" is the loosest setting validation allows: [1e-6, 1e6] never binds for |logp - old| < 2.
CLIPS = {
    "symmetric": (0.2, 0.2),
    "dapo": (0.2, 0.28),
    "low-zero": (0.0, 1e6),
    "off": (1.0 - 1e-6, 1e6),
}
KLS = (None, "k1", "k3")
KL_COEF = 0.05
# float32 compute vs float64 reference: each per-token term is exact to ~1e-7 relative, but the
# aggregate is a sum of ~50 mixed-sign terms that can partly cancel, so the error relative to the
# result can reach a few 1e-7 x (sum of |terms|) / |result|; 1e-5 relative plus 1e-6 absolute
# (terms are O(1)) covers that without hiding a wrong formula (those give O(1e-2) errors).
RTOL, ATOL = 1e-5, 1e-6


def make_inputs(seed: int, gamma_kind: str, n_rows: int = B):
    """Random rollout batch: a mask with ragged rows and one all-masked-out row."""
    rng = np.random.default_rng(seed)
    mask = rng.random((n_rows, T)) < 0.7
    mask[:, 0] = True
    mask[3] = False  # a response with no tokens (e.g. empty after truncation)
    mask[5, 4:] = False  # a short response
    old = rng.uniform(-3.0, -0.1, (n_rows, T))
    logp = old + rng.uniform(-0.6, 0.6, (n_rows, T))  # rho in ~[0.55, 1.8]: both clip sides hit
    ref_logp = old + rng.uniform(-0.5, 0.5, (n_rows, T))
    rewards = rng.integers(0, 3, n_rows).astype(np.float64)
    rewards[:G] = [1.0, 0.0, 2.0, 0.0]  # group 0 never has zero variance
    if gamma_kind == "discrete":
        gamma = np.where(rng.random((n_rows, T)) < 0.4, 1.5, 1.0)
    else:
        gamma = rng.uniform(0.5, 2.0, (n_rows, T))
    gamma = gamma * mask
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return dict(logp=f32(logp), old=f32(old), ref=f32(ref_logp), rewards=f32(rewards),
                gamma=f32(gamma), mask=mask)


def lib_loss(x, adv, gamma, cfg: LossConfig):
    return policy_loss(jnp.asarray(x["logp"]), jnp.asarray(x["old"]), adv, jnp.asarray(gamma),
                       jnp.asarray(x["mask"]), cfg, jnp.asarray(x["ref"]))


def ref_loss(x, adv, gamma, cfg: LossConfig):
    return ref.policy_loss(x["logp"], x["old"], adv, gamma, x["mask"], clip_low=cfg.clip_low,
                           clip_high=cfg.clip_high, aggregation=cfg.aggregation,
                           max_tokens=cfg.max_tokens, kl_coef=cfg.kl_coef,
                           kl_estimator=cfg.kl_estimator, ref_BxT=x["ref"])


def make_cfg(aggregation, clip, scale, kl, **kw) -> LossConfig:
    clip_low, clip_high = CLIPS[clip]
    return LossConfig(clip_low=clip_low, clip_high=clip_high, aggregation=aggregation,
                      scale_advantages=scale, kl_coef=0.0 if kl is None else KL_COEF,
                      kl_estimator=kl or "k3", **kw)


def assert_metrics_match(got, want):
    """Metric dicts with the same keys, scalar values close at the float32 tolerance."""
    chex.assert_rank(jax.tree.leaves(got), 0)
    chex.assert_trees_all_close(got, want, rtol=RTOL, atol=ATOL)


def assert_metrics_identical(*metrics):
    """Metric dicts with the same keys and bitwise equal, finite values."""
    chex.assert_tree_all_finite(metrics[0])  # assert_trees_all_equal lets NaN == NaN pass
    chex.assert_trees_all_equal(*metrics)


# ---------------------------------------------------------------- policy loss vs the reference


@pytest.mark.parametrize("kl", KLS)
@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_policy_loss_matches_reference(aggregation, clip, scale, kl):
    cfg = make_cfg(aggregation, clip, scale, kl)
    for seed, gamma_kind in [(0, "discrete"), (1, "continuous")]:
        x = make_inputs(seed, gamma_kind)
        adv_ref = ref.group_advantages(x["rewards"], G, scale, cfg.std_eps)
        adv = group_advantages(jnp.asarray(x["rewards"]), G, scale, cfg.std_eps)
        np.testing.assert_allclose(np.asarray(adv), adv_ref, rtol=RTOL, atol=ATOL)
        loss, metrics = lib_loss(x, adv, x["gamma"], cfg)
        want = ref_loss(x, adv_ref, x["gamma"], cfg)
        assert_metrics_match(metrics, want)
        assert float(loss) == float(metrics["loss"])


def test_reference_inputs_exercise_both_clip_sides():
    """Guards the test above against vacuity: the random inputs clip on both sides."""
    x = make_inputs(0, "discrete")
    adv = ref.group_advantages(x["rewards"], G, True, 1e-6)
    rho = np.exp(x["logp"].astype(np.float64) - x["old"])
    m = x["mask"]
    assert np.any(m & (rho > 1.2) & (adv[:, None] > 0))
    assert np.any(m & (rho < 0.8) & (adv[:, None] < 0))
    assert 0.0 < ref_loss(x, adv, x["gamma"], make_cfg("token-mean", "symmetric", True, None))[
        "clip_fraction"] < 1.0


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_max_tokens_setting_matches_reference(aggregation):
    cfg = make_cfg(aggregation, "dapo", True, "k3", max_tokens=11)
    x = make_inputs(2, "continuous")
    adv = ref.group_advantages(x["rewards"], G, True, cfg.std_eps)
    _, metrics = lib_loss(x, jnp.asarray(adv, jnp.float32), x["gamma"], cfg)
    assert_metrics_match(metrics, ref_loss(x, adv, x["gamma"], cfg))


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_aggregate_matches_reference_with_bool_and_float_masks(aggregation):
    rng = np.random.default_rng(3)
    values = rng.normal(size=(B, T)).astype(np.float32)
    mask = rng.random((B, T)) < 0.5
    mask[2] = False
    cfg = LossConfig(aggregation=aggregation)
    want = ref.aggregate(values, mask, aggregation)
    for m in (mask, mask.astype(np.float32), mask.astype(np.int32)):
        got = aggregate(jnp.asarray(values), jnp.asarray(m), cfg)
        np.testing.assert_allclose(float(got), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_fully_masked_batch_gives_zero_not_nan(aggregation):
    x = make_inputs(4, "discrete")
    x["mask"] = np.zeros_like(x["mask"])
    cfg = make_cfg(aggregation, "dapo", True, "k3")
    adv = group_advantages(jnp.asarray(x["rewards"]), G)
    _, metrics = lib_loss(x, adv, x["gamma"], cfg)
    for key, value in metrics.items():
        assert float(value) == 0.0, key


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_masked_out_tokens_do_not_matter(aggregation):
    """Padding invariance: any finite values at masked-out positions leave everything unchanged."""
    cfg = make_cfg(aggregation, "dapo", True, "k3")
    x = make_inputs(5, "discrete")
    adv = group_advantages(jnp.asarray(x["rewards"]), G)
    _, base = lib_loss(x, adv, x["gamma"], cfg)
    rng = np.random.default_rng(6)
    y = dict(x)
    pad = ~x["mask"]
    for key in ("logp", "old", "ref"):
        y[key] = np.where(pad, rng.uniform(-20.0, 0.0, (B, T)), x[key]).astype(np.float32)
    gamma = np.where(pad, rng.uniform(0.0, 5.0, (B, T)), x["gamma"]).astype(np.float32)
    _, moved = lib_loss(y, adv, gamma, cfg)
    assert_metrics_identical(moved, base)


def test_policy_loss_jit_matches_eager():
    cfg = make_cfg("seq-mean-token-mean", "dapo", True, "k3")
    x = make_inputs(7, "continuous")
    adv = group_advantages(jnp.asarray(x["rewards"]), G)
    args = (jnp.asarray(x["logp"]), jnp.asarray(x["old"]), adv, jnp.asarray(x["gamma"]),
            jnp.asarray(x["mask"]))
    eager = policy_loss(*args, cfg, jnp.asarray(x["ref"]))[1]
    jitted = jax.jit(policy_loss, static_argnums=5)(*args, cfg, jnp.asarray(x["ref"]))[1]
    chex.assert_trees_all_close(jitted, eager, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- uniform credit is plain GRPO


@pytest.mark.parametrize("clip", ["symmetric", "dapo"])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_gamma_equal_to_mask_is_plain_grpo(aggregation, clip):
    cfg = make_cfg(aggregation, clip, True, "k1")
    x = make_inputs(8, "discrete")
    adv = group_advantages(jnp.asarray(x["rewards"]), G)
    mask = x["mask"]
    _, uniform = lib_loss(x, adv, mask, cfg)  # gamma = the response mask, bool as it comes
    _, uniform_f = lib_loss(x, adv, mask.astype(np.float32), cfg)
    _, ones = lib_loss(x, adv, np.ones((B, T), np.float32), cfg)
    # A~ = 1.0 * A is exact and masked-out tokens are multiplied by 0: bitwise equal.
    assert_metrics_identical(uniform, ones, uniform_f)
    # Against a reference that has no gamma anywhere (A~ = A), the float32 tolerance.
    no_gamma = ref_loss(x, np.asarray(adv, np.float64), None, cfg)
    assert_metrics_match(uniform, no_gamma)
    # The reference's own gamma path is exactly the no-gamma path when gamma = mask.
    assert ref_loss(x, np.asarray(adv, np.float64), mask.astype(np.float64), cfg) == no_gamma


# ---------------------------------------------------------------- gradients


def away_from_kinks(seed: int, clip_low: float, clip_high: float, margin: float = 0.05):
    """Inputs whose log-ratios stay >= margin from log(1 - clip_low) and log(1 + clip_high)."""
    x = make_inputs(seed, "continuous")
    log_ratio = (x["logp"] - x["old"]).astype(np.float64)
    for kink in (math.log(1.0 - clip_low), math.log(1.0 + clip_high)):
        near = np.abs(log_ratio - kink) < margin
        log_ratio = np.where(near, kink + np.sign(log_ratio - kink + 1e-12) * margin, log_ratio)
    x["logp"] = (x["old"] + log_ratio).astype(np.float32)
    return x


@pytest.mark.parametrize(
    "aggregation,kl", [("token-mean", None), ("seq-mean-token-mean", "k3"), ("constant", "k1")]
)
def test_check_grads_away_from_clip_kinks(aggregation, kl):
    cfg = make_cfg(aggregation, "dapo", True, kl)
    x = away_from_kinks(9, cfg.clip_low, cfg.clip_high)
    adv = group_advantages(jnp.asarray(x["rewards"]), G)
    old, ref_logp = jnp.asarray(x["old"]), jnp.asarray(x["ref"])
    gamma, mask = jnp.asarray(x["gamma"]), jnp.asarray(x["mask"])

    def f(logp):
        return policy_loss(logp, old, adv, gamma, mask, cfg, ref_logp)[0]

    # float32 finite differences: eps 1e-3 (perturbations up to ~3e-3 stay inside the 0.05
    # margin) keeps rounding noise well under check_grads' float32 tolerance of 2e-3.
    jax.test_util.check_grads(f, (jnp.asarray(x["logp"]),), order=1, modes=["rev"], eps=1e-3)


def pg_grad(x, adv, gamma, cfg):
    old, mask = jnp.asarray(x["old"]), jnp.asarray(x["mask"])

    def f(logp):
        return policy_loss(logp, old, adv, jnp.asarray(gamma), mask, cfg)[0]

    return np.asarray(jax.grad(f)(jnp.asarray(x["logp"])), np.float64)


@pytest.mark.parametrize("clip", ["symmetric", "dapo", "low-zero"])
def test_gradient_is_zero_exactly_where_clipped(clip):
    cfg = make_cfg("token-mean", clip, True, None)
    x = away_from_kinks(10, cfg.clip_low, cfg.clip_high)
    adv = group_advantages(jnp.asarray(x["rewards"]), G)
    a = np.asarray(adv, np.float64)[:, None]
    grad = pg_grad(x, adv, x["gamma"], cfg)
    rho = np.exp(x["logp"].astype(np.float64) - x["old"])
    mask = x["mask"]
    clipped = mask & (((rho > 1 + cfg.clip_high) & (a > 0)) | ((rho < 1 - cfg.clip_low) & (a < 0)))
    assert clipped.any()
    assert np.all(grad[clipped] == 0.0)
    assert np.all(grad[~mask] == 0.0)
    # Elsewhere d/dlogp of -rho A~ / count is -rho A~ / count (including rho beyond the clip range
    # on the side the min does not clip, e.g. rho > 1 + clip_high with A < 0).
    free = mask & ~clipped & (a != 0)
    assert free.any()
    want = -rho * x["gamma"] * a / mask.sum()
    np.testing.assert_allclose(grad[free], want[free], rtol=1e-5)


def test_gamma_scales_token_gradient_linearly():
    cfg = make_cfg("seq-mean-token-mean", "dapo", True, None)
    x = away_from_kinks(11, cfg.clip_low, cfg.clip_high)
    adv = group_advantages(jnp.asarray(x["rewards"]), G)
    mask = x["mask"]
    gamma = x["gamma"]
    ones = mask.astype(np.float32)
    discrete = np.where(np.random.default_rng(12).random((B, T)) < 0.5, 1.5, 1.0) * ones
    g_ones = pg_grad(x, adv, ones, cfg)
    g_disc = pg_grad(x, adv, discrete.astype(np.float32), cfg)
    np.testing.assert_allclose(g_disc, discrete * g_ones, rtol=1e-6, atol=0)
    assert np.any((discrete == 1.5) & (g_ones != 0))
    # A positive gamma never changes which side clips, so linearity holds for continuous gamma too.
    g_cont = pg_grad(x, adv, gamma, cfg)
    np.testing.assert_allclose(g_cont, gamma * g_ones, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- group advantages


@pytest.mark.parametrize(
    "rewards,group_size,scale,want",
    [
        ([1.0, 0.0, 0.0, 0.0], 4, False, [0.75, -0.25, -0.25, -0.25]),
        # var = (0.75^2 + 3 * 0.25^2) / 3 = 0.25 -> std 0.5
        ([1.0, 0.0, 0.0, 0.0], 4, True, [1.5, -0.5, -0.5, -0.5]),
        # std (ddof 1) of {0, 1} is sqrt(1/2)
        ([0.0, 1.0, 3.0, 3.0], 2, True, [-math.sqrt(0.5), math.sqrt(0.5), 0.0, 0.0]),
        # var = (1.5^2 + 0.5^2 + 0.5^2 + 1.5^2) / 3 = 5/3; second group has zero variance
        ([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0], 4, True,
         [x / math.sqrt(5.0 / 3.0) for x in (-1.5, -0.5, 0.5, 1.5)] + [0.0] * 4),
        ([2.0, 7.0, 1.0], 1, False, [0.0, 0.0, 0.0]),
    ],
)
def test_group_advantages_hand_computed(rewards, group_size, scale, want):
    # Hand values are at eps = 0; the default eps = 1e-6 moves them by < 2e-6 relative.
    got = group_advantages(jnp.asarray(rewards), group_size, scale)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)


def test_group_advantages_zero_variance_group_is_zero_not_nan():
    rewards = jnp.asarray([3.0, 3.0, 3.0, 3.0, 0.0, 1.0, 0.0, 1.0])
    got = np.asarray(group_advantages(rewards, 4))
    assert np.all(np.isfinite(got))
    assert np.all(got[:4] == 0.0)


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("group_size", [2, 4, 8])
def test_group_advantages_match_reference_and_jit(group_size, scale):
    rng = np.random.default_rng(group_size)
    rewards = rng.normal(size=16).astype(np.float32)
    want = ref.group_advantages(rewards, group_size, scale, 1e-6)
    eager = group_advantages(jnp.asarray(rewards), group_size, scale)
    jitted = jax.jit(group_advantages, static_argnums=(1, 2))(jnp.asarray(rewards), group_size,
                                                              scale)
    np.testing.assert_allclose(np.asarray(eager), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6, atol=1e-7)
    sums = np.asarray(eager, np.float64).reshape(-1, group_size).sum(axis=1)
    np.testing.assert_allclose(sums, 0.0, atol=1e-5)  # centred within each group


def test_group_advantages_integer_rewards():
    got = group_advantages(jnp.asarray([1, 0, 0, 0]), 4, scale=False)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), [0.75, -0.25, -0.25, -0.25])


@pytest.mark.parametrize(
    "n,group_size,scale,match",
    [(6, 4, True, "6.*4"), (6, 4, False, "6.*4"), (4, 0, False, "4.*0"), (4, 1, True, "2")],
)
def test_group_advantages_rejects_bad_group_sizes(n, group_size, scale, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(jnp.zeros(n), group_size, scale)


# ---------------------------------------------------------------- KL and token log-probs


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_estimate_matches_reference(estimator):
    x = make_inputs(13, "discrete")
    got = np.asarray(kl_estimate(jnp.asarray(x["logp"]), jnp.asarray(x["ref"]), estimator))
    want = np.array([[ref.kl_token(float(lp), float(r), estimator)
                      for lp, r in zip(row_lp, row_r, strict=True)]
                     for row_lp, row_r in zip(x["logp"], x["ref"], strict=True)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    same = np.asarray(kl_estimate(jnp.asarray(x["logp"]), jnp.asarray(x["logp"]), estimator))
    assert np.all(same == 0.0)
    if estimator == "k3":
        assert np.all(got >= 0.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_token_log_probs_match_numpy(dtype):
    rng = np.random.default_rng(14)
    logits = (3.0 * rng.normal(size=(2, 5, 11))).astype(np.float32)
    logits[0, 0] = 0.0  # uniform row: entropy log V
    logits[1, 1, 4] = 40.0  # near one-hot row: entropy ~ 0
    targets = rng.integers(0, 11, size=(2, 5))
    x = jnp.asarray(logits).astype(dtype)
    logp, ent = token_log_probs(x, jnp.asarray(targets))
    assert logp.dtype == ent.dtype == jnp.float32
    want_logp, want_ent = ref.token_log_probs(np.asarray(x.astype(jnp.float32)), targets)
    np.testing.assert_allclose(np.asarray(logp), want_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), want_ent, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(ent[0, 0]), math.log(11), rtol=1e-6)
    jitted = jax.jit(token_log_probs)(x, jnp.asarray(targets))
    chex.assert_trees_all_close(jitted, (logp, ent), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "kwargs,named",
    [
        (dict(aggregation="sum"), "'sum'"),
        (dict(kl_estimator="k2"), "'k2'"),
        (dict(clip_low=-0.1), "-0.1"),
        (dict(clip_low=1.0), "1.0"),
        (dict(clip_high=-0.5), "-0.5"),
        (dict(kl_coef=-0.04), "-0.04"),
        (dict(max_tokens=0), "0"),
    ],
)
def test_loss_config_rejects_bad_values_naming_them(kwargs, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        LossConfig(**kwargs)


def test_loss_config_accepts_documented_settings():
    for (low, high), agg, est in itertools.product(CLIPS.values(), AGGREGATIONS, ("k1", "k3")):
        LossConfig(clip_low=low, clip_high=high, aggregation=agg, kl_estimator=est, kl_coef=0.04)


def test_policy_loss_with_kl_needs_reference_log_probs():
    x = make_inputs(15, "discrete")
    cfg = LossConfig(kl_coef=0.04)
    with pytest.raises(ValueError, match="reference"):
        policy_loss(jnp.asarray(x["logp"]), jnp.asarray(x["old"]), jnp.zeros(B),
                    jnp.asarray(x["gamma"]), jnp.asarray(x["mask"]), cfg)


def test_policy_loss_accepts_float_mask_like_aggregate():
    x = make_inputs(16, "discrete")
    cfg = make_cfg("token-mean", "dapo", True, None)
    adv = group_advantages(jnp.asarray(x["rewards"]), G)
    want = lib_loss(x, adv, x["gamma"], cfg)[1]
    y = dict(x, mask=x["mask"].astype(np.float32))
    got = lib_loss(y, adv, x["gamma"], cfg)[1]
    assert_metrics_identical(got, want)
