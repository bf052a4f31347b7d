"""The benchmark scripts still run (tiny sizes; they time nothing here, they only must not rot)."""

import json
import pathlib
import re

import jax
import numpy as np
import pytest
from flax import nnx

from benchmarks import (
    bench_capture,
    bench_flow,
    bench_response_start,
    bench_step,
    bench_vs_trl,
    bench_vs_tunix,
    plan_memory,
)
from ftjax import mesh_step, rollout, sharding, state_init
from ftjax.models import config, transformer


def test_bench_flow_runs():
    trace_ms, solve_ms = bench_flow.bench_shape(2, 64, block_size=16, repeats=1)
    assert trace_ms > 0 and solve_ms > 0
    assert bench_flow.parse_shapes("8x512,2x4096") == ((8, 512), (2, 4096))


def test_bench_capture_and_step_run():
    result = bench_capture.measure(bench_capture.small_model(64), 2, 64, repeats=1)
    assert result["capture_mb"] >= result["plain_mb"] and np.isfinite(result["capture_ms"])
    step_ms, step_mb = bench_step.measure(
        "flowtracer", bench_step.make_batch(4, 32, 512), 32, 1, credit_pass="separate"
    )
    assert step_ms > 0 and step_mb > 0


PLAN_ARGS = ["--prompt_len", "8", "--response_len", "8", "--rollouts", "16", "--group_size", "4",
             "--mesh", "1x8", "--micro_batch", "1", "--remat", "full", "--dtype", "bfloat16",
             "--logit_chunk", "8"]


def test_bench_response_start_runs(capsys):
    argv = ["--prompt_len", "8", "--response_len", "4", "--vocab", "64", "--repeats", "1"]
    times = bench_response_start.main(argv)
    assert len(times) == 2 and min(times) > 0
    assert "ratio now / before" in capsys.readouterr().out


def test_plan_memory_plans_what_make_train_step_plans(tmp_path):
    """The planner (abstract state and batch, nothing allocated) plans the very step that
    `mesh_step.make_train_step` builds for a concrete state; over the limit it exits naming both."""
    model_cfg = config.tiny("qwen3", vocab_size=256, num_layers=2)
    hf = {"model_type": "qwen3", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 16, "max_position_embeddings": 512}
    assert config.from_hf(hf) == model_cfg
    (tmp_path / "config.json").write_text(json.dumps(hf))
    argv = ["--model", str(tmp_path), *PLAN_ARGS, "--limit_gib", "1e-6",
            "--jsonl", str(tmp_path / "plans.jsonl")]
    with pytest.raises(SystemExit, match="exceeds --limit_gib 1e-06"):
        plan_memory.main(argv)
    (record,) = [json.loads(line) for line in (tmp_path / "plans.jsonl").read_text().splitlines()]
    assert record["total"] == record["argument"] + record["output"] + record["temp"] - record[
        "alias"]
    assert record["largest"] and record["compile_s"] > 0

    cfg = plan_memory.step_config(plan_memory.parse_args(argv))
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=8))
    model = transformer.Transformer(model_cfg, rngs=nnx.Rngs(0))
    graphdef, state = state_init.init_state(model, cfg, jax.random.PRNGKey(0))
    batch = rollout.batch_like(16, 16, response_start=8)  # the loop's: prompt_len 8
    step_fn, state = mesh_step.make_train_step(graphdef, state, batch, cfg, mesh)
    assert mesh_step.planned_bytes(step_fn, state, batch) == record["total"]
    assert record["params"] == plan_memory.shard_bytes(state.params)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--model", "qwen3-5b"], "neither a known name"),
        (["--micro_batch", "3"], "micro_batch 3 does not divide the 2 rows"),
        (["--remat", "layers"], "unknown remat policy 'layers'"),
        (["--dtype", "float16"], "unknown StepConfig.compute_dtype 'float16'"),
        (["--mesh", "8"], "--mesh must be DATAxFSDP"),
        (["--credit_pass", "both"], "unknown StepConfig.credit_pass 'both'"),
        (["--rollouts", "18"], "not a multiple of --group_size"),
    ],
)
def test_plan_memory_refuses_bad_settings_before_compiling(change, message):
    args = plan_memory.parse_args(["--model", "qwen3-0.6b", *PLAN_ARGS, *change])
    with pytest.raises(ValueError, match=re.escape(message)):
        plan_memory.plan_setting(args)


