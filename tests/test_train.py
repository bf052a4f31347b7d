"""The jitted, mesh-sharded train step: sharded == single device, credit fused, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftjax import capture, credit, mesh_step, rl, sharding, state_init, train
from ftjax.models import config, transformer

B, T = 8, 24
MODEL = config.tiny("llama")


def make_batch(seed=0, rewards=None):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, MODEL.vocab_size, (B, T)).astype(np.int32)
    prompt = np.zeros((B, T), bool)
    prompt[:, 2:8] = True  # two left-pad slots
    response = np.zeros((B, T), bool)
    response[:, 8:22] = True
    response[3, 18:22] = False  # a shorter response
    answer = np.zeros((B, T), bool)
    answer[:, 16:18] = True
    answer[5] = False  # a response without an answer span
    if rewards is None:
        rewards = rng.integers(0, 2, B).astype(np.float32)
    old = np.where(response, rng.normal(-4.0, 0.3, (B, T)), 0.0).astype(np.float32)
    return train.Batch(*(jnp.asarray(x) for x in (tokens, prompt, response, answer, rewards, old)))


def run_steps(mesh_cfg, step_cfg, batch, steps=2):
    model = transformer.Transformer(MODEL, rngs=nnx.Rngs(0))
    graphdef, state = state_init.init_state(model, step_cfg, jax.random.PRNGKey(0))
    mesh = sharding.make_mesh(mesh_cfg)
    step_fn, state = mesh_step.make_train_step(graphdef, state, batch, step_cfg, mesh)
    history = []
    for _ in range(steps):
        state, metrics = step_fn(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history, step_fn


def as_numpy(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


CFG = train.StepConfig(group_size=4, optim=train.OptimConfig(lr=1e-3))


@pytest.fixture(scope="module")
def single_device():
    return run_steps(sharding.MeshConfig(data=1, fsdp=1), CFG, make_batch())


@pytest.mark.parametrize("shape", [(8, 1), (2, 4), (1, 8)])
def test_sharded_step_equals_single_device(single_device, shape):
    ref_state, ref_history, _ = single_device
    state, history, step_fn = run_steps(sharding.MeshConfig(*shape), CFG, make_batch())
    # Step 1 sees identical params: every metric must agree. Step 2 starts from params that differ
    # by reduction order (~1e-6), so its metrics are only compared at 1e-4.
    # The correlation diagnostics centre the entropy, which this untrained model keeps within ~1e-2
    # of log(V) = 4.85: float32 rounding of the summands then moves them by up to ~1e-4.
    for got, want, tol in zip(history, ref_history, (1e-5, 1e-4), strict=True):
        for key in want:
            atol = 1e-3 if key.startswith("credit/corr") else tol / 10
            np.testing.assert_allclose(got[key], want[key], rtol=tol, atol=atol, err_msg=key)
    for got, want in zip(as_numpy(state.params), as_numpy(ref_state.params), strict=True):
        # Two Adam steps at lr 1e-3 move params by ~2e-3; reduction order differs across meshes.
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert step_fn._cache_size() == 1  # the second step did not recompile
    mesh = sharding.make_mesh(sharding.MeshConfig(*shape))
    for leaf in jax.tree.leaves(state.params):
        want = sharding.param_spec(leaf.shape, mesh.shape["fsdp"])
        assert leaf.sharding.spec == want and leaf.sharding.mesh.shape == mesh.shape


def test_uniform_credit_is_plain_grpo():
    batch = make_batch()
    cfg = train.StepConfig(
        group_size=4, credit=credit.CreditConfig(name="uniform"), optim=train.OptimConfig(lr=1e-3)
    )
    _, history, _ = run_steps(sharding.MeshConfig(1, 1), cfg, batch, steps=1)
    model = transformer.Transformer(MODEL, rngs=nnx.Rngs(0))
    logp, _, _ = train.sequence_log_probs(model, batch, train.NONE)
    adv = rl.group_advantages(batch.rewards_B, 4)
    ones = jnp.ones((B, T))
    want, _ = rl.policy_loss(
        logp, batch.old_log_probs_BxT, adv, ones, batch.response_mask_BxT, cfg.loss
    )
    # The reference forward runs eagerly, the step's inside jit: fusion rounds differently (~1e-6).
    np.testing.assert_allclose(history[0]["loss"], float(want), rtol=1e-5)
    assert history[0]["credit/gamma_mean"] == 1.0


def test_one_uniform_step_moves_log_probs_towards_the_rewarded_responses():
    """End to end, the update climbs the policy gradient: on-policy (old log-probs are the
    model's own, so no ratio is clipped), one small step raises sum_i A_i * log p(response_i).
    A flipped sign anywhere from advantages to optimizer would lower it."""
    cfg = train.StepConfig(
        group_size=4, credit=credit.CreditConfig(name="uniform"), optim=train.OptimConfig(lr=1e-4)
    )
    rewards = np.array([1, 0, 0, 1, 0, 1, 1, 1], np.float32)  # no zero-variance group
    batch = make_batch(rewards=rewards)
    model = transformer.Transformer(MODEL, rngs=nnx.Rngs(0))
    before_BxT, _, _ = train.sequence_log_probs(model, batch, train.NONE)
    response_BxT = batch.response_mask_BxT
    batch = dataclasses.replace(batch, old_log_probs_BxT=jnp.where(response_BxT, before_BxT, 0.0))
    graphdef, state = state_init.init_state(model, cfg, jax.random.PRNGKey(0))
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1))
    step_fn, state = mesh_step.make_train_step(graphdef, state, batch, cfg, mesh)
    state, _ = step_fn(state, batch)
    after_BxT, _, _ = train.sequence_log_probs(
        train.policy_model(graphdef, state.params, cfg), batch, train.NONE
    )
    adv_B = np.asarray(rl.group_advantages(batch.rewards_B, 4))
    change_B = np.asarray(jnp.sum(jnp.where(response_BxT, after_BxT - before_BxT, 0.0), axis=1))
    assert float(adv_B @ change_B) > 0


def test_fused_flowtracer_credit_matches_separate_forward():
    batch = make_batch()
    _, history, _ = run_steps(sharding.MeshConfig(1, 1), CFG, batch, steps=1)
    model = transformer.Transformer(MODEL, rngs=nnx.Rngs(0))
    logp, entropy, attn = train.sequence_log_probs(model, batch, CFG.capture)
    rng = jax.random.split(jax.random.PRNGKey(0))[1]
    gamma = train.credit_weights(batch, CFG, logp, entropy, attn, rng)
    response = np.asarray(batch.response_mask_BxT)
    np.testing.assert_allclose(
        history[0]["credit/gamma_mean"], np.asarray(gamma)[response].mean(), rtol=1e-6
    )
    assert 1.0 < history[0]["credit/gamma_mean"] < 1.5
    assert history[0]["credit/no_answer_fraction"] == pytest.approx(1 / 8)


def test_nonfinite_step_is_skipped_and_counted():
    rewards = np.array([1, 0, np.nan, 1, 0, 1, 1, 0], np.float32)
    state, history, _ = run_steps(sharding.MeshConfig(1, 1), CFG, make_batch(rewards=rewards))
    assert [h["skipped_nonfinite"] for h in history] == [1.0, 1.0]
    assert int(state.step) == 0 and int(state.nonfinite_streak) == 2
    fresh = transformer.Transformer(MODEL, rngs=nnx.Rngs(0))
    for got, want in zip(
        as_numpy(state.params), as_numpy(nnx.state(fresh, nnx.Param)), strict=True
    ):
        np.testing.assert_array_equal(got, want)
        assert np.all(np.isfinite(got))


def test_batch_not_divisible_by_mesh_is_rejected_before_compile():
    model = transformer.Transformer(MODEL, rngs=nnx.Rngs(0))
    graphdef, state = state_init.init_state(model, CFG, jax.random.PRNGKey(0))
    batch = jax.tree.map(lambda x: x[:6], make_batch())
    with pytest.raises(ValueError, match="divisible"):
        mesh_step.make_train_step(
            graphdef, state, batch, CFG, sharding.make_mesh(sharding.MeshConfig(8, 1))
        )


def test_mesh_larger_than_devices_is_rejected():
    with pytest.raises(ValueError, match="devices"):
        sharding.make_mesh(sharding.MeshConfig(data=4, fsdp=4))
    with pytest.raises(ValueError):
        sharding.MeshConfig(data=0)


def test_prepared_batch_reuses_credit_across_epochs():
    batch = make_batch()
    model = transformer.Transformer(MODEL, rngs=nnx.Rngs(0))
    graphdef, state = state_init.init_state(model, CFG, jax.random.PRNGKey(0))
    prepared = jax.jit(train.prepare, static_argnums=(0, 3))(graphdef, state, batch, CFG)
    fused_batch = dataclasses.replace(prepared, gamma_BxT=None)
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1))
    fused_fn, fused_state = mesh_step.make_train_step(graphdef, state, fused_batch, CFG, mesh)
    _, fused = fused_fn(fused_state, fused_batch)
    model = transformer.Transformer(MODEL, rngs=nnx.Rngs(0))
    graphdef, state = state_init.init_state(model, CFG, jax.random.PRNGKey(0))
    step_fn, state = mesh_step.make_train_step(graphdef, state, prepared, CFG, mesh)
    state, first = step_fn(state, prepared)
    # Epoch 1 is on-policy: ratios are 1 and the precomputed credit is what the fused step computes.
    assert float(first["ratio_mean"]) == pytest.approx(1.0, abs=1e-5)
    for key in ("loss", "credit/gamma_mean", "grad_norm"):
        np.testing.assert_allclose(float(first[key]), float(fused[key]), rtol=1e-5, err_msg=key)
    state, second = step_fn(state, prepared)  # epoch 2: same credit, policy has moved
    assert float(second["credit/gamma_mean"]) == float(first["credit/gamma_mean"])
    assert float(second["ratio_mean"]) != pytest.approx(1.0, abs=1e-6)


def test_kl_term_against_the_initial_policy_matches_float64():
    """The KL reference is a frozen copy of the initial parameters; the step's KL term equals
    the float64 k3 estimate over response tokens, from the two policies' own logits."""
    import reference_rl  # here: the 2-process workers import this module from the repo root

    batch = make_batch()
    cfg = dataclasses.replace(CFG, loss=rl.LossConfig(kl_coef=0.1))
    initial = transformer.Transformer(MODEL, rngs=nnx.Rngs(0))
    graphdef, state = state_init.init_state(initial, cfg, jax.random.PRNGKey(0))
    noise = np.random.default_rng(1)
    moved = jax.tree.map(
        lambda x: x + 0.3 * jnp.asarray(noise.standard_normal(x.shape), x.dtype), state.params
    )
    state = dataclasses.replace(state, params=moved)
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1))
    reference = mesh_step.make_reference(graphdef, nnx.state(initial, nnx.Param), batch, mesh)
    batch = dataclasses.replace(batch, ref_log_probs_BxT=reference(batch))
    tokens = np.asarray(batch.tokens_BxT)
    valid = np.asarray(batch.prompt_mask_BxT | batch.response_mask_BxT)
    response = np.asarray(batch.response_mask_BxT)

    def float64_log_probs(params):
        logits = nnx.merge(graphdef, params)(tokens, valid_BxT=valid).logits_BxTxV
        logp, _ = reference_rl.token_log_probs(np.asarray(logits)[:, :-1], tokens[:, 1:])
        return np.pad(logp, ((0, 0), (1, 0)))

    policy_BxT, initial_BxT = float64_log_probs(moved), float64_log_probs(state_params(initial))
    # donates `moved`
    step_fn, placed = mesh_step.make_train_step(graphdef, state, batch, cfg, mesh)
    _, metrics = step_fn(placed, batch)
    kl_BxT = np.vectorize(lambda p, r: reference_rl.kl_token(p, r, "k3"))(policy_BxT, initial_BxT)
    want = reference_rl.aggregate(kl_BxT, response, "token-mean")
    assert want > 0.05  # the policies differ: the check is not 0 == 0
    # float32 logits (and the captured vs fused attention paths, ~1e-6) against float64 sums.
    np.testing.assert_allclose(float(metrics["kl"]), want, rtol=1e-4)


