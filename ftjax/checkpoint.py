"""Orbax checkpoints of everything a run needs to continue exactly; atomic, N latest kept.

A checkpoint holds a state (an RL run's whole train state, or a warm-up's parameters alone) and a
JSON record: the step, and `kind` (`TRAIN_STATE` or `PARAMS`), which says which of the two the
state is, so a policy is restored from either without guessing. Orbax writes
into a temporary directory and renames it when complete, so a crash or SIGKILL mid-write leaves the
previous checkpoint as the latest loadable one. A state with a non-finite value is never written.

Saves are asynchronous (Orbax's async checkpointing): `save` returns once the state is copied to
host memory, and the write, the rename and the deletion of old checkpoints continue on a
background thread while training goes on. The next `save`, every read through the same
`Checkpointer`, `wait` and `close` first wait for it to finish (and raise if it failed); so does
the interpreter at exit (the writer threads are not daemons). A SIGKILL mid-write leaves a
temporary directory that is never listed, exactly as with a blocking save.

Every saved array's checksum is stored in the record and verified on restore: a damaged,
truncated or incomplete checkpoint is reported in one line and `restore_intact` falls back to the
newest one that verifies, moving the damaged one aside (`damaged_checkpoints/` next to the
checkpoint directory) so that the run can write that step again. The checksums are wrap-around
uint32 sums of each array's raw bits, plain and position-weighted: exact integer arithmetic, so
the same on any mesh and any number of hosts; they catch damage, not tampering.

Multi-process, every method is collective: every process calls it, with the same arguments, on a
directory they all see. Each process writes the shards it holds; Orbax lets process 0 alone
create, finalise (rename) and delete checkpoint directories.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401 (registers its exit hook before ours: see below)
import pathlib
import shutil
import sys
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

TRAIN_STATE, PARAMS = "train_state", "params"  # the `kind` a checkpoint's record names


class CheckpointDamagedError(ValueError):
    """A checkpoint that cannot be read back, or reads back other bits than were saved."""


def _bits_u32(x):
    """Each element's raw bits as uint32 (narrower types widened, bool as 0/1)."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_ or x.dtype.itemsize == 1:
        return x.astype(jnp.uint32)
    if x.dtype.itemsize == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    if x.dtype.itemsize == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    raise ValueError(f"cannot checksum dtype {x.dtype}")


@jax.jit
def _summaries(leaves):
    """[leaf, 3]: each leaf's plain and position-weighted uint32 sums of its bits, and whether
    every value is finite (1 or 0). One array, so the host fetches it in one transfer."""

    def one(x):
        bits = _bits_u32(x).reshape(-1)
        weight = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
        plain, weighted = jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weight, dtype=jnp.uint32)
        x = jnp.asarray(x)
        finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else True
        return jnp.stack([plain, weighted, jnp.asarray(finite, jnp.uint32)])

    return jnp.stack([one(x) for x in leaves])


def summaries(state) -> tuple[dict[str, list[int]], list[str]]:
    """(`checksums(state)`, the paths of leaves holding a non-finite value), in one device sync."""
    if not jax.tree.leaves(state):
        return {}, []
    paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(state), strict=True)
    rows = jax.device_get(_summaries(list(leaves))).tolist()
    names = [jax.tree_util.keystr(path) for path in paths]
    bad = [name for name, row in zip(names, rows, strict=True) if not row[2]]
    return {name: row[:2] for name, row in zip(names, rows, strict=True)}, bad


def checksums(state) -> dict[str, list[int]]:
    """Leaf path -> [sum of bits, position-weighted sum of bits], each mod 2^32."""
    return summaries(state)[0]


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {text[0] if text else ''}"
    return line if len(line) <= 160 else line[:157] + "..."


_PENDING: set[Checkpointer] = set()  # those whose last save may still be writing


def _finish_pending_saves() -> None:
    """Wait for every pending save. Runs when the main thread ends, before the interpreter shuts
    the thread pools the writers use (which would fail a write still running), so a process that
    ends without `close` still finishes its last checkpoint."""
    for checkpointer in list(_PENDING):
        try:
            checkpointer.wait()
        except Exception as error:  # at exit there is no caller left to raise to
            print(f"at exit: {_first_line(error)}", file=sys.stderr, flush=True)


# CPython's hook for "before joining threads" (what concurrent.futures uses to shut its pools);
# hooks run in reverse order of registration, so ours, registered after that module's, runs first.
# It is private: where an interpreter lacks it, plain atexit (later, but better than nothing).
getattr(threading, "_register_atexit", atexit.register)(_finish_pending_saves)


