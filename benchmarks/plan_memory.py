"""Per-device memory plan of the real train step for a model and setting, compiled abstractly.

`train.train_step` is jitted as `mesh_step.make_train_step` jits it (state FSDP-sharded and donated,
batch over (data, fsdp), metrics replicated) and compiled on `jax.ShapeDtypeStruct`s carrying
those shardings, on fake CPU devices: nothing is allocated. Printed per device: XLA's memory
analysis (arguments, outputs, temporaries, aliased; total as `mesh_step.planned_bytes` counts it),
the parameters' and optimiser state's shares, the largest values of the compiled program (a
list of big buffers, not a liveness analysis), and the compile time.

XLA:CPU's default scheduler is concurrency-optimised and runs rematerialised work early, which
hides what remat saves; the planner turns it off (`--xla_cpu_enable_concurrency_optimized_
scheduler=false`), with the device count, before jax starts (`--cpu_scheduler concurrency` keeps
XLA:CPU's default, for comparison). GPU and TPU schedule for memory.
Usage: python -m benchmarks.plan_memory --model qwen3-4b --response_len 1024 --prompt_len 256
  --rollouts 512 --mesh 1x8 --micro_batch 1 --remat full --dtype bfloat16 --logit_chunk 512
  [--credit flowtracer] [--credit_pass fused] [--devices 8] [--limit_gib 80] [--top 10]
  [--jsonl plans.jsonl] [--cpu_scheduler memory]
(--model: a name from `ftjax.models.config.NAMED_CONFIG_JSON` or a Hugging Face config.json path.)
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    optional_int = lambda text: None if text.lower() == "none" else int(text)  # noqa: E731
    parser.add_argument("--model", required=True, help="qwen3-4b, ... or a config.json path")
    parser.add_argument("--prompt_len", type=int, default=256)
    parser.add_argument("--response_len", type=int, default=1024)
    parser.add_argument("--rollouts", type=int, default=512, help="sequences per update")
    parser.add_argument("--group_size", type=int, default=8)
    parser.add_argument("--mesh", default="1x8", help="data x fsdp, e.g. 1x8")
    parser.add_argument("--devices", type=int, default=None, help="fake devices (default: mesh)")
    parser.add_argument("--micro_batch", type=optional_int, default=None, help="rows/device/pass")
    parser.add_argument("--remat", default="none", help="none / full / dots")
    parser.add_argument("--dtype", default="float32", help="compute dtype: float32 / bfloat16")
    parser.add_argument("--logit_chunk", type=optional_int, default=None)
    parser.add_argument("--credit", default="flowtracer", help="a credit variant, e.g. uniform")
    parser.add_argument("--credit_pass", default="fused", help="fused / separate (no-grad first)")
    parser.add_argument("--scan_layers", action="store_true", help="alike layers as one scan")
    parser.add_argument("--cpu_scheduler", default="memory", choices=("memory", "concurrency"),
                        help="XLA:CPU scheduler: memory-minimising (default) or XLA's default")
    parser.add_argument("--limit_gib", type=float, default=None, help="exit 1 if the plan is over")
    parser.add_argument("--top", type=int, default=10, help="largest program values to list")
    parser.add_argument("--jsonl", default=None, help="append the plan as one JSON line here")
    return parser.parse_args(argv)


def parse_mesh(text: str) -> tuple[int, int]:
    """'DxF' -> (data, fsdp)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"--mesh must be DATAxFSDP with positive sizes, e.g. 1x8; got {text!r}")
    return int(parts[0]), int(parts[1])


def xla_flags(current: str, devices: int, scheduler: str = "memory") -> str:
    """`current` XLA_FLAGS with `devices` fake CPU devices and the memory-minimising scheduler
    (or, with scheduler="concurrency", XLA:CPU's default one)."""
    drop = ("--xla_force_host_platform_device_count", "--xla_cpu_enable_concurrency_optimized")
    kept = [flag for flag in current.split() if not flag.startswith(drop)]
    concurrency = {"memory": "false", "concurrency": "true"}[scheduler]
    return " ".join(
        kept
        + [
            f"--xla_force_host_platform_device_count={devices}",
            f"--xla_cpu_enable_concurrency_optimized_scheduler={concurrency}",
        ]
    )


