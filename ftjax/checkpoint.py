"""Orbax checkpoints of everything a run needs to continue exactly; atomic, N latest kept.

A checkpoint holds a state (an RL run's whole train state, or a warm-up's parameters alone) and a
JSON record: the step, and `kind` (`TRAIN_STATE` or `PARAMS`), which says which of the two the
state is, so a policy is restored from either without guessing. Orbax writes
into a temporary directory and renames it when complete, so a crash or SIGKILL mid-write leaves the
previous checkpoint as the latest loadable one. A state with a non-finite value is never written.

Multi-process, every method is collective: every process calls it, with the same arguments, on a
directory they all see. Each process writes the shards it holds; Orbax lets process 0 alone
create, finalise (rename) and delete checkpoint directories.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

TRAIN_STATE, PARAMS = "train_state", "params"  # the `kind` a checkpoint's record names


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, keep: int = 3):
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {keep!r}")
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        """Write `state` and `meta` (JSON-serialisable) as checkpoint `step`; blocks until done."""
        bad = [
            jax.tree_util.keystr(path)
            for path, leaf in jax.tree_util.tree_leaves_with_path(state)
            if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
            and not bool(jnp.all(jnp.isfinite(leaf)))
        ]
        if bad:
            raise ValueError(f"refusing to checkpoint a state with non-finite values in {bad[:5]}")
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        self._manager.reload()
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        self._manager.reload()
        return list(self._manager.all_steps())

    def restore(self, like_state, step: int | None = None):
        """(state, meta) of checkpoint `step` (default: the latest complete one). `like_state` is
        a state (or tree of ShapeDtypeStructs, with shardings) giving structure and placement."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"no complete checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise ValueError(
                f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}"
            )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        )
        restored = self._manager.restore(step, args=args)
        return restored.state, restored.meta

    def meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON record of checkpoint `step` (default: the latest complete one), alone."""
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise ValueError(f"no complete checkpoint for step {step} in {self.directory}")
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        return self._manager.restore(step, args=args).meta

    def close(self) -> None:
        self._manager.close()
