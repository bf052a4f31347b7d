"""Supervised warm-up: packing layout, the loss against a NumPy float64 reference, and that a
few steps on a fixed batch lower it."""

import numpy as np
import pytest
from flax import nnx

from ftjax import sft
from ftjax.models import config, transformer

PAIRS = [([1, 5, 6], [7, 8, 2]), ([1, 9], [4, 2])]


def test_pack_layout():
    tokens, valid, target = sft.pack(PAIRS, prompt_slots=4, response_slots=4, pad_id=0)
    np.testing.assert_array_equal(tokens, [[0, 1, 5, 6, 7, 8, 2, 0], [0, 0, 1, 9, 4, 2, 0, 0]])
    np.testing.assert_array_equal(valid, tokens != 0)
    np.testing.assert_array_equal(target[:, 4:], [[1, 1, 1, 0], [1, 1, 0, 0]])
    assert not target[:, :4].any()
    with pytest.raises(ValueError, match="over the 2 response slots"):
        sft.pack(PAIRS, prompt_slots=4, response_slots=2, pad_id=0)
    with pytest.raises(ValueError, match="prompt slots"):
        sft.pack(PAIRS, prompt_slots=2, response_slots=4, pad_id=0)


def model():
    return transformer.Transformer(config.tiny("llama", vocab_size=16), rngs=nnx.Rngs(0))


def test_loss_matches_numpy_reference():
    m = model()
    tokens, valid, target = sft.pack(PAIRS, 4, 4, 0)
    logits = np.asarray(m(tokens, valid_BxT=valid).logits_BxTxV, np.float64)
    total, count = 0.0, 0
    for b in range(tokens.shape[0]):
        for t in range(1, tokens.shape[1]):
            if target[b, t]:
                row = logits[b, t - 1]
                log_z = np.log(np.sum(np.exp(row - row.max()))) + row.max()
                total -= row[tokens[b, t]] - log_z
                count += 1
    assert float(sft.loss(m, tokens, valid, target)) == pytest.approx(total / count, rel=1e-5)


def test_warm_up_lowers_the_loss_and_updates_the_model_in_place():
    m = model()
    arrays = sft.pack(PAIRS, 4, 4, 0)
    before = float(sft.loss(m, *arrays))
    seen = []
    cfg = sft.SFTConfig(steps=20, batch_size=2, lr=1e-2, warmup_steps=2)
    out = sft.warm_up(m, lambda start, count: PAIRS, cfg, 4, 4, 0, lambda s, v: seen.append(s))
    assert out is m and seen == list(range(20))
    assert float(sft.loss(m, *arrays)) < 0.5 * before


def test_probe_sees_the_model_as_trained_so_far():
    # Every batch is PAIRS, so the loss on_step reports at step k (before update k + 1) is the
    # loss of the model after k updates: what a probe after k steps must measure.
    m, arrays = model(), sft.pack(PAIRS, 4, 4, 0)
    losses, probed = [], {}
    cfg = sft.SFTConfig(steps=12, batch_size=2, lr=1e-2, warmup_steps=2)
    sft.warm_up(
        m, lambda start, count: PAIRS, cfg, 4, 4, 0, lambda s, v: losses.append(float(v)),
        probe=(4, lambda done, mm: probed.update({done: float(sft.loss(mm, *arrays))})),
    )  # fmt: skip
    assert sorted(probed) == [4, 8, 12]
    for done in (4, 8):
        assert probed[done] == pytest.approx(losses[done], rel=1e-5)
    assert probed[12] == pytest.approx(float(sft.loss(m, *arrays)), rel=1e-6)
    assert probed[4] > probed[12]


@pytest.mark.parametrize(
    "kwargs, field",
    [(dict(steps=0), "steps"), (dict(warmup_steps=600), "warmup_steps"), (dict(lr=0.0), "lr")],
)
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        sft.SFTConfig(**kwargs)
