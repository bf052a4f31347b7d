"""Micro-batched gradient accumulation: the same update as one pass, on every mesh and loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_rl
from flax import nnx

from ftjax import credit, mesh_step, microbatch, rl, sharding, state_init, train
from ftjax.models import config, transformer

MODEL = config.tiny("llama")


def make_batch(B=16, T=20, seed=0):
    """Ragged responses (one empty), ragged left padding, one response without an answer."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, MODEL.vocab_size, (B, T)).astype(np.int32)
    prompt = np.zeros((B, T), bool)
    response = np.zeros((B, T), bool)
    for b in range(B):
        prompt[b, rng.integers(0, 4) : 8] = True
        response[b, 8 : 8 + rng.integers(1, T - 8)] = True
    response[B // 2] = False  # a row with no response tokens at all
    answer = response & (np.arange(T) >= 10) & (np.arange(T) < 12)
    rewards = rng.integers(0, 2, B).astype(np.float32)
    old = np.where(response, rng.normal(-4.0, 0.3, (B, T)), 0.0).astype(np.float32)
    return train.Batch(*(jnp.asarray(x) for x in (tokens, prompt, response, answer, rewards, old)))


def step_once(step_cfg, batch, mesh_shape):
    model = transformer.Transformer(MODEL, rngs=nnx.Rngs(0))
    graphdef, state = state_init.init_state(model, step_cfg, jax.random.PRNGKey(0))
    mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape))
    step_fn, state = mesh_step.make_train_step(graphdef, state, batch, step_cfg, mesh)
    state, metrics = step_fn(state, batch)
    return state, {k: float(v) for k, v in metrics.items()}


def cfg_for(aggregation, micro_batch=None, name="flowtracer"):
    return train.StepConfig(
        group_size=4,
        loss=rl.LossConfig(aggregation=aggregation),
        credit=credit.CreditConfig(name=name),
        # Adam eps 1e-5, not optax's 1e-8: in Adam's first step a parameter moves by
        # lr * g / (|g| + eps), about lr * sign(g), so with eps 1e-8 a parameter whose gradient
        # is at float32 rounding level (the micro-batches sum it in another order) can move by
        # any fraction of lr, and the comparison below would test the sign of rounding noise
        # (it failed so on one element of 8192 on a 2-core AMD EPYC: 1.2e-5 against atol 1e-5).
        # With eps 1e-5 such a step is linear in g and the comparison tests the gradients.
        optim=train.OptimConfig(lr=1e-3, eps=1e-5),
        micro_batch=micro_batch,
    )


