"""Metric sinks: JSON lines, TensorBoard event files, a console progress bar and, when asked,
Weights & Biases; one call per step.

Every sink gets the same flat dict of scalars, so what the console shows is what the files hold.
Non-finite values are written as they are (JSON `NaN`/`Infinity`), never dropped.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import pathlib
import secrets
from collections.abc import Mapping, Sequence

import numpy as np

CONSOLE_KEYS = ("loss", "reward_mean", "credit/gamma_mean", "grad_norm")


WANDB_MODES = ("online", "offline", "disabled")
WANDB_ID = "wandb_id.txt"  # in the run directory: a resumed run continues the same W&B run


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases logging (`pip install 'ftjax[wandb]'`), off unless `enabled`: the same
    scalars as metrics.jsonl, the run's config, and the logged completions as a table.
    mode None: wandb's own choice (WANDB_MODE, else online); "offline" writes under the run
    directory only (`wandb sync` uploads it later)."""

    enabled: bool = False
    project: str = "ftjax"  # the W&B project the run is logged to
    entity: str | None = None  # the W&B team or user; None: your default
    name: str | None = None  # the W&B run name; None: the run directory's name
    mode: str | None = None

    def __post_init__(self):
        if self.mode is not None and self.mode not in WANDB_MODES:
            raise ValueError(
                f"WandbConfig.mode must be None or one of {WANDB_MODES}, got {self.mode!r}"
            )
        if self.enabled and importlib.util.find_spec("wandb") is None:
            raise ValueError(
                "W&B logging is enabled but wandb is not installed: pip install 'ftjax[wandb]'"
            )


class WandbLogger:
    """One W&B run per run directory: its id is kept in run_dir/wandb_id.txt and resumed."""

    COLUMNS = ("step", "row", "reward", "prompt", "completion", "answer")

    def __init__(self, run_dir: pathlib.Path, cfg: WandbConfig, config: Mapping | None = None):
        import wandb

        self._wandb = wandb
        id_path = run_dir / WANDB_ID
        run_id = id_path.read_text().strip() if id_path.is_file() else secrets.token_hex(4)
        id_path.write_text(run_id + "\n")
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or run_dir.resolve().name,
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            mode=cfg.mode,
            config=dict(config or {}),
        )

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=int(step))

    def log_completions(self, step: int, records: Sequence[Mapping]) -> None:
        rows = [[record.get(c) for c in self.COLUMNS] for record in records]
        table = self._wandb.Table(columns=list(self.COLUMNS), data=rows)
        self.run.log({"completions": table}, step=int(step))

    def close(self) -> None:
        self.run.finish()


def _scalar(name: str, value) -> float:
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"metric {name!r} must be a scalar, got shape {array.shape}")
    return float(array.reshape(()))


def scalars(metrics: Mapping[str, object]) -> dict[str, float]:
    """The metrics as Python floats: what every sink writes."""
    return {name: _scalar(name, value) for name, value in metrics.items()}


class MetricsLogger:
    """Writes `metrics.jsonl` and TensorBoard events under `run_dir`; shows a tqdm bar; logs to
    W&B with `wandb.enabled` (`config`: the run's config, shown there).

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
        wandb: WandbConfig | None = None,
        config: Mapping | None = None,
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
        enabled = wandb is not None and wandb.enabled
        self._wandb = WandbLogger(self.run_dir, wandb, config) if enabled else None

    def log(self, step: int, metrics: Mapping[str, object]) -> dict[str, float]:
        values = scalars(metrics)
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            self._tb.add_scalar(name, value, int(step))
        if self._wandb is not None:
            self._wandb.log(step, values)
        shown = {k.split("/")[-1]: f"{values[k]:.4g}" for k in self._keys if k in values}
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(1)
        return values

    def log_completions(self, step: int, records: Sequence[Mapping]) -> None:
        """Completions (`ftjax.completions` records) to the sinks that show them: W&B's table."""
        if self._wandb is not None:
            self._wandb.log_completions(step, records)

    def close(self) -> None:
        self._bar.close()
        self._tb.close()
        self._jsonl.close()
        if self._wandb is not None:
            self._wandb.close()


def jsonl_records(path: str | pathlib.Path):
    """Every record of a JSONL file, in order (blank lines skipped); a line that is not JSON is
    a ValueError naming the file and line."""
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_number}: not a JSON record ({err})") from err


def read_jsonl(path: str | pathlib.Path) -> dict[int, dict[str, float]]:
    """The last record of each step (a resumed run may have rewritten some)."""
    records = {}
    for record in jsonl_records(path):
        records[int(record.pop("step"))] = record
    return records


def finite(metrics: Mapping[str, float]) -> bool:
    return all(math.isfinite(v) for v in metrics.values())
