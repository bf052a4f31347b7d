"""Sampler: greedy == argmax of full re-forwarding, log-probs == recomputed, per-sequence EOS."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftjax import sampling
from ftjax.models import config, transformer

PROMPT = np.array([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 9, 10], [0, 0, 0, 0, 11, 12]], np.int32)
VALID = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]], bool)


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request):
    return transformer.Transformer(config.tiny(request.param), rngs=nnx.Rngs(3))


def reforward_log_probs(model, rollout):
    """log p(token) of each generated token from one full forward of prompt + response."""
    tokens = np.concatenate([PROMPT, np.asarray(rollout.tokens_BxN)], axis=1)
    n = rollout.tokens_BxN.shape[1]
    response_valid = np.arange(n)[None, :] < np.asarray(rollout.lengths_B)[:, None]
    valid = np.concatenate([VALID, response_valid], axis=1)
    logits = model(jnp.asarray(tokens), valid_BxT=jnp.asarray(valid)).logits_BxTxV
    log_probs = jax.nn.log_softmax(logits[:, PROMPT.shape[1] - 1 : -1], axis=-1)
    picked = jnp.take_along_axis(log_probs, rollout.tokens_BxN[..., None], -1)[..., 0]
    return np.asarray(logits[:, PROMPT.shape[1] - 1 : -1]), np.asarray(picked), response_valid


def test_greedy_equals_argmax_of_full_forward(model):
    cfg = sampling.SamplingConfig(max_new_tokens=8, temperature=0.0)
    rollout = sampling.generate(model, PROMPT, VALID, jax.random.PRNGKey(0), cfg)
    logits, picked, _ = reforward_log_probs(model, rollout)
    np.testing.assert_array_equal(np.asarray(rollout.tokens_BxN), logits.argmax(-1))
    np.testing.assert_allclose(np.asarray(rollout.log_probs_BxN), picked, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(rollout.lengths_B), [8, 8, 8])


def test_sampled_log_probs_equal_recomputed(model):
    cfg = sampling.SamplingConfig(max_new_tokens=8, temperature=1.3, top_k=20, top_p=0.9)
    rollout = sampling.generate(model, PROMPT, VALID, jax.random.PRNGKey(7), cfg)
    _, picked, _ = reforward_log_probs(model, rollout)
    np.testing.assert_allclose(np.asarray(rollout.log_probs_BxN), picked, atol=1e-4)


def test_eos_stops_each_sequence_independently(model):
    free = sampling.generate(model, PROMPT, VALID, jax.random.PRNGKey(0),
                             sampling.SamplingConfig(max_new_tokens=8, temperature=0.0))
    tokens = np.asarray(free.tokens_BxN)
    # An EOS id that first appears in row 0 at step j >= 1 and does not end every row at j.
    firsts = [j for j in range(1, 8) if tokens[0, j] not in tokens[0, :j]
              and any(tokens[0, j] not in tokens[b, : j + 1] for b in (1, 2))]
    assert firsts, tokens
    stop = firsts[0]
    eos = int(tokens[0, stop])
    cfg = sampling.SamplingConfig(max_new_tokens=8, temperature=0.0, eos_ids=(eos,), pad_id=0)
    rollout = sampling.generate(model, PROMPT, VALID, jax.random.PRNGKey(0), cfg)
    got = np.asarray(rollout.tokens_BxN)
    for b in range(3):
        hits = np.flatnonzero(tokens[b] == eos)
        length = hits[0] + 1 if hits.size else 8
        assert int(rollout.lengths_B[b]) == length
        assert bool(rollout.done_B[b]) == bool(hits.size)
        np.testing.assert_array_equal(got[b, :length], tokens[b, :length])
        assert np.all(got[b, length:] == 0)
        assert np.all(np.asarray(rollout.log_probs_BxN)[b, length:] == 0.0)
    assert int(rollout.lengths_B[0]) == stop + 1
    assert len(set(np.asarray(rollout.lengths_B).tolist())) > 1


def test_truncation_rules_on_fixed_logits():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    draw = jax.vmap(lambda k, c: sampling.choose(logits, k, c), in_axes=(0, None))

    def frequencies(cfg):
        return np.bincount(np.asarray(draw(keys, cfg)).ravel(), minlength=4) / len(keys)

    np.testing.assert_allclose(frequencies(sampling.SamplingConfig(temperature=1.0)),
                               [0.5, 0.3, 0.15, 0.05], atol=0.03)
    top2 = frequencies(sampling.SamplingConfig(temperature=1.0, top_k=2))
    np.testing.assert_allclose(top2, [0.625, 0.375, 0, 0], atol=0.03)
    assert top2[2:].sum() == 0
    nucleus = frequencies(sampling.SamplingConfig(temperature=1.0, top_p=0.8))  # {0, 1}: 0.8
    assert nucleus[2:].sum() == 0 and nucleus[1] > 0.3
    assert np.all(frequencies(sampling.SamplingConfig(temperature=1.0, top_p=0.4)) == [1, 0, 0, 0])
    greedy = frequencies(sampling.SamplingConfig(temperature=0.0))
    assert np.all(greedy == [1, 0, 0, 0])


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=0), dict(temperature=-1.0),
                                    dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_config(kwargs):
    with pytest.raises(ValueError):
        sampling.SamplingConfig(**kwargs)


def test_prompt_longer_than_context_is_rejected():
    model = transformer.Transformer(config.tiny("llama", max_position_embeddings=16),
                                    rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="context"):
        sampling.generate(model, PROMPT, VALID, jax.random.PRNGKey(0),
                          sampling.SamplingConfig(max_new_tokens=11))
    with pytest.raises(ValueError, match="shape|\\(B, P\\)"):
        sampling.generate(model, PROMPT, VALID[:, :3], jax.random.PRNGKey(0),
                          sampling.SamplingConfig(max_new_tokens=2))


def test_batch_sharded_prompts_give_the_same_rollout(model):
    from ftjax import sharding

    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=1))
    cfg = sampling.SamplingConfig(max_new_tokens=5, temperature=0.0)
    prompt, valid = np.concatenate([PROMPT, PROMPT[:1]]), np.concatenate([VALID, VALID[:1]])
    placed = [jax.device_put(x, sharding.batch_sharding(mesh)) for x in (prompt, valid)]
    sharded = sampling.generate(model, *placed, jax.random.PRNGKey(0), cfg)
    plain = sampling.generate(model, prompt, valid, jax.random.PRNGKey(0), cfg)
    np.testing.assert_array_equal(np.asarray(sharded.tokens_BxN), np.asarray(plain.tokens_BxN))
    np.testing.assert_allclose(np.asarray(sharded.log_probs_BxN),
                               np.asarray(plain.log_probs_BxN), atol=1e-5)
    assert sharded.tokens_BxN.sharding.spec[0] is not None  # stays split over the batch


def test_bfloat16_parameters_sample_with_a_bfloat16_cache():
    """bf16 parameters give a bf16 KV cache; the rotated keys are float32, so they are written in
    the cache's dtype and read back in theirs. The reference is a full forward of the same bf16
    model, whose keys are never rounded to bf16: the tolerance (3e-2 on log-probs) is bf16's
    rounding of the cached keys and values (relative 2^-8), not slack."""
    model = transformer.Transformer(config.tiny("llama"), rngs=nnx.Rngs(3))
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    cfg = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0)
    rollout = sampling.generate(model, PROMPT, VALID, jax.random.PRNGKey(7), cfg)
    _, picked, _ = reforward_log_probs(model, rollout)
    np.testing.assert_allclose(np.asarray(rollout.log_probs_BxN), picked, atol=3e-2)