def assert_same_update(got, want):
    (got_state, got_metrics), (want_state, want_metrics) = got, want
    for key in ("loss", "pg_loss", "grad_norm", "clip_fraction", "entropy", "credit/gamma_mean"):
        np.testing.assert_allclose(
            got_metrics[key], want_metrics[key], rtol=1e-5, atol=1e-7, err_msg=key
        )
    for a, b in zip(
        jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.fixture(scope="module")
def one_pass():
    """Each aggregation's one-pass update on one device: the reference for every split."""
    return {agg: step_once(cfg_for(agg), make_batch(), (1, 1)) for agg in rl.AGGREGATIONS}


# Every aggregation and every mesh in the default suite, each aggregation on one mesh; the other
# six pairs in the slow suite (CI time).
CASES = [("token-mean", (8, 1)), ("seq-mean-token-mean", (2, 4)), ("constant", (1, 8))]
SLOW_CASES = [
    pytest.param(agg, shape, marks=pytest.mark.slow)
    for agg in rl.AGGREGATIONS
    for shape in [(8, 1), (2, 4), (1, 8)]
    if (agg, shape) not in CASES
]


@pytest.mark.parametrize("aggregation, shape", CASES + SLOW_CASES)
def test_micro_batched_step_equals_one_pass(one_pass, aggregation, shape):
    # 16 rows on 8 batch shards: 2 rows per device, micro-batch 1 -> 2 passes.
    got = step_once(cfg_for(aggregation, micro_batch=1), make_batch(), shape)
    assert got[1]["skipped_nonfinite"] == 0.0
    assert_same_update(got, one_pass[aggregation])


def test_512_sequences_in_micro_batches_of_8_match_one_pass():
    """The paper's 512 rollouts per update, 8 rows per device per pass (8 passes on 8 devices)."""
    batch = make_batch(B=512, T=12, seed=3)
    cfg = dataclasses.replace(cfg_for("token-mean"), group_size=8)
    got = step_once(dataclasses.replace(cfg, micro_batch=8), batch, (8, 1))
    assert_same_update(got, step_once(cfg, batch, (8, 1)))


@pytest.mark.parametrize("aggregation", rl.AGGREGATIONS)
def test_token_weights_sum_to_the_aggregation(aggregation):
    rng = np.random.default_rng(1)
    values = rng.normal(size=(6, 9))
    mask = rng.random((6, 9)) < 0.5
    mask[2] = False
    cfg = rl.LossConfig(aggregation=aggregation)
    weights = rl.token_weights(jnp.asarray(mask), cfg)
    got = float(rl.weighted_sum(jnp.asarray(values, jnp.float32), jnp.asarray(mask), weights))
    np.testing.assert_allclose(got, reference_rl.aggregate(values, mask, aggregation), rtol=1e-6)
    # The weights of any split of the rows add up to the whole: the split losses sum to it.
    halves = sum(
        float(
            rl.weighted_sum(jnp.asarray(values[s], jnp.float32), jnp.asarray(mask[s]), weights[s])
        )
        for s in (slice(0, 3), slice(3, 6))
    )
    np.testing.assert_allclose(halves, got, rtol=1e-6)


@pytest.mark.parametrize("rows, n, shards", [(16, 2, 8), (16, 4, 2), (12, 3, 1), (8, 1, 4)])
def test_split_gives_each_pass_a_slice_of_every_shard(rows, n, shards):
    x = np.arange(rows * 3).reshape(rows, 3)
    parts = np.asarray(microbatch.split(jnp.asarray(x), n, shards))
    block, per_pass = rows // shards, rows // shards // n
    for k in range(n):
        want = [x[s * block + k * per_pass + j] for s in range(shards) for j in range(per_pass)]
        np.testing.assert_array_equal(parts[k], np.stack(want))
    np.testing.assert_array_equal(np.asarray(microbatch.merge(jnp.asarray(parts), shards)), x)


def test_summed_grads_equal_the_whole_batch_grad():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(12, 5)), jnp.float32)
    w = {"a": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}

    def loss_fn(params, rows):
        y = jnp.tanh(rows @ params["a"])
        return jnp.sum(y**2), y

    loss, grads, aux = microbatch.grads(loss_fn, w, microbatch.split(x, 3, 2), 3)
    (want_loss, want_y), want_grads = jax.value_and_grad(loss_fn, has_aux=True)(w, x)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grads["a"]), np.asarray(want_grads["a"]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(microbatch.merge(aux, 2)), np.asarray(want_y))


def test_prepare_and_reference_in_passes_equal_one_pass():
    batch = make_batch()
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 4))
    model = transformer.Transformer(MODEL, rngs=nnx.Rngs(0))
    outs = {}
    for name in ("flowtracer", "entropy_select"):  # per sequence, and ranked across the batch
        for micro in (None, 1):
            cfg = cfg_for("token-mean", micro, name)
            graphdef, state = state_init.init_state(model, cfg, jax.random.PRNGKey(0))
            prepare = mesh_step.make_prepare(graphdef, state, batch, cfg, mesh)
            reference = mesh_step.make_reference(graphdef, state.params, batch, mesh, cfg)
            prepared = prepare(state, batch)
            outs[name, micro] = (prepared.old_log_probs_BxT, prepared.gamma_BxT, reference(batch))
        for got, want in zip(outs[name, 1], outs[name, None], strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    assert float(jnp.sum(outs["entropy_select", 1][1])) > 0


def test_bad_micro_batches_are_refused_before_compile():
    batch = make_batch()
    model = transformer.Transformer(MODEL, rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 4))
    for bad, message in [
        ({"micro_batch": 0}, "micro_batch must be None or an int >= 1"),
        ({"logit_chunk": 0}, "logit_chunk must be None or an int >= 1"),
        ({"remat": "some"}, "unknown remat policy 'some'"),
        ({"compute_dtype": "float16"}, "unknown StepConfig.compute_dtype 'float16'"),
        ({"credit_pass": "later"}, "unknown StepConfig.credit_pass 'later'"),
    ]:
        with pytest.raises(ValueError, match=message):
            train.StepConfig(**bad)
    cfg = cfg_for("token-mean", micro_batch=3)  # 2 rows per device
    graphdef, state = state_init.init_state(model, cfg, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="micro_batch 3 does not divide the 2 rows"):
        mesh_step.make_train_step(graphdef, state, batch, cfg, mesh)
    with pytest.raises(ValueError, match="micro_batch 3 does not divide"):
        mesh_step.make_prepare(graphdef, state, batch, cfg, mesh)
    cfg = cfg_for("token-mean", micro_batch=1, name="entropy_select")
    with pytest.raises(ValueError, match="'entropy_select' ranks across the whole batch"):
        mesh_step.make_train_step(graphdef, state, batch, cfg, mesh)