class Checkpointer:
    """`async_save=False` makes every `save` block until its checkpoint is on disk."""

    def __init__(self, directory: str | pathlib.Path, keep: int = 3, async_save: bool = True):
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {keep!r}")
        self.directory = pathlib.Path(directory).absolute()
        # Every array is copied to host memory before `save` returns (Orbax's default with no
        # device-to-host byte limit), so the train step may donate and overwrite the state.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._pending: int | None = None  # the step whose write may still be running

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        """Start writing `state` and `meta` (JSON-serialisable, plus the state's checksums) as
        checkpoint `step`, after the previous save has finished; returns once the state is copied
        to host memory (see the module docstring)."""
        sums, bad = summaries(state)
        if bad:
            raise ValueError(f"refusing to checkpoint a state with non-finite values in {bad[:5]}")
        self.wait()
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave({**meta, "checksums": sums}),
        )
        self._manager.save(step, args=args, force=True)
        self._pending = step
        _PENDING.add(self)

    def wait(self) -> None:
        """Block until the pending save (if any) is on disk; raise if it failed (the previous
        checkpoint is then still the latest)."""
        step, self._pending = self._pending, None
        _PENDING.discard(self)
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            raise RuntimeError(
                f"checkpoint {step} in {self.directory} failed to write ({_first_line(error)})"
            ) from error
        if step is not None:  # a write that failed in a way Orbax only logs is left unlisted
            self._manager.reload()
            steps = self._manager.all_steps()
            if step not in steps and not any(s > step for s in steps):  # (not pruned by `keep`)
                raise RuntimeError(
                    f"checkpoint {step} in {self.directory} failed to write (see the log above)"
                )

    def latest_step(self) -> int | None:
        self.wait()
        self._manager.reload()
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        self.wait()
        self._manager.reload()
        return list(self._manager.all_steps())

    def _check_step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"no complete checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise ValueError(
                f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}"
            )
        return step

    def meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON record of checkpoint `step` (default: the latest complete one), alone."""
        record = self._record(self._check_step(step))
        return {k: v for k, v in record.items() if k != "checksums"}

    def array_dtypes(self, step: int | None = None) -> dict[str, str]:
        """Dotted name (`params.layers.0.mlp.up_proj.kernel.value`) -> dtype of every array of
        checkpoint `step` (default: the latest complete one), from Orbax's metadata: no array
        is read. What a restore target needs to match before the arrays are read."""
        step = self._check_step(step)
        try:
            tree = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
            return {leaf.name: str(leaf.dtype) for leaf in jax.tree.leaves(tree)}
        except Exception as error:  # as in `_record`
            raise CheckpointDamagedError(
                f"checkpoint {step} in {self.directory}: its array metadata is unreadable "
                f"({_first_line(error)})"
            ) from None

    def _record(self, step: int) -> dict[str, Any]:
        try:
            args = ocp.args.Composite(meta=ocp.args.JsonRestore())
            record = self._manager.restore(step, args=args).meta
        except Exception as error:  # Orbax/TensorStore raise many kinds; all mean unreadable
            raise CheckpointDamagedError(
                f"checkpoint {step} in {self.directory}: its record is unreadable "
                f"({_first_line(error)})"
            ) from None
        if not isinstance(record, dict):
            raise CheckpointDamagedError(f"checkpoint {step} in {self.directory}: bad record")
        return record

    def restore(self, like_state, step: int | None = None):
        """(state, meta) of checkpoint `step` (default: the latest complete one). `like_state` is
        a state (or tree of ShapeDtypeStructs, with shardings) giving structure and placement.
        Raises CheckpointDamagedError when it cannot be read or its checksums do not match."""
        step = self._check_step(step)
        record = self._record(step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        try:
            state = self._manager.restore(step, args=args).state
        except Exception as error:  # as in `meta`
            raise CheckpointDamagedError(
                f"checkpoint {step} in {self.directory}: its arrays are unreadable "
                f"({_first_line(error)})"
            ) from None
        saved = record.pop("checksums", None)
        if saved is not None:
            got = checksums(state)
            wrong = sorted(k for k in set(saved) | set(got) if saved.get(k) != got.get(k))
            if wrong:
                raise CheckpointDamagedError(
                    f"checkpoint {step} in {self.directory}: {len(wrong)} arrays read back other "
                    f"bits than were saved ({', '.join(wrong[:3])})"
                )
        return state, record

    def restore_intact(self, like_state, check: Callable[[dict], None] | None = None):
        """(state, meta) of the newest checkpoint that reads back and verifies. `check(meta)` runs
        on each candidate's record first (a ValueError from it stops everything: a refused
        resume is not damage). Each damaged newer checkpoint is reported on stderr in one line
        and moved to damaged_checkpoints/ beside the checkpoint directory."""
        steps = sorted(self.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            try:
                meta = self.meta(step)
                if check is not None:
                    check(meta)
                return self.restore(like_state, step)
            except CheckpointDamagedError as error:
                later = f"falling back to checkpoint {steps[i + 1]}" if i + 1 < len(steps) else ""
                print(f"{error}; {later or 'no older checkpoint'}", file=sys.stderr, flush=True)
                self._move_aside(step)
        raise ValueError(f"no intact checkpoint in {self.directory} (tried {steps})")

    def _move_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            aside = self.directory.parent / "damaged_checkpoints" / str(step)
            aside.parent.mkdir(parents=True, exist_ok=True)
            if aside.exists():
                shutil.rmtree(aside)
            shutil.move(str(self.directory / str(step)), str(aside))
        self._manager.reload()

    def close(self) -> None:
        """Wait for the pending save (raising if it failed), then release Orbax's resources."""
        try:
            self.wait()
        finally:
            self._manager.close()
