"""A run directory no one can silently corrupt: one run at a time, and a resume only under the
config the run was trained with.

The lock is a file, `run.lock`, created exclusively (O_EXCL) with the holder's pid and host. A
second run on the directory is refused at once, naming the holder. A lock left by a killed run
on this host (its pid no longer lives) is stale and taken over; one from another host cannot be
checked from here, and the message says how to remove it. On several hosts, process 0 holds it.

The identity is the run's config flattened to dotted keys (`step.credit.name`, `loop.seed`,
`model.hidden_size`, `task.prompts`, ...), stored with every checkpoint. Resuming compares it with
the new one: a key that changes what is trained (any key not in `VOLATILE`, and not allowed by
the caller) refuses the resume with one line naming the keys. Allowed changes are appended to
`config_history.jsonl`, so the directory records every mix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import socket
import time
from collections.abc import Iterable, Mapping

LOCK = "run.lock"
HISTORY = "config_history.jsonl"
# Keys that never change what a step computes: how long to run, how often to save, what to show.
VOLATILE = (
    "loop.steps",
    "loop.checkpoint_every",
    "loop.keep_checkpoints",
    "loop.progress",
    "loop.log_completions_every",
    "loop.wandb.",
    "loop.mesh.",  # the same update on another slice; sharded == single-device is tested
    # where a step's memory goes, not what it computes (tests/test_microbatch.py): so a run can
    # resume on a smaller slice with smaller micro-batches (the `random` control credit then
    # draws per pass: another draw of the same distribution)
    "step.micro_batch",
    "step.scan_layers",
    "step.remat",
    "step.logit_chunk",
    "step.credit_pass",
    "run_dir",
    "multihost",
    "eval.",
    "resume.",
)


class RunDirInUseError(ValueError):
    """Another live run holds the directory's lock."""


class RunLock:
    """Exclusive use of a run directory while the `with` block runs (see the module docstring)."""

    def __init__(self, run_dir: str | pathlib.Path, enabled: bool = True):
        self.path = pathlib.Path(run_dir) / LOCK
        self.enabled = enabled
        self._held = False

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(3):  # a stale lock is removed, then the exclusive create is retried
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and _is_mine(holder):
                    return self  # taken by this process further out (an experiment around the loop)
                if holder is not None and not _is_stale(holder):
                    raise RunDirInUseError(
                        f"run directory {self.path.parent} is in use by pid {holder['pid']} on "
                        f"{holder['host']} (lock {self.path}); if that run is gone, delete the lock"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale, or unreadable (a crash mid-write)
                continue
            with os.fdopen(descriptor, "w") as file:
                json.dump(me, file)
            self._held = True
            return self
        raise RunDirInUseError(f"could not take the lock {self.path}: another run keeps taking it")

    def __exit__(self, *exc) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if {"pid", "host"} <= set(holder) else None
        except (OSError, ValueError):
            return None


def _is_mine(holder: Mapping) -> bool:
    return holder["host"] == socket.gethostname() and int(holder["pid"]) == os.getpid()


def _is_stale(holder: Mapping) -> bool:
    """A lock is stale when its holder ran on this host and that process no longer exists."""
    if holder["host"] != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


# ----------------------------------------------------------------------------- identity


def flatten(tree: object, prefix: str = "") -> dict[str, str]:
    """Dotted key -> JSON text of every leaf of nested dicts and dataclasses."""
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        tree = {f.name: getattr(tree, f.name) for f in dataclasses.fields(tree)}
    if isinstance(tree, Mapping):
        out = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(tree, sort_keys=True, default=str)}


def task_identity(task: object, probe: int = 8) -> dict[str, object]:
    """What identifies a task by its content, not its class: its config where it has one,
    `task.fingerprint()` where it has one (a text task hashes its examples: the same file name
    with other rows is another task), and a digest of its first `probe` prompts."""
    out: dict[str, object] = {"prompts": digest(task.prompts(0, probe))}
    cfg = getattr(task, "cfg", None)
    if dataclasses.is_dataclass(cfg):
        out["cfg"] = cfg
    fingerprint = getattr(task, "fingerprint", None)
    if callable(fingerprint):
        out["fingerprint"] = fingerprint()
    return out


def digest(parts: Iterable[object]) -> str:
    """A short sha256 of the JSON text of `parts`, in order."""
    sha = hashlib.sha256()
    for part in parts:
        sha.update(json.dumps(part, sort_keys=True, default=str).encode())
        sha.update(b"\0")
    return sha.hexdigest()[:16]


def changed(stored: Mapping[str, str], current: Mapping[str, str]) -> dict[str, tuple]:
    """key -> (stored, current) for every key whose value differs (or exists on one side)."""
    return {
        key: (stored.get(key), current.get(key))
        for key in sorted(set(stored) | set(current))
        if stored.get(key) != current.get(key)
    }


def _allowed(key: str, allow: Iterable[str]) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in (*VOLATILE, *allow))


def check_resume(
    run_dir: str | pathlib.Path,
    stored: Mapping[str, str] | None,
    current: Mapping[str, str],
    step: int,
    allow: Iterable[str] = (),
) -> None:
    """Refuse a resume whose identity differs from the stored one outside `allow` (dotted keys; a
    key ending in "." allows a whole group); record allowed changes in config_history.jsonl."""
    if stored is None:  # a checkpoint written before identities were recorded
        return
    allow = tuple(allow)
    diff = changed(stored, current)
    refused = [key for key in diff if not _allowed(key, allow)]
    if refused:
        shown = ", ".join(f"{k} ({diff[k][0]} -> {diff[k][1]})" for k in refused[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise ValueError(
            f"{run_dir} was trained with another config: {shown}{more}; resuming would mix two "
            f"runs. Use a new run directory, or allow the change: --resume.allow "
            f"{','.join(refused)} (loop.run(..., allow=...))"
        )
    if diff:
        record = {"step": step, "changes": {k: {"was": a, "now": b} for k, (a, b) in diff.items()}}
        with (pathlib.Path(run_dir) / HISTORY).open("a") as file:
            file.write(json.dumps(record) + "\n")
