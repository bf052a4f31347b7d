"""ftjax.params_file: a policy's parameters as one safetensors file with a JSON record."""

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import common
from ftjax import params_file

SMALL = common.PolicyConfig(layers=2, hidden=32, heads=4)


def leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_round_trip_restores_every_parameter_and_the_record(tmp_path):
    path = tmp_path / "w.safetensors"
    saved = common.build_policy(SMALL, seed=0)
    params_file.save(path, nnx.state(saved, nnx.Param), {"steps": 3, "task": {"chains": 2}})
    other = common.build_policy(SMALL, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(leaves(saved), leaves(other), strict=True))
    assert params_file.load(path, other) == {"steps": 3, "task": {"chains": 2}}
    assert all(np.array_equal(a, b) for a, b in zip(leaves(saved), leaves(other), strict=True))
    assert params_file.record(path) == {"steps": 3, "task": {"chains": 2}}
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no partial file left


def test_a_different_model_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "w.safetensors"
    params_file.save(path, nnx.state(common.build_policy(SMALL, 0), nnx.Param), {})
    wider = common.build_policy(common.PolicyConfig(layers=2, hidden=64, heads=4), 1)
    before = leaves(wider)
    with pytest.raises(ValueError, match="embed_tokens/embedding"):
        params_file.load(path, wider)
    assert all(np.array_equal(a, b) for a, b in zip(before, leaves(wider), strict=True))
    deeper = common.build_policy(common.PolicyConfig(layers=3, hidden=32, heads=4), 1)
    with pytest.raises(ValueError, match="lacks parameters"):
        params_file.load(path, deeper)
    shallower = common.build_policy(common.PolicyConfig(layers=1, hidden=32, heads=4), 1)
    with pytest.raises(ValueError, match="has parameters the model does not"):
        params_file.load(path, shallower)
    with pytest.raises(ValueError, match="no parameter file"):
        params_file.load(tmp_path / "missing.safetensors", shallower)


def test_non_finite_parameters_are_not_written(tmp_path):
    model = common.build_policy(SMALL, 0)
    state = nnx.state(model, nnx.Param)
    embedding = state["embed_tokens"]["embedding"]
    embedding.set_value(embedding.get_value().at[0, 0].set(np.nan))
    with pytest.raises(ValueError, match="embed_tokens/embedding is not finite"):
        params_file.save(tmp_path / "w.safetensors", state, {})
    assert not list(tmp_path.iterdir())
