"""Metric sinks: JSONL and TensorBoard hold exactly what was logged; resume appends."""

import math

import numpy as np
import pytest

from ftjax.logging import MetricsLogger, finite, read_jsonl


def test_jsonl_and_tensorboard_hold_the_logged_values(tmp_path):
    logger = MetricsLogger(tmp_path, total_steps=3, progress=False)
    logged = [logger.log(step, {"loss": np.float32(0.5 / (step + 1)), "credit/gamma_mean": 1.2,
                                "grad_norm": np.array(float("nan"))}) for step in range(3)]
    logger.close()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert sorted(records) == [0, 1, 2]
    for step, want in enumerate(logged):
        assert records[step]["loss"] == pytest.approx(want["loss"])
        assert math.isnan(records[step]["grad_norm"])
    assert not finite(records[0]) and finite({"a": 1.0})

    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    values = [value for tag, value in scalars if tag == "loss"]
    np.testing.assert_allclose(values, [r["loss"] for r in logged], rtol=1e-6)


def tensorboard_scalars(directory):
    """(tag, value) of every scalar in the event files, read as TFRecords (length, crc, data,
    crc) with tensorboardX's own protobuf classes."""
    import struct

    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            out += [(v.tag, v.simple_value) for v in event.summary.value]
    return out


def test_resume_appends_and_last_record_wins(tmp_path):
    first = MetricsLogger(tmp_path, progress=False)
    first.log(0, {"loss": 1.0})
    first.log(1, {"loss": 2.0})
    first.close()
    second = MetricsLogger(tmp_path, initial_step=1, progress=False)
    second.log(1, {"loss": 3.0})
    second.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == {0: {"loss": 1.0}, 1: {"loss": 3.0}}


def test_bad_metrics_and_bad_files(tmp_path):
    logger = MetricsLogger(tmp_path, progress=False)
    with pytest.raises(ValueError, match="scalar"):
        logger.log(0, {"loss": np.ones(3)})
    logger.close()
    (tmp_path / "broken.jsonl").write_text('{"step": 0, "loss": 1}\nnot json\n')
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        read_jsonl(tmp_path / "broken.jsonl")


def test_wandb_offline_logs_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    """Skipped where wandb is not installed (the default test environment has no wandb extra)."""
    pytest.importorskip("wandb")
    from ftjax.logging import WANDB_ID, WandbConfig

    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = WandbConfig(enabled=True, project="ftjax-test", mode="offline")
    records = [{"step": 0, "row": 0, "reward": 1.0, "prompt": "p", "completion": "c"}]
    for step in range(2):  # a run, then its resume
        logger = MetricsLogger(tmp_path, progress=False, wandb=cfg, config={"loop.steps": "2"})
        logger.log(step, {"loss": 0.5, "reward_mean": 1.0})
        logger.log_completions(step, records)
        logger.close()
    run_id = (tmp_path / WANDB_ID).read_text().strip()
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2  # both sessions wrote to the one W&B run
    data = b"".join(path.read_bytes() for run in runs for path in run.glob("run-*.wandb"))
    assert b"reward_mean" in data and b"completions" in data
    assert read_jsonl(tmp_path / "metrics.jsonl") == {
        0: {"loss": 0.5, "reward_mean": 1.0},
        1: {"loss": 0.5, "reward_mean": 1.0},
    }


def test_wandb_config_is_checked():
    from ftjax.logging import WandbConfig

    with pytest.raises(ValueError, match="mode"):
        WandbConfig(mode="sometimes")