def state_params(model):
    return nnx.state(model, nnx.Param)


def test_nonfinite_update_is_skipped_and_named():
    """An infinite learning rate (which config validation refuses; forced here as a schedule
    gone wrong would) makes every new parameter non-finite: the step keeps the old state."""
    optim = train.OptimConfig(lr=1e-3)
    object.__setattr__(optim, "lr", float("inf"))
    cfg = dataclasses.replace(CFG, optim=optim)
    model = transformer.Transformer(MODEL, rngs=nnx.Rngs(0))
    graphdef, state = state_init.init_state(model, cfg, jax.random.PRNGKey(0))
    before = as_numpy(state.params)
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1))
    step_fn, state = mesh_step.make_train_step(graphdef, state, make_batch(), cfg, mesh)
    state, metrics = step_fn(state, make_batch())
    assert float(metrics["skipped_nonfinite"]) == 1.0
    assert float(metrics["nonfinite/update"]) == 1.0 and float(metrics["nonfinite/loss"]) == 0.0
    for got, want in zip(as_numpy(state.params), before, strict=True):
        np.testing.assert_array_equal(got, want)
    assert int(state.nonfinite_streak) == 1 and int(state.step) == 0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: train.OptimConfig(lr=float("inf")), "lr must be finite"),
        (lambda: train.OptimConfig(lr=float("nan")), "lr must be finite"),
        (lambda: train.OptimConfig(grad_clip=float("nan")), "grad_clip must be finite"),
        (lambda: train.OptimConfig(eps=0.0), "eps must be finite and > 0"),
        (lambda: train.OptimConfig(weight_decay=float("inf")), "weight_decay"),
        (lambda: train.OptimConfig(b2=1.0), "b2"),
        (lambda: train.OptimConfig(max_nonfinite_steps=0), "max_nonfinite_steps"),
        (lambda: train.StepConfig(group_size=1), "group_size 1"),
        (lambda: train.StepConfig(attention="flash"), "unknown attention implementation 'flash'"),
        (lambda: train.StepConfig(attention="cudnn"), "'cudnn' needs StepConfig.compute_dtype"),
    ],
)
def test_configs_that_can_never_work_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_command_line_refuses_non_finite_floats():
    from ftjax import overrides

    for text in ("inf", "nan", "-inf"):
        with pytest.raises(ValueError, match="not a finite number"):
            overrides.apply(train.StepConfig(), ["--optim.lr", text])
    no_scaling = ["--group_size", "1", "--loss.scale_advantages", "false"]
    assert overrides.apply(train.StepConfig(), no_scaling).group_size == 1


