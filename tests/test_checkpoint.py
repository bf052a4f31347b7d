"""Checkpoints: exact round trip, keep-N, refusal of non-finite state, SIGKILL mid-write (blocking
and asynchronous saves), asynchronous saves that finish at exit and fail loudly."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftjax import state_init, train
from ftjax.checkpoint import Checkpointer
from ftjax.models import config, transformer


def make_state(seed=0):
    model = transformer.Transformer(config.tiny("llama"), rngs=nnx.Rngs(seed))
    return state_init.init_state(model, train.StepConfig(), jax.random.PRNGKey(seed))[1]


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_round_trip_is_exact_and_keeps_n(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    states = {step: make_state(step) for step in (1, 2, 3)}
    for step, state in states.items():
        ckpt.save(step, state, {"data_position": 10 * step, "metric_step": step})
    assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
    restored, meta = ckpt.restore(make_state(9))
    assert meta == {"data_position": 30, "metric_step": 3}
    assert isinstance(restored, train.TrainState)
    for got, want in zip(leaves(restored), leaves(states[3]), strict=True):
        np.testing.assert_array_equal(got, want)
    older, meta = ckpt.restore(make_state(9), step=2)
    assert meta["data_position"] == 20
    np.testing.assert_array_equal(leaves(older)[0], leaves(states[2])[0])
    with pytest.raises(ValueError, match="step 1"):
        ckpt.restore(make_state(9), step=1)


def test_empty_directory_and_bad_keep(tmp_path):
    with pytest.raises(ValueError, match="no complete checkpoint"):
        Checkpointer(tmp_path / "none").restore(make_state())
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path, keep=0)


def test_non_finite_state_is_never_saved(tmp_path):
    state = make_state()
    bad = jax.tree.map(lambda x: x, state)
    bad = train.TrainState(params=jax.tree.map(lambda x: x.at[..., 0].set(jnp.nan)
                                               if x.ndim else x, bad.params),
                           opt_state=bad.opt_state, step=bad.step, rng=bad.rng,
                           nonfinite_streak=bad.nonfinite_streak)
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(ValueError, match="non-finite"):
        ckpt.save(1, bad, {})
    assert ckpt.latest_step() is None


CHILD = textwrap.dedent("""
    import sys, numpy as np, jax.numpy as jnp
    from ftjax.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1], async_save=sys.argv[2] == "async")
    ckpt.save(1, {"w": jnp.ones((4,))}, {"step": 1})
    print("saved-1", flush=True)
    ckpt.save(2, {"w": jnp.ones((4,)), "big": jnp.ones((96, 1024, 1024))}, {"step": 2})
    print("saved-2", flush=True)
""")


@pytest.mark.parametrize("mode", ["blocking", "async"])
def test_sigkill_during_write_leaves_previous_checkpoint_loadable(tmp_path, mode):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), mode],
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert child.stdout.readline().strip() == "saved-1"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once the second write's temporary directory exists
        partial = [p.name for p in pathlib.Path(tmp_path).iterdir()
                   if p.name.startswith("2") and "tmp" in p.name]
        if partial:
            break
        time.sleep(0.005)
    else:
        child.kill()
        pytest.fail("the second checkpoint write never started")
    child.send_signal(signal.SIGKILL)
    child.wait()
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == 1
    state, meta = ckpt.restore({"w": jnp.zeros((4,))})
    assert meta == {"step": 1}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.ones(4))


# The child stalls Orbax's background thread after the arrays are written and before the rename
# that makes the checkpoint visible, then keeps stepping: the kill lands mid-save, every time.
ASYNC_CHILD = textwrap.dedent("""
    import sys, time, jax, jax.numpy as jnp
    from orbax.checkpoint._src.checkpointers import async_checkpointer
    from ftjax.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1])
    ckpt.save(1, {"w": jnp.ones((4,))}, {"step": 1})
    ckpt.wait()
    finish = async_checkpointer._background_wait_for_commit_futures
    def stalled(*args, **kwargs):
        time.sleep(600)
        return finish(*args, **kwargs)
    async_checkpointer._background_wait_for_commit_futures = stalled
    w = jnp.full((4,), 2.0)
    ckpt.save(2, {"w": w}, {"step": 2})
    print("returned", flush=True)
    step = jax.jit(lambda w: w + 1, donate_argnums=0)
    for i in range(10**9):
        w = step(w).block_until_ready()
        if i == 10:
            print("stepping", flush=True)