def test_plan_memory_flags_and_largest_values():
    flags = plan_memory.xla_flags("--xla_force_host_platform_device_count=8 --foo=1", 16)
    assert flags.split() == ["--foo=1", "--xla_force_host_platform_device_count=16",
                             "--xla_cpu_enable_concurrency_optimized_scheduler=false"]
    default = plan_memory.xla_flags("--xla_cpu_enable_concurrency_optimized_scheduler=false", 8,
                                    "concurrency")
    assert default.endswith("--xla_cpu_enable_concurrency_optimized_scheduler=true")
    hlo = """HloModule m

%fused_computation (p: f32[64,64]) -> f32[64,64] {
  %big = f32[1024,1024]{1,0} multiply(f32[1024,1024]{1,0} %p, f32[1024,1024]{1,0} %p)
}

ENTRY %main (p0: f32[8,16]) -> f32[8,16] {
  %p0 = f32[8,16]{1,0} parameter(0)
  %f = bf16[4,32,128]{2,1,0} fusion(f32[8,16]{1,0} %p0), kind=kLoop, metadata={op_name="a/b"}
  %g = bf16[4,32,128]{2,1,0} fusion(f32[8,16]{1,0} %p0), kind=kLoop, metadata={op_name="a/b"}
  ROOT %d = f32[8,16]{1,0} dot(f32[8,16]{1,0} %p0, f32[16,16]{1,0} %p0)
}
"""
    (first, second) = plan_memory.largest_values(hlo, 5)
    assert (first["dtype"], first["shape"], first["count"], first["op_name"]) == (
        "bf16", (4, 32, 128), 2, "a/b")
    assert first["bytes"] == 4 * 32 * 128 * 2 and second["opcode"] == "dot"


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


TINY_TUNIX = bench_vs_tunix.Settings(
    prompts=2, group=2, prompt_len=4, new_tokens=8, hidden=64, layers=1, vocab=128, repeats=2
)


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_qwen3") / "model"
    bench_vs_tunix.build_checkpoint(TINY_TUNIX, directory)
    return directory


def check_tunix_bench_measurement(result, cpu_iterations: int):
    timed = list(zip(result["rollout_s"], result["iteration_s"], strict=True))
    assert len(timed) == TINY_TUNIX.repeats and all(0 < r < i for r, i in timed)
    assert len(result["cpu_s"]) == cpu_iterations and all(c > 0 for c in result["cpu_s"])
    assert result["batch_BxT"] == [4, 4 + 8] and result["min_new_tokens"] == 8
    assert np.isfinite(result["loss"]) and result["peak_rss_mib"] > 0 and result["warmup_s"] > 0
    assert np.shape(result["probe_logp"]) == (bench_vs_tunix.PROBE_ROWS, TINY_TUNIX.new_tokens)


def test_bench_vs_tunix_ftjax_side_runs(tiny_qwen3, tmp_path):
    result = bench_vs_tunix.run_ftjax(TINY_TUNIX, tiny_qwen3, "uniform", tmp_path)
    check_tunix_bench_measurement(result, TINY_TUNIX.repeats - 1)
    combined = bench_vs_tunix.combine([result, result], TINY_TUNIX.warmup)
    assert 0 < combined["fastest_s"] <= combined["iteration_s"]
    assert 0 < combined["step_s"] < combined["iteration_s"] and combined["compile_s"] > 0
    rows = [("tunix GRPOLearner", "uniform", combined), ("ftjax", "x", combined)]
    table = bench_vs_tunix.table(rows)
    assert table.count("| 4 x 12 |") == 2 and table.endswith("| 1.00, 1.00, 1.00 |")
    assert bench_vs_tunix.probe_gap([result, result]) == 0.0


