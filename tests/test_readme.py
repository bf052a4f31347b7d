"""The README's credit-variant example runs as written and behaves as its docstring says."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import credit

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _example_source() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (example,) = [b for b in blocks if "credit.register(" in b]
    return example


def test_readme_credit_example_runs():
    T = 24
    prompt = np.zeros((2, T), bool)
    prompt[:, :6] = True
    response = np.zeros((2, T), bool)
    response[:, 6:22] = True
    answer = np.zeros((2, T), bool)
    answer[:, 19:21] = True
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, T, T))
    attn = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, -jnp.inf), -1)
    inputs = credit.CreditInputs(prompt_mask_BxT=jnp.asarray(prompt),
                                 response_mask_BxT=jnp.asarray(response),
                                 answer_mask_BxT=jnp.asarray(answer), attn_BxTxT=attn)
    namespace = {"inputs": inputs}
    try:
        exec(compile(_example_source(), str(README), "exec"), namespace)
        gamma = np.asarray(namespace["gamma_BxT"])
    finally:
        credit.unregister("late_tokens")
    assert gamma.shape == (2, T)
    assert np.all(gamma[~response] == 0)
    first_half = np.zeros((2, T), bool)
    first_half[:, 6:14] = True
    assert np.all(gamma[first_half] == 1.0)  # only the later half of a response is up-weighted
    assert np.all((gamma[:, 14:22] == 1.0) | (gamma[:, 14:22] == 1.5))
    assert np.all((gamma[:, 14:22] == 1.5).sum(-1) == credit.selection_count(8, 0.4))