""")


def test_sigkill_during_an_async_save_while_training_leaves_previous_checkpoint_loadable(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", ASYNC_CHILD, str(tmp_path)],
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        assert child.stdout.readline().strip() == "returned"  # save did not wait for the write
        assert child.stdout.readline().strip() == "stepping"  # ... and training goes on
        partial = [p.name for p in tmp_path.iterdir() if p.name.startswith("2.")]
        assert partial and not (tmp_path / "2").exists()  # mid-save: written, not renamed
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    ckpt = Checkpointer(tmp_path)
    assert ckpt.all_steps() == [1]
    state, meta = ckpt.restore({"w": jnp.zeros((4,))})
    assert meta == {"step": 1}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.ones(4))
    ckpt.save(2, {"w": jnp.full((4,), 3.0)}, {"step": 2})  # the leftover does not get in the way
    state, meta = ckpt.restore({"w": jnp.zeros((4,))})
    assert meta == {"step": 2}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full(4, 3.0))
    ckpt.close()


def test_async_save_keeps_the_saved_values_when_the_state_is_donated_at_once(tmp_path):
    """`save` returns before the write; the next step donates (and may overwrite) the state."""
    ckpt = Checkpointer(tmp_path)
    state = make_state(1)
    want = leaves(state)
    ckpt.save(1, state, {"step": 1})
    bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    for _ in range(3):
        state = bump(state)
    restored, meta = ckpt.restore(make_state(9))
    assert meta == {"step": 1}
    for got, expected in zip(leaves(restored), want, strict=True):
        np.testing.assert_array_equal(got, expected)
    ckpt.close()


EXITING_CHILD = textwrap.dedent("""
    import sys, jax.numpy as jnp
    from ftjax.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1])
    ckpt.save(1, {"w": jnp.ones((4,))}, {"step": 1})
    ckpt.save(2, {"w": jnp.full((4,), 2.0), "big": jnp.ones((8, 1024, 1024))}, {"step": 2})
""")  # ... and ends without `close` or `wait`


def test_a_process_that_ends_mid_save_finishes_its_checkpoint(tmp_path):
    done = subprocess.run([sys.executable, "-c", EXITING_CHILD, str(tmp_path)], text=True,
                          capture_output=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Error" not in done.stderr and "Event loop" not in done.stderr, done.stderr[-2000:]
    ckpt = Checkpointer(tmp_path)
    assert ckpt.all_steps() == [1, 2]
    state, meta = ckpt.restore({"w": jnp.zeros((4,)), "big": jnp.zeros((8, 1024, 1024))})
    assert meta == {"step": 2}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full(4, 2.0))


def test_a_failed_async_write_is_raised_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, {"w": jnp.ones((4,))}, {"step": 1})

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(async_checkpointer, "_background_wait_for_commit_futures", disk_full)
    ckpt.save(2, {"w": jnp.full((4,), 2.0)}, {"step": 2})
    with pytest.raises(RuntimeError, match="checkpoint 2 in .* failed to write"):
        ckpt.wait()
    monkeypatch.undo()
    assert ckpt.latest_step() == 1
    state, _ = ckpt.restore({"w": jnp.zeros((4,))})
    np.testing.assert_array_equal(np.asarray(state["w"]), np.ones(4))
    ckpt.close()


def test_restore_verifies_every_array_against_its_saved_checksum(tmp_path):
    """Bits that decode but differ from what was saved (simulated by changing one stored
    checksum) are caught; the record returned to callers does not carry the checksums."""
    import json

    from ftjax.checkpoint import CheckpointDamagedError, checksums

    ckpt = Checkpointer(tmp_path, keep=2)
    state = make_state(1)
    ckpt.save(1, state, {"step": 1})
    _, meta = ckpt.restore(make_state(9))
    assert meta == {"step": 1} and ckpt.meta() == {"step": 1}
    record_file = tmp_path / "1" / "meta" / "metadata"
    record = json.loads(record_file.read_text())
    assert record["checksums"] == checksums(state)
    key = sorted(record["checksums"])[0]
    record["checksums"][key][1] ^= 1
    record_file.write_text(json.dumps(record))
    with pytest.raises(CheckpointDamagedError, match="1 arrays read back other bits"):
        ckpt.restore(make_state(9))
    ckpt.close()


def test_checksums_see_a_single_flipped_bit_and_a_swap():
    from ftjax.checkpoint import checksums

    x = jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 7
    flipped = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(x, jnp.uint32).at[1, 2].add(1), jnp.float32
    )
    swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])
    base = checksums({"x": x})["['x']"]
    assert checksums({"x": flipped})["['x']"][0] != base[0]  # the plain sum moves
    assert checksums({"x": swapped})["['x']"][0] == base[0]  # ... but not for a swap
    assert checksums({"x": swapped})["['x']"][1] != base[1]  # the weighted one does
    assert checksums({"b": jnp.ones(3, bool), "h": jnp.ones(3, jnp.bfloat16)})  # every dtype
