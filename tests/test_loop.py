"""The RL loop end to end on a tiny model: it learns nothing in 4 steps, but it must run, log what
it returns, checkpoint, and resume to exactly the same metrics."""

import dataclasses
import json
import pathlib

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from ftjax import (
    credit,
    loop,
    mesh_step,
    rl,
    rollout,
    rundir,
    sampling,
    sharding,
    state_init,
    train,
)
from ftjax.logging import read_jsonl
from ftjax.models import config, transformer
from ftjax.tasks.chain import ChainConfig, ChainTask


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


class EvenTokensTask(EchoTask):
    """A dense reward: the share of even token ids in the response (so every group varies)."""

    def score(self, prompt, response):
        if not response:
            return 0.0, []
        reward = float(np.mean([t % 2 == 0 for t in response]))
        return reward, [True] + [False] * (len(response) - 1)


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


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted 4-step run: (its returned metrics, its run directory)."""
    run_dir = tmp_path_factory.mktemp("full")
    return loop.run(fresh_model(), EchoTask(), STEP, loop_cfg(4), run_dir).history, run_dir


def test_loop_runs_logs_and_resumes_exactly(tmp_path, full_run):
    full, full_dir = full_run
    assert sorted(full) == [0, 1, 2, 3]
    assert read_jsonl(full_dir / "metrics.jsonl") == full
    assert all(np.isfinite(m["loss"]) and m["skipped_nonfinite"] == 0 for m in full.values())

    first = loop.run(fresh_model(), EchoTask(), STEP, loop_cfg(2), tmp_path / "resumed").history
    second = loop.run(fresh_model(), EchoTask(), STEP, loop_cfg(4), tmp_path / "resumed").history
    assert sorted(first) == [0, 1] and sorted(second) == [2, 3]
    for step in range(4):
        assert exact({**first, **second}[step]) == exact(full[step]), step  # bitwise, on CPU
    assert all(m["time/step_s"] > 0 and m["time/rollout_s"] > 0 for m in full.values())


def test_prompt_longer_than_its_slots_is_rejected():
    with pytest.raises(ValueError, match="over the 3 prompt slots"):
        rollout.left_pad([[1, 2], [1, 2, 3, 4]], 3, 0)
    with pytest.raises(ValueError):
        loop.LoopConfig(steps=0)


class StallingEchoTask(EchoTask):
    """EchoTask that pauses before producing step 2's prompts (for `pause` seconds): another
    process can act on the run directory there."""

    pause = 600.0  # the SIGKILL test kills it during the pause

    def prompts(self, start, count):
        if start == 2 * count:
            import time

            time.sleep(self.pause)
        return super().prompts(start, count)


class SlowEchoTask(StallingEchoTask):
    pause = 6.0  # long enough for a second run to try the directory, then it finishes


def start_loop_process(task: str, run_dir: pathlib.Path):
    """A separate process running `loop.run(fresh_model(), task(), STEP, loop_cfg(4), run_dir)`,
    and a function that waits until its checkpoint 2 is written and it is paused after it."""
    import os
    import subprocess
    import sys
    import time

    script = (
        "import sys\n"
        f"from tests.test_loop import STEP, {task}, fresh_model, loop_cfg\n"
        "from ftjax import loop\n"
        f"loop.run(fresh_model(), {task}(), STEP, loop_cfg(4), sys.argv[1])\n"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(run_dir)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )

    def wait_for_checkpoint_2():
        checkpoint = run_dir / "checkpoints" / "2"
        deadline = time.time() + 300
        while not (checkpoint.is_dir() and child.poll() is None and any(checkpoint.iterdir())):
            if time.time() > deadline or child.poll() is not None:
                child.kill()
                pytest.fail("the child never wrote checkpoint 2 (or exited)")
            time.sleep(0.2)
        time.sleep(1.0)  # it is now paused inside step 2's prompts, after the checkpoint

    return child, wait_for_checkpoint_2


def test_sigkilled_run_resumes_to_the_same_metrics(tmp_path, full_run):
    import signal

    run_dir = tmp_path / "killed"
    child, wait_for_checkpoint_2 = start_loop_process("StallingEchoTask", run_dir)
    wait_for_checkpoint_2()
    child.send_signal(signal.SIGKILL)
    child.wait()
    resumed = loop.run(fresh_model(), EchoTask(), STEP, loop_cfg(4), run_dir).history
    full, _ = full_run
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
    with pytest.raises(
        RuntimeError,
        match=r"2 non-finite steps in a row at step 1 \(non-finite "
        r"the task's rewards\)",
    ):
        loop.run(fresh_model(), NanRewardTask(), step_cfg, loop_cfg(4), tmp_path)
    logged = read_jsonl(tmp_path / "metrics.jsonl")
    assert [logged[s]["skipped_nonfinite"] for s in (0, 1)] == [1.0, 1.0]
    assert not (tmp_path / "checkpoints" / "2").exists()  # it stopped before checkpointing


# ----------------------------------------------------------------------------- KL to a reference

KL_STEP = dataclasses.replace(STEP, loss=rl.LossConfig(kl_coef=0.5))


def test_kl_run_trains_against_the_initial_policy_and_resumes_exactly(tmp_path):
    full = loop.run(fresh_model(), EchoTask(), KL_STEP, loop_cfg(4), tmp_path / "full").history
    # Step 0's policy is the reference itself: k3 is exp(0) - 0 - 1 = 0 on every token.
    assert full[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(full[s]["kl"] > 1e-6 and np.isfinite(full[s]["loss"]) for s in (1, 2, 3))
    # Resumed from step 2, the reference is still the model passed in, not the checkpoint.
    loop.run(fresh_model(), EchoTask(), KL_STEP, loop_cfg(2), tmp_path / "resumed")
    second = loop.run(fresh_model(), EchoTask(), KL_STEP, loop_cfg(4), tmp_path / "resumed")
    for step in (2, 3):
        assert exact(second.history[step]) == exact(full[step]), step


# ----------------------------------------------------------------------------- epochs, minibatches


def test_epochs_and_minibatches_use_prepare_and_update_per_minibatch(tmp_path, monkeypatch):
    traced = []
    original = train.prepare

    def counting_prepare(*args, **kwargs):
        traced.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "prepare", counting_prepare)
    cfg = dataclasses.replace(loop_cfg(2), epochs=2, minibatches=2, prompts_per_step=4)
    result = loop.run(fresh_model(), EchoTask(), STEP, cfg, tmp_path)
    assert traced  # the old log-probs and credit came from train.prepare
    assert int(result.state.step) == 2 * 2 * 2  # steps x epochs x minibatches optimizer updates
    assert all(np.isfinite(m["loss"]) for m in result.history.values())
    assert read_jsonl(tmp_path / "metrics.jsonl") == result.history


def test_first_minibatch_update_equals_the_fused_step():
    """The loop's first update of a rollout batch (prepared old log-probs and credit, minibatch
    0) and the fused train step on the same rows (credit computed inside the step) agree."""
    model = fresh_model()
    cfg = dataclasses.replace(loop_cfg(1), minibatches=2, prompts_per_step=4)
    mesh = sharding.make_mesh(cfg.mesh)
    task = EvenTokensTask()
    prompts = [p for p in task.prompts(0, 4) for _ in range(STEP.group_size)]
    prompt_BxL, valid_BxL = rollout.left_pad(prompts, cfg.prompt_len, 0)
    generated = sampling.generate(model, prompt_BxL, valid_BxL, jax.random.PRNGKey(3), cfg.sampling)
    batch = rollout.rollout_batch(task, prompts, generated, prompt_BxL, valid_BxL, group_size=1)
    assert batch.response_start == cfg.prompt_len  # log-probs are made from there on
    assert not np.asarray(batch.response_mask_BxT)[:, : cfg.prompt_len].any()

    graphdef, state = state_init.init_state(model, STEP, jax.random.PRNGKey(0))
    updates, placed = loop.Updates.build(graphdef, state, model, STEP, cfg, mesh)
    prepared = updates.prepare(placed, batch)
    after_prepared, prepared_metrics = updates.step(placed, updates.minibatch(prepared, 0))

    half = jax.tree.map(lambda x: x[: len(prompts) // 2], batch)
    graphdef, state = state_init.init_state(fresh_model(), STEP, jax.random.PRNGKey(0))
    fused_fn, fused_state = mesh_step.make_train_step(graphdef, state, half, STEP, mesh)
    after_fused, fused_metrics = fused_fn(fused_state, half)
    assert float(fused_metrics["grad_norm"]) > 1e-3  # rewards vary: the update is not empty
    # Old log-probs differ only by the sampler's vs the train forward's float32 rounding. On
    # policy the surrogate is a sum of advantages that cancel within each group: the loss is
    # ~1e-8 on both sides, so it is compared with an absolute tolerance.
    for key in ("grad_norm", "credit/gamma_mean", "reward_mean", "ratio_mean"):
        np.testing.assert_allclose(
            float(prepared_metrics[key]), float(fused_metrics[key]), rtol=1e-5, err_msg=key
        )
    np.testing.assert_allclose(
        float(prepared_metrics["loss"]), float(fused_metrics["loss"]), atol=1e-6
    )
    # Adam's first update is about lr * sign(g) per entry: an entry whose gradient is near zero
    # turns float32 rounding into up to ~1e-6 of movement. 1e-5 is 1% of one lr=1e-3 update (as
    # in test_train's sharded == single-device check).
    chex.assert_trees_all_close(after_prepared.params, after_fused.params, atol=1e-5)


def test_minibatches_must_hold_whole_groups():
    with pytest.raises(ValueError, match="minibatches"):
        dataclasses.replace(loop_cfg(1), prompts_per_step=3, minibatches=2)
    with pytest.raises(ValueError, match="epochs"):
        dataclasses.replace(loop_cfg(1), epochs=0)


# ----------------------------------------------------------------------------- run identity, lock

UNIFORM_STEP = dataclasses.replace(STEP, credit=credit.CreditConfig(name="uniform"))


def test_resume_with_another_credit_is_refused_and_config_json_kept(tmp_path):
    loop.run(fresh_model(), EchoTask(), STEP, loop_cfg(2), tmp_path)
    written = (tmp_path / "config.json").read_text()
    with pytest.raises(ValueError, match=r"step\.credit\.name .*flowtracer.*uniform"):
        loop.run(fresh_model(), EchoTask(), UNIFORM_STEP, loop_cfg(4), tmp_path)
    wider = transformer.Transformer(
        config.tiny("llama", vocab_size=32, hidden_size=48, num_heads=4, head_dim=12),
        rngs=nnx.Rngs(0),
    )
    with pytest.raises(ValueError, match=r"model\.hidden_size"):  # before any restore
        loop.run(wider, EchoTask(), STEP, loop_cfg(4), tmp_path)
    assert (tmp_path / "config.json").read_text() == written
    assert sorted(read_jsonl(tmp_path / "metrics.jsonl")) == [0, 1]  # nothing was trained
    assert not (tmp_path / "config_history.jsonl").exists()


def test_allowed_change_is_recorded_and_training_continues(tmp_path):
    loop.run(fresh_model(), EchoTask(), STEP, loop_cfg(2), tmp_path)
    allow = ("step.credit.name",)
    result = loop.run(fresh_model(), EchoTask(), UNIFORM_STEP, loop_cfg(3), tmp_path, allow=allow)
    assert sorted(result.history) == [2]
    (record,) = [json.loads(line) for line in (tmp_path / "config_history.jsonl").open()]
    assert record["step"] == 2
    assert record["changes"]["step.credit.name"] == {"was": '"flowtracer"', "now": '"uniform"'}
    assert record["changes"]["loop.steps"] == {"was": "2", "now": "3"}  # volatile, still logged
    assert json.loads((tmp_path / "config.json").read_text())["step.credit.name"] == '"uniform"'


def test_second_run_on_a_directory_in_use_is_refused_and_the_first_finishes(tmp_path, full_run):
    run_dir = tmp_path / "shared"
    child, wait_for_checkpoint_2 = start_loop_process("SlowEchoTask", run_dir)
    try:
        wait_for_checkpoint_2()
        with pytest.raises(rundir.RunDirInUseError, match=f"in use by pid {child.pid} on "):
            loop.run(fresh_model(), EchoTask(), STEP, loop_cfg(4), run_dir)
        assert child.wait(timeout=600) == 0
    finally:
        child.kill()
    full, _ = full_run
    logged = read_jsonl(run_dir / "metrics.jsonl")
    assert sorted(logged) == [0, 1, 2, 3]
    for step in range(4):
        assert exact(logged[step]) == exact(full[step]), step
    assert not (run_dir / rundir.LOCK).exists()  # released at the end


def test_stale_lock_from_a_dead_process_is_taken_over(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp_path.mkdir(exist_ok=True)
    lock = tmp_path / rundir.LOCK
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": 0}))
    result = loop.run(fresh_model(), EchoTask(), STEP, loop_cfg(1), tmp_path)
    assert sorted(result.history) == [0] and not lock.exists()
    lock.write_text(json.dumps({"pid": 1, "host": "another-host", "since": 0}))
    with pytest.raises(rundir.RunDirInUseError, match="another-host"):  # not checkable: refused
        loop.run(fresh_model(), EchoTask(), STEP, loop_cfg(2), tmp_path)


# ----------------------------------------------------------------------------- damaged checkpoints


def damage(step_dir: pathlib.Path, how: str) -> None:
    # Every data file is damaged: Orbax may leave more than one, and damage to a file the
    # restore does not read would leave the checkpoint intact (the test would then fail by luck).
    files = sorted((step_dir / "state").rglob("d/*"))
    assert files, step_dir
    for data in files if how in ("corrupt", "truncate") else ():
        raw = bytearray(data.read_bytes())
        if how == "corrupt":  # 400 bytes overwritten in the middle
            middle = len(raw) // 2
            raw[middle : middle + 400] = bytes(b ^ 0x5A for b in raw[middle : middle + 400])
        else:
            raw = raw[: len(raw) // 2]
        data.write_bytes(bytes(raw))
    if how == "no_state_metadata":
        (step_dir / "state" / "_METADATA").unlink()
    elif how == "no_record":
        (step_dir / "meta" / "metadata").unlink()


def test_damaged_checkpoints_fall_back_to_the_newest_intact_one(tmp_path, capfd):
    every = dict(checkpoint_every=1, keep_checkpoints=5)
    cfg = dataclasses.replace(loop_cfg(5), **every)
    full = loop.run(fresh_model(), EchoTask(), STEP, cfg, tmp_path / "full").history
    run_dir = tmp_path / "damaged"
    loop.run(fresh_model(), EchoTask(), STEP, cfg, run_dir)
    kinds = {5: "corrupt", 4: "truncate", 3: "no_state_metadata", 2: "no_record"}
    for step, how in kinds.items():
        damage(run_dir / "checkpoints" / str(step), how)
    capfd.readouterr()
    resumed = loop.run(fresh_model(), EchoTask(), STEP, cfg, run_dir).history
    assert sorted(resumed) == [1, 2, 3, 4]  # from checkpoint 1, the newest intact one
    for step in resumed:
        assert exact(resumed[step]) == exact(full[step]), step
    reports = [line for line in capfd.readouterr().err.splitlines() if "falling back" in line]
    assert len(reports) == 4, reports  # one line per damaged checkpoint, newest first
    for line, (step, _) in zip(reports, kinds.items(), strict=True):
        assert line.startswith(f"checkpoint {step} in ") and f"checkpoint {step - 1}" in line
    # Overwritten bytes fail zstd's decoding or, where they decode, the checksums.
    assert "unreadable" in reports[0] or "other bits than were saved" in reports[0]
    assert sorted(p.name for p in (run_dir / "damaged_checkpoints").iterdir()) == [
        "2", "3", "4", "5"
    ]  # fmt: skip
    # The run wrote steps 2-5 again; resuming once more restores its own step 5.
    again = loop.run(fresh_model(), EchoTask(), STEP, cfg, run_dir)
    assert again.history == {} and int(again.state.step) == 5


def test_a_step_that_cannot_fit_is_refused_before_the_first_rollout(tmp_path, monkeypatch):
    """On a device that reports its memory (GPU, TPU), the planned step is compared with it."""
    monkeypatch.setattr(mesh_step, "device_memory_limit", lambda mesh: 2**20)  # a 1 MiB device
    with pytest.raises(ValueError, match=r"plans .* GiB per device, over the device's 0.00 GiB"):
        loop.run(fresh_model(), EchoTask(), STEP, loop_cfg(1), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- oracle: task labels

ORACLE_STEP = dataclasses.replace(STEP, credit=credit.CreditConfig(name="oracle", gamma=2.0))


class LabelSpyChain(ChainTask):
    """The chain task, recording (response length, labelled tokens) of every `labels` call. An
    untrained policy writes no well-formed statement, so every chain label would be False: every
    third response token is labelled too, so that the shares tell the rows apart."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.seen = []

    def labels(self, prompt, response):
        chain = super().labels(prompt, response)
        labels = [on or i % 3 == 0 for i, on in enumerate(chain)]
        self.seen.append((len(response), sum(labels)))
        return labels