if __name__ == "__main__":  # XLA reads its flags when jax starts, so before the imports below
    _args = parse_args(sys.argv[1:])
    _data, _fsdp = parse_mesh(_args.mesh)
    _devices = _data * _fsdp if _args.devices is None else _args.devices
    os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""), _devices,
                                        _args.cpu_scheduler)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import environment_line  # noqa: E402
from ftjax import credit, mesh_step, microbatch, rollout, sharding, state_init, train  # noqa: E402
from ftjax.models import config  # noqa: E402
from ftjax.models.transformer import Transformer  # noqa: E402

GIB = 2**30
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
          "u32": 4, "f64": 8, "s64": 8, "u64": 8}
# `%name = dtype[dims]{layout} opcode(`: one array-valued instruction of the HLO text.
_VALUE = re.compile(r"^\s*(?:ROOT )?%?(\S+) = (\w+)\[([\d,]*)\](?:\{[^}]*\})? ([\w-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_NO_NEW_BUFFER = {"parameter", "bitcast", "get-tuple-element", "tuple", "constant"}


def model_config(model: str) -> config.ModelConfig:
    """A named shape (`config.named`) or a Hugging Face config.json (file or its directory)."""
    if model in config.NAMED_CONFIG_JSON:
        return config.named(model)
    path = pathlib.Path(model)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(
            f"--model {model!r} is neither a known name ({sorted(config.NAMED_CONFIG_JSON)}) "
            "nor a config.json file or a directory holding one"
        )
    return config.from_hf(json.loads(path.read_text()))


def step_config(args: argparse.Namespace) -> train.StepConfig:
    return train.StepConfig(
        group_size=args.group_size,
        credit=credit.CreditConfig(name=args.credit),
        micro_batch=args.micro_batch,
        remat=args.remat,
        logit_chunk=args.logit_chunk,
        compute_dtype=args.dtype,
        credit_pass=args.credit_pass,
        scan_layers=args.scan_layers,
    )


def abstract_batch(
    rows: int, tokens: int, mesh: jax.sharding.Mesh, prompt_len: int = 0
) -> train.Batch:
    """The rollout batch (no KL reference, no precomputed gamma; `prompt_len` prompt slots) as
    sharded shapes."""
    spec = sharding.batch_sharding(mesh)
    like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=spec)  # noqa: E731
    return jax.tree.map(like, rollout.batch_like(rows, tokens, response_start=prompt_len))


