"""The README's credit-variant example runs as written and behaves as its docstring says."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def _reward_example() -> tuple[str, list[list[str]]]:
    """(the reward file's source, the commands of the block that runs it, as argv lists)."""
    import shlex

    text = README.read_text()
    (source,) = [
        b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "# my_rewards.py" in b
    ]
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S) if "--reward" in b]
    lines = block.replace("\\\n", " ").splitlines()
    return source, [shlex.split(line, comments=True) for line in lines if line.strip()]


def test_readme_reward_function_drives_math_rl(tmp_path, monkeypatch):
    """The README's reward file and commands, as written, in a fresh directory: the run's
    completions carry the function's rewards and the answer spans it gave."""
    import importlib
    import json

    source, commands = _reward_example()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(source)
    for argv in commands:
        assert argv[:2] == ["python", "-m"], argv
        importlib.import_module(argv[2]).main(argv[3:])
    namespace = {}
    exec(compile(source, "my_rewards.py", "exec"), namespace)
    truths = {}
    for line in (tmp_path / "data" / "arith" / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        truths[row["question"]] = row["answer"].rpartition("####")[2].strip()
    records = [
        json.loads(line)
        for line in (tmp_path / "runs" / "my_reward" / "completions.jsonl").read_text().splitlines()
    ]
    assert sorted({r["step"] for r in records}) == [0, 1]
    for record in records:
        (truth,) = [t for q, t in truths.items() if q in record["prompt"]]
        (score,), (span,) = namespace["right_and_brief"](
            [record["prompt"]], [record["completion"]], [truth]
        )
        assert record["reward"] == pytest.approx(score, abs=1e-6)
        assert "".join(record["tokens"]) == record["completion"]
        if span is not None:  # the answer tokens cover the number the function pointed at
            assert record["completion"][span[0] : span[1]] in record["answer"]
    assert (tmp_path / "runs" / "my_reward" / "completions" / "step_000001.html").is_file()