def chain_batch(task, rows: int, labels: bool) -> tuple[train.Batch, int]:
    """A rollout batch whose responses are the task's solver traces (so labels are not all
    False), 8 tokens of every response cut off to keep it small; and the prompt slots."""
    pairs = task.demonstrations(0, rows)
    prompts = [p for p, _ in pairs]
    responses = [r[:-8] for _, r in pairs]
    L, N = max(map(len, prompts)), max(map(len, responses))
    tokens_BxN = np.zeros((rows, N), np.int32)
    for b, r in enumerate(responses):
        tokens_BxN[b, : len(r)] = r
    generated = sampling.Rollout(
        tokens_BxN=tokens_BxN,
        log_probs_BxN=np.zeros((rows, N), np.float32),
        lengths_B=np.asarray([len(r) for r in responses]),
        done_B=np.zeros(rows, bool),
    )
    prompt_BxL, valid_BxL = rollout.left_pad(prompts, L, task.pad_id)
    batch = rollout.rollout_batch(
        task, prompts, generated, prompt_BxL, valid_BxL, group_size=1, labels=labels
    )
    return batch, L


def test_rollout_labels_and_the_oracle_step():
    """Labels land at the response's columns; the oracle step up-weights exactly them (on the
    8-device mesh); without labels the step is refused, naming the variant and `labels`."""
    task = ChainTask(ChainConfig(chain_length=2, distractors=1))
    batch, L = chain_batch(task, 8, labels=True)
    assert chain_batch(task, 8, labels=False)[0].labels_BxT is None
    labels_BxT = np.asarray(batch.labels_BxT)
    response_BxT = np.asarray(batch.response_mask_BxT)
    assert not np.any(labels_BxT & ~response_BxT)
    for b, (prompt, _) in enumerate(task.demonstrations(0, 8)):
        n = int(response_BxT[b].sum())
        response = np.asarray(batch.tokens_BxT)[b, L : L + n].tolist()
        assert labels_BxT[b, L : L + n].tolist() == task.labels(prompt, response)
    share = labels_BxT.sum() / response_BxT.sum()
    assert 0.2 < share < 0.9

    model = transformer.Transformer(config.tiny("llama", vocab_size=52), rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh(sharding.MeshConfig())
    graphdef, state = state_init.init_state(model, ORACLE_STEP, jax.random.PRNGKey(0))
    step_fn, placed = mesh_step.make_train_step(graphdef, state, batch, ORACLE_STEP, mesh)
    _, metrics = step_fn(placed, batch)
    assert float(metrics["credit/selected_fraction"]) == pytest.approx(share, rel=1e-6)
    assert float(metrics["credit/gamma_mean"]) == pytest.approx(1.0 + share, rel=1e-6)
    unlabelled = dataclasses.replace(batch, labels_BxT=None)
    with pytest.raises(ValueError, match=r"'oracle' reads ground-truth labels.*task must provide"):
        mesh_step.make_train_step(graphdef, state, unlabelled, ORACLE_STEP, mesh)


def test_rollout_labels_from_a_task_without_them_are_refused():
    class Unlabelled(ChainTask):
        def labels(self, prompt, response):
            return None

    class Short(ChainTask):
        def labels(self, prompt, response):
            return super().labels(prompt, response)[:-1]

    with pytest.raises(ValueError, match="task EchoTraced has no `labels"):
        chain_batch(EchoTraced(), 2, labels=True)
    with pytest.raises(ValueError, match="task Unlabelled has no ground-truth labels"):
        chain_batch(Unlabelled(), 2, labels=True)
    with pytest.raises(ValueError, match="task Short labels have"):
        chain_batch(Short(), 2, labels=True)


class EchoTraced(EchoTask):
    """EchoTask (no `labels`) with made-up traces, for `chain_batch`."""

    pad_id = 0

    def demonstrations(self, start, count):
        return [(p, [1] * 12) for p in self.prompts(start, count)]


def test_oracle_on_a_task_without_labels_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"'oracle' reads .* task EchoTask has no `labels"):
        loop.run(fresh_model(), EchoTask(), ORACLE_STEP, loop_cfg(1), tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_oracle_trains_on_the_chain_tasks_labels(tmp_path):
    """Two steps of prepared credit over two minibatches (labels ride through the sharded
    rollout batch, `prepare` and the minibatch slices); each update's selected share is that
    of the labels the task gave its rows."""
    task = LabelSpyChain(ChainConfig(chain_length=1, distractors=0))
    cfg = dataclasses.replace(
        loop_cfg(2),
        prompts_per_step=4,
        minibatches=2,
        prompt_len=12,
        sampling=rollout.sampling_config(task, max_new_tokens=8, temperature=1.0),
    )
    model = transformer.Transformer(config.tiny("llama", vocab_size=52), rngs=nnx.Rngs(0))
    history = loop.run(model, task, ORACLE_STEP, cfg, tmp_path).history
    rows = cfg.prompts_per_step * ORACLE_STEP.group_size
    assert len(task.seen) == 2 * rows  # every row of every step labelled once
    for step in (0, 1):
        seen = task.seen[step * rows : (step + 1) * rows]
        shares = [
            sum(k for _, k in part) / sum(n for n, _ in part)
            for part in (seen[: rows // 2], seen[rows // 2 :])
        ]
        assert 0.3 < np.mean(shares) < 0.6
        got = history[step]["credit/selected_fraction"]
        assert got == pytest.approx(np.mean(shares), abs=1e-6)
        assert np.isfinite(history[step]["loss"])