def jit_train_step(graphdef, state, batch: train.Batch, cfg: train.StepConfig, mesh):
    """`train.train_step` jitted exactly as `mesh_step.make_train_step` jits it, without placing a
    concrete state on the mesh (`tests/test_benchmarks.py` checks that both plan the same)."""
    placed = state_init.state_shardings(state, mesh)
    return jax.jit(
        functools.partial(train.train_step, graphdef, cfg=cfg, mesh=mesh),
        in_shardings=(placed, jax.tree.map(lambda _: sharding.batch_sharding(mesh), batch)),
        out_shardings=(placed, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded `jax.ShapeDtypeStruct`s (or arrays)."""
    return sum(
        int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )


def largest_values(hlo_text: str, top: int) -> list[dict]:
    """The `top` largest array values the compiled (per-device) program creates, outside fusion
    bodies, grouped by (dtype, shape, opcode, source op): each with its bytes and count."""
    groups: dict[tuple, dict] = {}
    fused = False
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():  # a computation's header (or the module's)
            name = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
            fused = name.lstrip("%").startswith(("fused_", "wrapped_"))
            continue
        match = _VALUE.match(line)
        if fused or not match or match.group(4) in _NO_NEW_BUFFER:
            continue
        dtype, dims, opcode = match.group(2), match.group(3), match.group(4)
        shape = tuple(int(d) for d in dims.split(",") if d)
        nbytes = int(np.prod(shape)) * _BYTES.get(dtype, 4)
        op_name = _OP_NAME.search(line)
        source = op_name.group(1) if op_name else ""
        key = (dtype, shape, opcode, source)
        entry = groups.setdefault(key, {"bytes": nbytes, "dtype": dtype, "shape": shape,
                                        "opcode": opcode, "op_name": source, "count": 0})
        entry["count"] += 1
    return sorted(groups.values(), key=lambda e: -e["bytes"])[:top]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes of one train step, as XLA plans it."""

    argument: int
    output: int
    temp: int
    alias: int
    total: int  # argument + output + temp - alias, as `mesh_step.planned_bytes`
    params: int
    opt_state: int
    compile_s: float
    largest: list[dict]


def plan(graphdef, state, batch: train.Batch, cfg: train.StepConfig, mesh, top: int = 10) -> Plan:
    """Compile the train step on abstract, sharded `state` and `batch` and read its plan."""
    step_fn = jit_train_step(graphdef, state, batch, cfg, mesh)
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    stats = compiled.memory_analysis()
    return Plan(
        argument=int(stats.argument_size_in_bytes),
        output=int(stats.output_size_in_bytes),
        temp=int(stats.temp_size_in_bytes),
        alias=int(stats.alias_size_in_bytes),
        total=mesh_step.planned_bytes(step_fn, state, batch),  # the compile above is cached
        params=shard_bytes(state.params),
        opt_state=shard_bytes(state.opt_state),
        compile_s=compile_s,
        largest=largest_values(compiled.as_text(), top) if top else [],
    )


def plan_setting(args: argparse.Namespace) -> tuple[Plan, dict]:
    """Validate the setting (ValueErrors name the bad value before anything compiles), build the
    abstract state and batch on the mesh, and plan. Returns (plan, the setting as a dict)."""
    model_cfg = model_config(args.model)
    cfg = step_config(args)
    data, fsdp = parse_mesh(args.mesh)
    tokens = args.prompt_len + args.response_len
    if tokens > model_cfg.max_position_embeddings:
        raise ValueError(
            f"prompt_len + response_len = {tokens} exceeds the model's context of "
            f"{model_cfg.max_position_embeddings}"
        )
    if args.rollouts % args.group_size:
        raise ValueError(f"--rollouts {args.rollouts} is not a multiple of --group_size "
                         f"{args.group_size}")
    mesh = sharding.make_mesh(sharding.MeshConfig(data=data, fsdp=fsdp))
    sharding.check_batch(args.rollouts, mesh)
    microbatch.passes(args.rollouts, cfg.micro_batch, data * fsdp)
    graphdef, state = state_init.abstract_state(
        lambda rngs: Transformer(model_cfg, rngs=rngs), cfg, mesh
    )
    batch = abstract_batch(args.rollouts, tokens, mesh, args.prompt_len)
    setting = {
        "model": args.model, "T": tokens, "rollouts": args.rollouts, "mesh": args.mesh,
        "micro_batch": args.micro_batch, "remat": args.remat, "dtype": args.dtype,
        "logit_chunk": args.logit_chunk, "credit": args.credit, "credit_pass": args.credit_pass,
        "cpu_scheduler": args.cpu_scheduler, "scan_layers": args.scan_layers,
    }
    return plan(graphdef, state, batch, cfg, mesh, args.top), setting


def report(result: Plan, setting: dict) -> str:
    g = lambda n: f"{n / GIB:.2f}"  # noqa: E731
    lines = [
        environment_line() + f", {jax.device_count()} devices",
        "setting: " + ", ".join(f"{k} {v}" for k, v in setting.items()),
        f"planned per device (GiB): arguments {g(result.argument)}, outputs {g(result.output)}, "
        f"temporaries {g(result.temp)}, aliased {g(result.alias)} -> total {g(result.total)}",
        f"state per device (GiB): params {g(result.params)}, optimizer {g(result.opt_state)}",
        f"compile: {result.compile_s:.1f} s",
    ]
    if result.largest:
        lines.append("largest values of the per-device program (not a liveness analysis):")
        lines.append(f"{'GiB':>8} {'count':>5}  {'value':<32} {'opcode':<14} source op")
        for v in result.largest:
            value = f"{v['dtype']}[{','.join(map(str, v['shape']))}]"
            lines.append(f"{g(v['bytes']):>8} {v['count']:>5}  {value:<32} {v['opcode']:<14} "
                         f"{v['op_name'][-90:]}")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    result, setting = plan_setting(args)
    print(report(result, setting))
    if args.jsonl:
        record = {**setting, **dataclasses.asdict(result), "jax": jax.__version__}
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
    if args.limit_gib is not None and result.total > args.limit_gib * GIB:
        raise SystemExit(
            f"the plan ({result.total / GIB:.2f} GiB per device) exceeds --limit_gib "
            f"{args.limit_gib}: use a smaller --micro_batch, --remat full, --dtype bfloat16, a "
            "--logit_chunk, or a larger fsdp axis"
        )


if __name__ == "__main__":
    main()
