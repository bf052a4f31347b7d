"""Logged completions (`ftjax.completions`): the per-token credit they show is the step's own
(gamma as `train.prepare` computes it, tau as `evaluation.throughput` does), the records hold
the batch's rows, and the RL loop writes them on the steps that log."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftjax import completions, credit, evaluation, loop, sampling, sharding, state_init, train
from ftjax.models import config, transformer

B, L, N = 8, 5, 7


def tiny_model():
    return transformer.Transformer(config.tiny("llama", vocab_size=32), rngs=nnx.Rngs(0))


def batch(seed=0) -> train.Batch:
    rng = np.random.default_rng(seed)
    lengths_B = rng.integers(2, N + 1, B)
    response_BxT = np.zeros((B, L + N), bool)
    answer_BxT = np.zeros((B, L + N), bool)
    for b, n in enumerate(lengths_B):
        response_BxT[b, L : L + n] = True
        answer_BxT[b, L + n - 1] = True
    prompt_BxT = np.zeros((B, L + N), bool)
    prompt_BxT[:, 1:L] = True
    return train.Batch(
        tokens_BxT=jnp.asarray(rng.integers(3, 32, (B, L + N)), jnp.int32),
        prompt_mask_BxT=jnp.asarray(prompt_BxT),
        response_mask_BxT=jnp.asarray(response_BxT),
        answer_mask_BxT=jnp.asarray(answer_BxT),
        rewards_B=jnp.asarray(rng.random(B), jnp.float32),
        old_log_probs_BxT=jnp.zeros((B, L + N), jnp.float32),
    )


@pytest.mark.parametrize("micro_batch", [None, 2])
def test_gamma_and_tau_are_the_steps_own(micro_batch):
    cfg = train.StepConfig(group_size=4, micro_batch=micro_batch)
    graphdef, state = state_init.init_state(tiny_model(), cfg, jax.random.PRNGKey(3))
    rollout = batch()
    gamma_BxT, tau_BxT = completions.credit_tokens(graphdef, state, rollout, cfg)
    prepared = train.prepare(graphdef, state, rollout, cfg)  # the step's gamma, several epochs
    np.testing.assert_allclose(gamma_BxT, prepared.gamma_BxT, rtol=1e-6)
    policy = nnx.merge(graphdef, state.params)
    tau_ref, _ = evaluation.throughput(policy, rollout, cfg.capture)
    np.testing.assert_allclose(tau_BxT, tau_ref, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(gamma_BxT)[~np.asarray(rollout.response_mask_BxT)] == 0)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2))  # 4 rows each: 2 passes of 2
    jitted = completions.make_credit_tokens(graphdef, state, rollout, cfg, mesh)
    placed = jax.device_put(state, state_init.state_shardings(state, mesh))
    again = jitted(placed, rollout)
    np.testing.assert_allclose(again[0], gamma_BxT, rtol=1e-6)
    np.testing.assert_allclose(again[1], tau_BxT, rtol=1e-4, atol=1e-6)


def test_a_variant_without_attention_has_no_tau():
    cfg = train.StepConfig(group_size=4, credit=credit.CreditConfig(name="entropy"))
    graphdef, state = state_init.init_state(tiny_model(), cfg, jax.random.PRNGKey(0))
    rollout = batch()
    gamma_BxT, tau_BxT = completions.credit_tokens(graphdef, state, rollout, cfg)
    assert tau_BxT is None
    np.testing.assert_allclose(
        gamma_BxT, train.prepare(graphdef, state, rollout, cfg).gamma_BxT, rtol=1e-6
    )


class Letters:
    """Token i shows as one letter (ids 0-2 as nothing, like padding and specials)."""

    def token_strings(self, ids):
        return ["" if i < 3 else chr(ord("a") + i % 26) for i in ids]


def test_records_hold_each_rows_text_span_and_credit(tmp_path):
    rollout = batch(1)
    names = ("tokens_BxT", "prompt_mask_BxT", "response_mask_BxT", "answer_mask_BxT", "rewards_B")
    host = {name: np.asarray(getattr(rollout, name)) for name in names}
    gamma = np.where(host["response_mask_BxT"], 1.5, 0.0)
    tau = np.where(host["response_mask_BxT"], 0.25, 0.0)
    records = completions.records(Letters(), 7, list(range(B)), host, gamma, tau)
    for b, record in enumerate(records):
        n = int(host["response_mask_BxT"][b].sum())
        response = host["tokens_BxT"][b, L : L + n]
        assert record["step"] == 7 and record["row"] == b
        assert record["tokens"] == Letters().token_strings(response)
        assert record["completion"] == "".join(record["tokens"])
        assert record["prompt"] == "".join(Letters().token_strings(host["tokens_BxT"][b, 1:L]))
        assert record["reward"] == pytest.approx(float(host["rewards_B"][b]))
        assert record["answer_tokens"] == [n - 1] and record["answer"] == record["tokens"][-1]
        assert record["answer_span"] == [n - 1, n]  # one character per token here
        assert record["gamma"] == [1.5] * n and record["tau"] == [0.25] * n
    page = completions.write(tmp_path, 7, records)
    assert page == tmp_path / "completions" / "step_000007.html"
    assert "tau=0.250 gamma=1.500" in page.read_text()
    assert completions.read(tmp_path / "completions.jsonl")[(7, 3)] == records[3]
    no_tau = completions.records(Letters(), 7, list(range(B)), host, gamma, None)
    assert "tau" not in no_tau[0] and completions.samples(no_tau)[1] == "gamma"


def test_due_steps():
    assert [s for s in range(1, 8) if completions.due(s, 3, s == 7)] == [3, 6, 7]
    assert not completions.due(3, 0, True)


class EvenTokens:
    """Reward: the share of even ids in the response; the answer span: its first token."""

    def prompts(self, start, count):
        return [[3 + (i % 5), 4, 5] for i in range(start, start + count)]

    def score(self, prompt, response):
        if not response:
            return 0.0, []
        return float(np.mean([t % 2 == 0 for t in response])), [True] + [False] * (
            len(response) - 1
        )


def test_the_loop_writes_completions_on_the_steps_that_log(tmp_path):
    cfg = loop.LoopConfig(
        steps=3,
        prompts_per_step=2,
        prompt_len=4,
        checkpoint_every=3,
        sampling=sampling.SamplingConfig(max_new_tokens=5, temperature=1.0),
        progress=False,
        log_completions_every=2,
    )
    step_cfg = train.StepConfig(group_size=4, optim=train.OptimConfig(lr=1e-3))
    hook = loop.Evaluation(every=0, fn=lambda model, steps: {"eval/x": 1.0})  # after the last
    history = loop.run(tiny_model(), EvenTokens(), step_cfg, cfg, tmp_path, hook).history
    written = completions.read(tmp_path / "completions.jsonl")
    assert sorted({step for step, _ in written}) == [1, 2]  # 2 steps done, then the evaluation
    assert sorted(row for step, row in written if step == 1) == list(range(8))
    for step in (1, 2):
        rows = [written[(step, row)] for row in range(8)]
        mean = np.mean([r["reward"] for r in rows])
        assert mean == pytest.approx(history[step]["reward_mean"], abs=1e-6)
        assert all(len(r["gamma"]) == len(r["tau"]) == len(r["tokens"]) for r in rows)
        assert all(r["answer_tokens"] == [0] for r in rows if r["tokens"])
        assert (tmp_path / "completions" / f"step_{step:06d}.html").is_file()
        assert "time/completions_s" in history[step]
    assert "time/completions_s" not in history[0]
    lines = (tmp_path / "completions.jsonl").read_text().splitlines()
    assert len(lines) == 16 and all(json.loads(line)["tokens"] is not None for line in lines)
