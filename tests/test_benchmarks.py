"""The benchmark scripts still run (tiny sizes; they time nothing here, they only must not rot)."""

import numpy as np
import pytest

from benchmarks import bench_capture, bench_flow, bench_step, bench_vs_trl


def test_bench_flow_runs():
    trace_ms, solve_ms = bench_flow.bench_shape(2, 64, block_size=16, repeats=1)
    assert trace_ms > 0 and solve_ms > 0
    assert bench_flow.parse_shapes("8x512,2x4096") == ((8, 512), (2, 4096))


def test_bench_capture_and_step_run():
    result = bench_capture.measure(bench_capture.small_model(64), 2, 64, repeats=1)
    assert result["capture_mb"] >= result["plain_mb"] and np.isfinite(result["capture_ms"])
    step_ms, step_mb = bench_step.measure("flowtracer", bench_step.make_batch(4, 32, 512), 32, 1)
    assert step_ms > 0 and step_mb > 0


TINY_GRPO = bench_vs_trl.Settings(
    prompts=2, group=2, prompt_len=4, new_tokens=8, hidden=64, layers=1, vocab=128, repeats=1
)


def check_grpo_measurement(result):
    """Every timed iteration positive and longer than its rollout; the whole batch trained."""
    timed = list(zip(result["rollout_s"], result["iteration_s"], strict=True))
    assert len(timed) == TINY_GRPO.repeats and all(0 < r < i for r, i in timed)
    assert result["batch_BxT"] == [4, 4 + 8] and result["min_new_tokens"] == 8
    assert np.isfinite(result["loss"]) and result["peak_rss_mib"] > 0


def test_bench_vs_trl_ftjax_side_runs(tmp_path):
    bench_vs_trl.build_checkpoint(TINY_GRPO, tmp_path / "model")
    result = bench_vs_trl.run_ftjax(TINY_GRPO, tmp_path / "model", "flowtracer", tmp_path / "run")
    check_grpo_measurement(result)
    combined = bench_vs_trl.combine([result, result])
    assert 0 < combined["step_s"] < combined["iteration_s"]
    table = bench_vs_trl.table([("TRL GRPOTrainer", "uniform", combined), ("ftjax", "x", combined)])
    assert table.count("| 4 x 12 |") == 2 and table.endswith("| 1.00 |")


@pytest.mark.slow
def test_bench_vs_trl_trl_side_runs(tmp_path):
    pytest.importorskip("trl")
    bench_vs_trl.build_checkpoint(TINY_GRPO, tmp_path / "model")
    check_grpo_measurement(bench_vs_trl.run_trl(TINY_GRPO, tmp_path / "model", tmp_path / "run"))