def grads_on_mesh(cfg, batch, shape):
    """train.batch_grads jitted on a mesh: (grads, (logp, entropy, gamma))."""
    model = transformer.Transformer(MODEL, rngs=nnx.Rngs(0))
    graphdef, state = state_init.init_state(model, cfg, jax.random.PRNGKey(0))
    mesh = sharding.make_mesh(sharding.MeshConfig(*shape))
    adv = rl.group_advantages(batch.rewards_B, cfg.group_size)
    fn = jax.jit(
        lambda params, batch, adv: train.batch_grads(
            graphdef, params, batch, adv, cfg, jax.random.PRNGKey(1), mesh
        )
    )
    return fn(state.params, batch, adv)


@pytest.mark.parametrize(
    "knobs",
    [
        # micro_batch alone and dots are also covered by the step-level and model-level tests
        pytest.param({"micro_batch": 1}, marks=pytest.mark.slow),
        # scan_layers here: the captured stretch scanned under FSDP (2, 4) with everything else
        {"micro_batch": 1, "remat": "full", "logit_chunk": 5, "scan_layers": True},
        pytest.param({"remat": "dots", "logit_chunk": 64}, marks=pytest.mark.slow),
        {"credit_pass": "separate", "micro_batch": 1, "remat": "full"},
    ],
)
def test_memory_knobs_leave_the_gradient_unchanged(knobs):
    """Passes, per-layer remat, chunked log-probs, scanned layers and credit from a separate
    gradient-free pass change where memory goes (or how long it compiles), not the math:
    the gradient (compared, not the Adam update, whose first step lr * g / |g| magnifies float
    rounding where g ~ 0) and every token's log-prob, entropy and gamma."""
    batch, base = make_batch(), cfg_for("seq-mean-token-mean")
    want_grads, want_aux = grads_on_mesh(base, batch, (1, 1))
    got_grads, got_aux = grads_on_mesh(dataclasses.replace(base, **knobs), batch, (2, 4))
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        scale = float(np.max(np.abs(want)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5 * scale)
    for got, want in zip(got_aux, want_aux, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: tied, scaled embeddings
def test_bfloat16_compute_runs_in_bfloat16(family):
    """The cast policy computes in bfloat16 (its residual stream and every matmul), not in
    float32 with bfloat16-rounded weights; logits, log-softmax and the map stay float32."""
    model = transformer.Transformer(config.tiny(family), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    policy = train.policy_model(graphdef, params, train.StepConfig(compute_dtype="bfloat16"))
    tokens = make_batch().tokens_BxT
    assert policy(tokens, logits=False).hidden_BxTxE.dtype == jnp.bfloat16
    jaxpr = jax.make_jaxpr(lambda t: policy(t).logits_BxTxV)(tokens)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
    out = policy(tokens, capture=train.CaptureSpec())
    assert out.logits_BxTxV.dtype == jnp.float32 and out.attn_BxTxS.dtype == jnp.float32


def test_bfloat16_compute_stays_close_to_float32(one_pass):
    """bf16 has an 8-bit mantissa (relative rounding 2^-9 = 0.2%) and the tiny model's logits
    pass through 2 layers of bf16 matmuls, so the loss and gradient norm move by ~1e-2; the
    master parameters and Adam state stay float32."""
    state, metrics = step_once(
        dataclasses.replace(cfg_for("token-mean"), compute_dtype="bfloat16"), make_batch(), (1, 1)
    )
    want_state, want = one_pass["token-mean"]
    for key in ("loss", "grad_norm", "entropy"):
        np.testing.assert_allclose(metrics[key], want[key], rtol=3e-2, err_msg=key)
    initial = nnx.state(transformer.Transformer(MODEL, rngs=nnx.Rngs(0)), nnx.Param)
    moved = agree = 0
    for new, ref, old in zip(
        *(jax.tree.leaves(s) for s in (state.params, want_state.params, initial)), strict=True
    ):
        assert new.dtype == jnp.float32
        step, ref_step = np.asarray(new - old), np.asarray(ref - old)
        big = np.abs(ref_step) > 5e-4  # Adam's first step is ~lr * sign(g) where g is not ~0
        moved += big.sum()
        agree += (np.sign(step[big]) == np.sign(ref_step[big])).sum()
    assert agree / moved > 0.95