@pytest.mark.parametrize(("eps", "want"), [(1e-8, -1.0), (0.5, -0.5)])
def test_adam_epsilon_reaches_the_update(eps, want):
    # Adam's first step, bias-corrected: -lr * g / (|g| + eps); g = 0.5, lr = 1, by hand.
    opt = train.optimizer(train.OptimConfig(lr=1.0, eps=eps))
    grads = {"w": jnp.array([0.5])}
    updates, _ = opt.update(grads, opt.init(grads), grads)
    # rtol 1e-4: float32 bias correction and sqrt round at ~1e-5; the two eps differ by 2x.
    np.testing.assert_allclose(np.asarray(updates["w"]), [want], rtol=1e-4)


@pytest.mark.parametrize("logit_chunk", [None, 4])
def test_log_probs_from_the_response_start_equal_the_full_computation(logit_chunk):
    """A batch that says where its responses start (column 8 here, `rollout_batch` sets its
    prompt slots) gets the log-probs and entropies of the full computation from that column on
    and 0 before it; the step's update is the same."""
    model = transformer.Transformer(MODEL, rngs=nnx.Rngs(0))
    full, late = make_batch(), dataclasses.replace(make_batch(), response_start=8)
    want = train.sequence_log_probs(model, full, capture.NONE)
    got = train.sequence_log_probs(model, late, capture.NONE, logit_chunk=logit_chunk)
    for g, w in zip(got[:2], want[:2], strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert np.all(g[:, :8] == 0.0) and np.abs(w[:, 8:]).min() > 0
        np.testing.assert_allclose(g[:, 8:], w[:, 8:], rtol=1e-6, atol=1e-6)
    cfg = dataclasses.replace(CFG, logit_chunk=logit_chunk)
    want_state, want_history, _ = run_steps(sharding.MeshConfig(1, 1), cfg, full, steps=1)
    state, history, _ = run_steps(sharding.MeshConfig(1, 1), cfg, late, steps=1)
    for key in want_history[0]:
        np.testing.assert_allclose(history[0][key], want_history[0][key], rtol=1e-5, err_msg=key)
    for g, w in zip(as_numpy(state.params), as_numpy(want_state.params), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
