"""Train state created already sharded (`state_init.init_state_sharded`) and as sharded shapes
(`state_init.abstract_state`), on the 8 fake CPU devices of conftest."""

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from ftjax import sharding, state_init, train
from ftjax.models import config
from ftjax.models.transformer import Transformer

CFG = train.StepConfig()
MODEL = config.tiny("qwen3", vocab_size=256, num_kv_heads=4)


def make_model(rngs):
    return Transformer(MODEL, rngs=rngs)


def fsdp_mesh():
    return sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=8))


def test_sharded_init_equals_the_placed_unsharded_init():
    mesh, rng = fsdp_mesh(), jax.random.PRNGKey(3)
    graphdef, state = state_init.init_state_sharded(make_model, CFG, rng, mesh)
    ref_graphdef, ref = state_init.init_state(make_model(nnx.Rngs(rng)), CFG, rng)
    ref = jax.device_put(ref, state_init.state_shardings(ref, mesh))
    assert graphdef == ref_graphdef
    assert jax.tree.structure(state) == jax.tree.structure(ref)
    paths = jax.tree_util.tree_leaves_with_path(state)
    for (path, leaf), expected in zip(paths, jax.tree.leaves(ref), strict=True):
        name = jax.tree_util.keystr(path)
        assert leaf.sharding == expected.sharding, name
        assert leaf.sharding.spec == sharding.param_spec(leaf.shape, 8) or name.startswith(
            (".step", ".rng", ".nonfinite_streak")
        ), name
        # Same random bits; the normal init's float math rounds differently compiled and op by op.
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(expected), rtol=1e-6, atol=1e-9,
                                   err_msg=name)
    kernel = state.params["layers"][0]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.spec == P(None, "fsdp")  # (64, 128): the larger dimension is sharded


def test_sharded_init_equals_the_unsharded_jit_exactly():
    mesh, rng = fsdp_mesh(), jax.random.PRNGKey(5)
    _, state = state_init.init_state_sharded(make_model, CFG, rng, mesh)
    unsharded = jax.jit(lambda key: state_init.init_state(make_model(nnx.Rngs(key)), CFG, key)[1])
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(unsharded(rng)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_abstract_state_carries_shapes_and_shardings_without_allocating():
    mesh = fsdp_mesh()
    graphdef, like = state_init.abstract_state(make_model, CFG, mesh)
    state_graphdef, state = state_init.init_state_sharded(
        make_model, CFG, jax.random.PRNGKey(0), mesh
    )
    assert graphdef == state_graphdef
    for a, b in zip(jax.tree.leaves(like), jax.tree.leaves(state), strict=True):
        assert isinstance(a, jax.ShapeDtypeStruct)
        assert (a.shape, a.dtype, a.sharding) == (b.shape, b.dtype, b.sharding)


def test_each_device_holds_only_its_shard():
    """The init's compiled outputs per device are the state's per-device shards: about 1/8 of it
    (small replicated leaves aside), and its temporaries are no larger."""
    mesh = fsdp_mesh()
    _, like = state_init.abstract_state(make_model, CFG, mesh)
    placed = jax.tree.map(lambda x: x.sharding, like)
    init = jax.jit(lambda key: state_init.init_state(make_model(nnx.Rngs(key)), CFG, key)[1],
                   out_shardings=placed)
    stats = init.lower(jax.random.PRNGKey(0)).compile().memory_analysis()
    whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(like))
    shards = sum(
        int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
        for x in jax.tree.leaves(like)
    )
    assert shards < whole / 6
    leaves = len(jax.tree.leaves(like))
    assert shards <= stats.output_size_in_bytes <= shards + 8 * leaves  # + the output tuple's table
    assert stats.temp_size_in_bytes <= shards


def test_a_loaded_model_gets_its_state_placed_and_stays_usable():
    """`init_state_placed` (what `loop.run` uses): the parameters the model already has, the
    Adam moments made on the mesh, every leaf with `state_shardings`; the state's parameters
    are copies, so the train step may donate them and the caller's model still works."""
    mesh, rng = fsdp_mesh(), jax.random.PRNGKey(7)
    loaded = make_model(nnx.Rngs(11))  # weights from elsewhere, not from this init's rng
    tokens = np.arange(12, dtype=np.int32).reshape(2, 6) % MODEL.vocab_size
    before = np.asarray(loaded(tokens).logits_BxTxV)
    graphdef, state = state_init.init_state_placed(loaded, CFG, rng, mesh)
    ref_graphdef, ref = state_init.init_state(make_model(nnx.Rngs(11)), CFG, rng)
    assert graphdef == ref_graphdef
    want = state_init.state_shardings(ref, mesh)
    for got, value, placed in zip(
        jax.tree.leaves(state), jax.tree.leaves(ref), jax.tree.leaves(want), strict=True
    ):
        assert got.sharding == placed
        np.testing.assert_array_equal(np.asarray(got), np.asarray(value))
    jax.tree.map(lambda x: x.delete(), state.params)  # as a donating step would
    np.testing.assert_array_equal(np.asarray(loaded(tokens).logits_BxTxV), before)


def test_param_sharding_fn_places_as_tree_shardings():
    mesh = fsdp_mesh()
    place = sharding.param_sharding_fn(mesh)
    for shape in [(64, 128), (128,), (7, 3), ()]:
        assert place("any.name", shape) == sharding.tree_shardings(np.zeros(shape), mesh)
