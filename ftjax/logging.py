"""Metric sinks: JSON lines, TensorBoard event files and a console progress bar, one call per step.

Every sink gets the same flat dict of scalars, so what the console shows is what the files hold.
Non-finite values are written as they are (JSON `NaN`/`Infinity`), never dropped.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping

import numpy as np

CONSOLE_KEYS = ("loss", "reward_mean", "credit/gamma_mean", "grad_norm")


def _scalar(name: str, value) -> float:
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"metric {name!r} must be a scalar, got shape {array.shape}")
    return float(array.reshape(()))


def scalars(metrics: Mapping[str, object]) -> dict[str, float]:
    """The metrics as Python floats: what every sink writes."""
    return {name: _scalar(name, value) for name, value in metrics.items()}


class MetricsLogger:
    """Writes `metrics.jsonl` and TensorBoard events under `run_dir`; shows a tqdm bar.

    Resuming appends to the same files; records carry their step, so a reader keeps the last
    record of each step.
    """

    def __init__(
        self,
        run_dir: str | pathlib.Path,
        total_steps: int | None = None,
        console_keys: tuple[str, ...] = CONSOLE_KEYS,
        initial_step: int = 0,
        progress: bool = True,
    ):
        from tensorboardX import SummaryWriter
        from tqdm import tqdm

        self.run_dir = pathlib.Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        self._keys = console_keys
        self._bar = tqdm(
            total=total_steps, initial=initial_step, disable=not progress, dynamic_ncols=True
        )

    def log(self, step: int, metrics: Mapping[str, object]) -> dict[str, float]:
        values = scalars(metrics)
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            self._tb.add_scalar(name, value, int(step))
        shown = {k.split("/")[-1]: f"{values[k]:.4g}" for k in self._keys if k in values}
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(1)
        return values

    def close(self) -> None:
        self._bar.close()
        self._tb.close()
        self._jsonl.close()


def read_jsonl(path: str | pathlib.Path) -> dict[int, dict[str, float]]:
    """The last record of each step (a resumed run may have rewritten some)."""
    records = {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_number}: not a JSON record ({err})") from err
            records[int(record.pop("step"))] = record
    return records


def finite(metrics: Mapping[str, float]) -> bool:
    return all(math.isfinite(v) for v in metrics.values())
