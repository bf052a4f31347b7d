"""Named model shapes (`config.named`): the published Qwen3 config.json values, read by `from_hf`.

Parameter counts come from abstract shapes (`nnx.eval_shape`): nothing is allocated.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from ftjax.models import config
from ftjax.models.transformer import Transformer


def parameter_count(cfg: config.ModelConfig) -> int:
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize(
    ("name", "billions"),
    [("qwen3-0.6b", 0.596), ("qwen3-1.7b", 1.721), ("qwen3-4b", 4.022), ("qwen3-8b", 8.191)],
)
def test_parameter_counts_match_the_published_sizes(name, billions):
    # Hand count for 4B: embedding 151936 x 2560 (tied) + 36 layers x (q 2560x4096, k and v
    # 2560x1024, o 4096x2560, MLP 3 x 2560x9728, norms) = 4.022e9.
    assert parameter_count(config.named(name)) / 1e9 == pytest.approx(billions, abs=1e-3)


def test_named_shapes():
    four, eight = config.named("qwen3-4b"), config.named("qwen3-8b")
    assert (four.num_layers, four.hidden_size, four.intermediate_size) == (36, 2560, 9728)
    assert (eight.num_layers, eight.hidden_size, eight.intermediate_size) == (36, 4096, 12288)
    for cfg in (four, eight):
        assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (32, 8, 128)
        assert cfg.vocab_size == 151936
        assert cfg.family == "qwen3" and cfg.qk_norm and cfg.rope_theta == 1e6
        assert cfg.rope_scaling is None and not cfg.attention_bias
    assert four.tie_embeddings and not eight.tie_embeddings
    assert config.named("qwen3-0.6b").tie_embeddings and config.named("qwen3-1.7b").tie_embeddings
    assert four.max_position_embeddings == 40960
    base = config.named("qwen3-4b-base")
    assert base.max_position_embeddings == 32768 and base.eos_token_ids == (151643,)
    assert base == config.ModelConfig(**{**vars(four), "max_position_embeddings": 32768,
                                         "eos_token_ids": (151643,)})


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model name 'qwen3-5b'.*qwen3-4b"):
        config.named("qwen3-5b")
