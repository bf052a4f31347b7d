"""The RL loop end to end on a tiny model: it learns nothing in 4 steps, but it must run, log what
it returns, checkpoint, and resume to exactly the same metrics."""

import numpy as np
import pytest
from flax import nnx

from ftjax import credit, loop, sampling, train
from ftjax.logging import read_jsonl
from ftjax.models import config, transformer


class EchoTask:
    """Reward 1 when the first response token repeats the prompt's last token (the answer)."""

    def prompts(self, start, count):
        out = []
        for index in range(start, start + count):
            rng = np.random.default_rng(index)
            out.append(rng.integers(1, 20, rng.integers(3, 7)).tolist())
        return out

    def score(self, prompt, response):
        if not response:
            return 0.0, []
        return float(response[0] == prompt[-1]), [True] + [False] * (len(response) - 1)


STEP = train.StepConfig(
    group_size=4, credit=credit.CreditConfig(name="flowtracer"), optim=train.OptimConfig(lr=1e-3)
)


def loop_cfg(steps):
    return loop.LoopConfig(
        steps=steps,
        prompts_per_step=2,
        prompt_len=8,
        checkpoint_every=2,
        sampling=sampling.SamplingConfig(max_new_tokens=6, temperature=1.0),
        progress=False,
    )


def exact(metrics):
    """The metrics that must repeat bitwise (wall-clock `time/*` ones cannot)."""
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}


def fresh_model():
    return transformer.Transformer(config.tiny("llama", vocab_size=32), rngs=nnx.Rngs(0))


def test_loop_runs_logs_and_resumes_exactly(tmp_path):
    full = loop.run(fresh_model(), EchoTask(), STEP, loop_cfg(4), tmp_path / "full")
    assert sorted(full) == [0, 1, 2, 3]
    assert read_jsonl(tmp_path / "full" / "metrics.jsonl") == full
    assert all(np.isfinite(m["loss"]) and m["skipped_nonfinite"] == 0 for m in full.values())

    first = loop.run(fresh_model(), EchoTask(), STEP, loop_cfg(2), tmp_path / "resumed")
    second = loop.run(fresh_model(), EchoTask(), STEP, loop_cfg(4), tmp_path / "resumed")
    assert sorted(first) == [0, 1] and sorted(second) == [2, 3]
    for step in range(4):
        assert exact({**first, **second}[step]) == exact(full[step]), step  # bitwise, on CPU
    assert all(m["time/step_s"] > 0 and m["time/rollout_s"] > 0 for m in full.values())


def test_prompt_longer_than_its_slots_is_rejected():
    with pytest.raises(ValueError, match="over the 3 prompt slots"):
        loop.left_pad([[1, 2], [1, 2, 3, 4]], 3, 0)
    with pytest.raises(ValueError):
        loop.LoopConfig(steps=0)


class StallingEchoTask(EchoTask):
    """EchoTask that hangs before producing step 2's prompts: the test SIGKILLs it there."""

    def prompts(self, start, count):
        if start >= 2 * count:
            import time

            time.sleep(600)
        return super().prompts(start, count)


CHILD = """
import sys
from tests.test_loop import STEP, StallingEchoTask, fresh_model, loop_cfg
from ftjax import loop
loop.run(fresh_model(), StallingEchoTask(), STEP, loop_cfg(4), sys.argv[1])
"""


def test_sigkilled_run_resumes_to_the_same_metrics(tmp_path):
    import os
    import pathlib
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "killed"
    root = pathlib.Path(__file__).resolve().parents[1]
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(run_dir)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    checkpoint = run_dir / "checkpoints" / "2"
    deadline = time.time() + 300
    while not (checkpoint.is_dir() and child.poll() is None and any(checkpoint.iterdir())):
        if time.time() > deadline or child.poll() is not None:
            child.kill()
            pytest.fail("the child never wrote checkpoint 2 (or exited)")
        time.sleep(0.2)
    time.sleep(1.0)  # it is now stalled inside step 2's prompts, after the checkpoint
    child.send_signal(signal.SIGKILL)
    child.wait()
    resumed = loop.run(fresh_model(), EchoTask(), STEP, loop_cfg(4), run_dir)
    full = loop.run(fresh_model(), EchoTask(), STEP, loop_cfg(4), tmp_path / "full")
    assert sorted(resumed) == [2, 3]
    for step in (2, 3):
        assert exact(resumed[step]) == exact(full[step]), step
    logged = read_jsonl(run_dir / "metrics.jsonl")
    assert sorted(logged) == [0, 1, 2, 3] and exact(logged[3]) == exact(full[3])


class NanRewardTask(EchoTask):
    def score(self, prompt, response):
        reward, span = super().score(prompt, response)
        return float("nan"), span


def test_non_finite_streak_stops_the_run_and_keeps_no_bad_state(tmp_path):
    step_cfg = train.StepConfig(
        group_size=4,
        credit=credit.CreditConfig(name="uniform"),
        optim=train.OptimConfig(lr=1e-3, max_nonfinite_steps=2),
    )
    with pytest.raises(RuntimeError, match="2 non-finite steps in a row at step 1"):
        loop.run(fresh_model(), NanRewardTask(), step_cfg, loop_cfg(4), tmp_path)
    logged = read_jsonl(tmp_path / "metrics.jsonl")
    assert [logged[s]["skipped_nonfinite"] for s in (0, 1)] == [1.0, 1.0]
    assert not (tmp_path / "checkpoints" / "2").exists()  # it stopped before checkpointing