def test_bench_vs_tunix_says_how_to_make_the_venv(tmp_path):
    with pytest.raises(SystemExit, match="pip install google-tunix"):
        bench_vs_tunix.tunix_python(str(tmp_path / "no-such-python"))


def test_bench_vs_tunix_tunix_side_runs_the_same_network(tiny_qwen3, tmp_path):
    """In the tunix venv (skipped where there is none): the same measurement, and the same
    network as ftjax's (probe log-probs)."""
    python = bench_vs_tunix.parse_args([])[0].tunix_python
    if not pathlib.Path(python).is_file():
        pytest.skip(f"no tunix venv at {python} (see benchmarks/bench_vs_tunix.py)")
    result = bench_vs_tunix.spawn(python, "tunix", "", TINY_TUNIX, tiny_qwen3, tmp_path)
    check_tunix_bench_measurement(result, TINY_TUNIX.repeats)
    ftjax_logp = bench_vs_tunix.ftjax_probe_log_probs(TINY_TUNIX, tiny_qwen3)
    assert bench_vs_tunix.probe_gap([result, {"probe_logp": ftjax_logp}]) < 1e-5


def test_device_check_tiny_writes_every_item(tmp_path):
    """`device_check --tiny` on CPU: the two 1K-like steps and the first generation item run,
    each in its own process as on a device; the other items are listed as skipped with their
    reason; the JSON holds finite numbers and the table the rows. With no budget nothing
    starts."""
    from benchmarks import device_check

    report = device_check.main(["--tiny", "--out", str(tmp_path), "--items", "0,1,4",
                                "--repeats", "2"])
    saved = json.loads((tmp_path / "device_check.json").read_text())
    assert saved["finished"] and saved["items"] == json.loads(json.dumps(report["items"]))
    assert saved["card"]["device_kind"] and saved["host"]["versions"]["jax"] == jax.__version__
    items = saved["items"]
    assert len(items) == len(device_check.plan(device_check.parse_args(["--tiny", "--out", "x"])))
    flowtracer, uniform, long_flowtracer, long_uniform, generate, *rest = items
    for item, credit_name in ((flowtracer, "flowtracer"), (uniform, "uniform")):
        assert (item["kind"], item["credit"], item["status"]) == ("step", credit_name, "ok")
        result = item["result"]
        assert len(result["step_times_s"]) == 2 and result["micro_batch"] == item["micro_batch"]
        for key in ("compile_s", "first_call_s", "step_s", "tokens_per_s", "loss", "grad_norm"):
            assert np.isfinite(result[key]), key
        assert result["step_s"] > 0 and result["planned_bytes"] > result["state_bytes"] > 0
        assert result["skipped_nonfinite"] == 0.0 and result["host_peak_rss_bytes"] > 0
    float32_run, bfloat16_run = generate["result"]["runs"]
    assert generate["status"] == "ok" and float32_run["dtype"] == "float32"
    assert np.isfinite(float32_run["tokens_per_s"]) and float32_run["all_rows_decoded"]
    assert "tokens_per_s" in bfloat16_run or bfloat16_run["error"]
    assert all(i["status"] == "skipped" and i["reason"] for i in [long_flowtracer, long_uniform,
                                                                   *rest])
    table = (tmp_path / "device_check.md").read_text()
    assert "| tiny | 32 | 4 | 4 | flowtracer | fused |" in table and "| 1.00 |" in table

    nothing = device_check.main(["--tiny", "--out", str(tmp_path / "none"), "--budget_s", "0"])
    assert {i["status"] for i in nothing["items"]} == {"skipped"}
    assert nothing["items"][0]["reason"].startswith("budget")
