"""The benchmark scripts still run (tiny sizes; they time nothing here, they only must not rot)."""

import numpy as np

from benchmarks import bench_capture, bench_flow, bench_step


def test_bench_flow_runs():
    trace_ms, solve_ms = bench_flow.bench_shape(2, 64, block_size=16, repeats=1)
    assert trace_ms > 0 and solve_ms > 0
    assert bench_flow.parse_shapes("8x512,2x4096") == ((8, 512), (2, 4096))


def test_bench_capture_and_step_run():
    result = bench_capture.measure(bench_capture.small_model(64), 2, 64, repeats=1)
    assert result["capture_mb"] >= result["plain_mb"] and np.isfinite(result["capture_ms"])
    step_ms, step_mb = bench_step.measure("flowtracer", bench_step.make_batch(4, 32, 512), 32, 1)
    assert step_ms > 0 and step_mb > 0
