"""The measurements of `benchmarks.device_check`: one item (a train step setting, or a list of
generation runs) per call, normally in a process of its own.

Dims: B rows, P prompt tokens, R response tokens, T = P + R, N new tokens, V vocab.

Every stage rewrites the item's record file, so an item killed at the deadline leaves what it
measured before.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pathlib
import resource
import time
import traceback

import jax
import numpy as np
from flax import nnx

from ftjax import credit, mesh_step, sampling, sharding, state_init, train
from ftjax.models import config
from ftjax.models.transformer import Transformer

# Persistent-cache events of this process: a compile that hit the cache timed a load, not XLA.
CACHE_EVENTS = collections.Counter()
jax.monitoring.register_event_listener(lambda event, **_: CACHE_EVENTS.update([event]))
CACHE_HIT = "/jax/compilation_cache/cache_hits"
STATE_MARGIN = 1.1  # skip without allocating when (params + Adam + grads) x this is over the limit


class Record:
    """The item's result, written whole to `path` (if any) whenever `save` is called."""

    def __init__(self, path: str | None):
        self.path = None if path is None else pathlib.Path(path)
        self.data: dict = {"status": "running", "result": {}}

    @property
    def result(self) -> dict:
        return self.data["result"]

    def stage(self, name: str) -> None:
        """Mark what the item is doing now, so a kill says where it was."""
        self.save(stage=name, stage_started=time.time())

    def save(self, **fields) -> None:
        self.data.update(fields)
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            os.replace(tmp, self.path)


def model_config(name: str, tokens: int) -> config.ModelConfig:
    """A named Qwen3 shape (`config.named`), `NAME:LAYERS` for that shape cut to LAYERS layers
    (when its whole depth compiles too slowly for the budget), or `tiny`: a 2-layer Qwen3-family
    toy for CPU (each more layer adds seconds to XLA:CPU's compile of the step)."""
    if name == "tiny":
        return config.tiny(
            "qwen3", vocab_size=256, num_layers=2, max_position_embeddings=max(512, tokens)
        )
    base, _, layers = name.partition(":")
    named = config.named(base)
    return dataclasses.replace(named, num_layers=int(layers)) if layers else named


def device_card() -> dict:
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "platform_version": getattr(getattr(device, "client", None), "platform_version", None),
        "device_count": jax.device_count(),
        "bytes_limit": stats.get("bytes_limit"),
        "jax": jax.__version__,
    }


def peak_bytes(key: str = "peak_bytes_in_use") -> int | None:
    """The device allocator's peak since the process started, or with key "bytes_in_use" what
    it holds now (None where it has no statistics: CPU)."""
    return (jax.devices()[0].memory_stats() or {}).get(key)


def host_peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def tree_bytes(tree) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def one_device_mesh() -> jax.sharding.Mesh:
    return sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1), jax.devices()[:1])


def step_config(spec: dict, micro_batch: int) -> train.StepConfig:
    return train.StepConfig(
        group_size=min(8, spec["rows"]),
        credit=credit.CreditConfig(name=spec["credit"]),
        micro_batch=micro_batch,
        remat="full",
        logit_chunk=spec["logit_chunk"],
        compute_dtype="bfloat16",
        credit_pass=spec["credit_pass"],
        scan_layers=True,
        attention=spec.get("attention", "xla"),
    )


def make_batch(rows: int, prompt: int, response: int, vocab: int, mesh) -> train.Batch:
    """Random tokens; both rewards in every group; the answer span just before the end; old
    log-probs near a random policy's (-log V), so the ratios start near 1."""
    rng = np.random.default_rng(0)
    T = prompt + response
    position_T = np.arange(T)
    full = lambda row_T: np.broadcast_to(row_T, (rows, T)).copy()  # noqa: E731
    prompt_BxT = full(position_T < prompt)
    response_BxT = ~prompt_BxT
    batch = train.Batch(
        tokens_BxT=rng.integers(1, vocab, (rows, T)).astype(np.int32),
        prompt_mask_BxT=prompt_BxT,
        response_mask_BxT=response_BxT,
        answer_mask_BxT=full((position_T >= T - 8) & (position_T < T - 2)),
        rewards_B=(np.arange(rows) % 2).astype(np.float32),
        old_log_probs_BxT=np.where(response_BxT, -np.log(vocab), 0.0).astype(np.float32),
    )
    return jax.device_put(batch, sharding.batch_sharding(mesh))


def step_item(spec: dict, record: Record) -> None:
    """Compile (halving the micro-batch while the plan is over the device's limit), then time
    the first call and up to `repeats` warm steps before the deadline."""
    result, deadline = record.result, spec["deadline"]
    T = spec["prompt"] + spec["response"]
    model_cfg = model_config(spec["model"], T)
    mesh = one_device_mesh()
    limit = mesh_step.device_memory_limit(mesh)
    make_model = lambda rngs: Transformer(model_cfg, rngs=rngs)  # noqa: E731
    micro = spec["micro_batch"]
    _, like = state_init.abstract_state(make_model, step_config(spec, micro), mesh)
    params_bytes = tree_bytes(like.params)
    result.update(
        T=T,
        bytes_limit=limit,
        state_bytes=tree_bytes(like),
        params=sum(math.prod(x.shape) for x in jax.tree.leaves(like.params)),
    )
    need = (result["state_bytes"] + params_bytes) * STATE_MARGIN
    if limit is not None and need > limit:
        return record.save(
            status="does_not_fit",
            reason=(
                f"params + Adam + grads (float32) x {STATE_MARGIN} = {need / 2**30:.1f} GiB > "
                f"limit {limit / 2**30:.1f} GiB"
            ),
        )
    record.stage("init")
    start = time.perf_counter()
    graphdef, state = state_init.init_state_sharded(
        make_model, step_config(spec, micro), jax.random.PRNGKey(0), mesh
    )
    jax.block_until_ready(state)
    batch = make_batch(spec["rows"], spec["prompt"], spec["response"], model_cfg.vocab_size, mesh)
    result.update(init_s=time.perf_counter() - start, attempts=[])
    record.save()
    while True:
        step_fn, state = mesh_step.make_train_step(
            graphdef, state, batch, step_config(spec, micro), mesh
        )
        record.stage(f"lower (micro_batch {micro})")
        start = time.perf_counter()
        lowered = step_fn.lower(state, batch)
        result["lower_s"] = time.perf_counter() - start
        record.stage(f"compile (micro_batch {micro})")
        hits, start = CACHE_EVENTS[CACHE_HIT], time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
        stats = compiled.memory_analysis()
        planned = (
            stats.argument_size_in_bytes
            + stats.output_size_in_bytes
            + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes
        )
        result["attempts"].append(
            {"micro_batch": micro, "planned_bytes": int(planned), "compile_s": compile_s}
        )
        result.update(
            micro_batch=micro,
            compile_s=compile_s,
            compile_cache_hit=CACHE_EVENTS[CACHE_HIT] > hits,
            planned_bytes=int(planned),
            planned_argument_bytes=int(stats.argument_size_in_bytes),
            planned_output_bytes=int(stats.output_size_in_bytes),
            planned_temp_bytes=int(stats.temp_size_in_bytes),
            planned_alias_bytes=int(stats.alias_size_in_bytes),
        )
        record.save()
        if limit is None or planned <= limit or micro == 1:
            break
        micro //= 2
    if limit is not None and planned > limit:
        return record.save(
            status="does_not_fit",
            reason=(
                f"planned {planned / 2**30:.1f} GiB > limit {limit / 2**30:.1f} GiB "
                "at micro_batch 1"
            ),
        )
    result.update(
        peak_before_step_bytes=peak_bytes(), in_use_before_step_bytes=peak_bytes("bytes_in_use")
    )
    record.stage("first step")
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    result.update(first_call_s=time.perf_counter() - start, step_times_s=[])
    record.stage("warm steps")
    times = result["step_times_s"]
    for _ in range(spec["repeats"]):
        if time.time() + (max(times) if times else result["first_call_s"]) > deadline:
            result["stopped_early"] = "the next step would pass the deadline"
            break
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
        record.save()
    metrics = jax.device_get(metrics)
    result.update(
        peak_bytes=peak_bytes(),
        host_peak_rss_bytes=host_peak_rss_bytes(),
        loss=float(metrics["loss"]),
        grad_norm=float(metrics["grad_norm"]),
        skipped_nonfinite=float(metrics["skipped_nonfinite"]),
    )
    if times:
        result.update(
            step_s=float(np.median(times)), tokens_per_s=spec["rows"] * T / float(np.median(times))
        )
    record.save(status="ok" if times else "partial")


def init_params(model_cfg: config.ModelConfig, mesh):
    """(graphdef, float32 parameters) of a random model, created already sharded on `mesh`."""
    graphdefs = []

    def init(rng):
        graphdef, params = nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(rng)), nnx.Param)
        graphdefs.append(graphdef)
        return params

    shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
    placed = sharding.tree_shardings(shapes, mesh)
    params = jax.jit(init, out_shardings=placed)(jax.random.PRNGKey(0))
    return graphdefs[0], params


def time_generate(
    policy, B: int, P: int, N: int, repeats: int, deadline: float, run: dict, record: Record
) -> None:
    """Fill `run` with the first call (compile + run) and up to `repeats` warm runs of decoding
    N tokens after B random prompts of P tokens."""
    prompt_BxP = np.random.default_rng(B).integers(1, policy.cfg.vocab_size, (B, P))
    valid_BxP = np.ones((B, P), bool)
    cfg = sampling.SamplingConfig(max_new_tokens=N, temperature=1.0)
    key = jax.random.PRNGKey(1)
    start = time.perf_counter()
    out = jax.block_until_ready(sampling.generate(policy, prompt_BxP, valid_BxP, key, cfg))
    run.update(first_call_s=time.perf_counter() - start, run_times_s=[])
    record.save()
    for _ in range(repeats):
        if time.time() + run["first_call_s"] > deadline:
            break
        start = time.perf_counter()
        out = jax.block_until_ready(sampling.generate(policy, prompt_BxP, valid_BxP, key, cfg))
        run["run_times_s"].append(time.perf_counter() - start)
    # From the first call when no warm run fitted: an upper bound (it holds the compile).
    run_s = float(np.median(run["run_times_s"] or [run["first_call_s"]]))
    run.update(
        run_s=run_s,
        tokens_per_s=B * N / run_s,
        all_rows_decoded=bool(np.all(np.asarray(out.lengths_B) == N)),
    )


def gen_item(spec: dict, record: Record) -> None:
    """`sampling.generate` at each (batch, dtype) of `runs`: float32 is the parameters as the
    RL loop samples them, bfloat16 the cast `train.policy_model` makes. A run's error (out of
    memory) is recorded and the next run goes on."""
    result, deadline = record.result, spec["deadline"]
    P, N = spec["prompt"], spec["new_tokens"]
    model_cfg = model_config(spec["model"], P + N)
    mesh = one_device_mesh()
    record.stage("init")
    start = time.perf_counter()
    graphdef, params = init_params(model_cfg, mesh)
    jax.block_until_ready(params)
    result.update(init_s=time.perf_counter() - start, param_bytes=tree_bytes(params), runs=[])
    record.save()
    for B, dtype in spec["runs"]:
        run = {"batch": B, "dtype": dtype}
        result["runs"].append(run)
        if time.time() > deadline - 5:
            run["error"] = "skipped: budget"
            continue
        record.stage(f"generate batch {B} {dtype}")
        try:
            if dtype == "float32":
                policy = nnx.merge(graphdef, params)
            else:
                policy = train.policy_model(graphdef, params, train.StepConfig(compute_dtype=dtype))
            time_generate(policy, B, P, N, spec["repeats"], deadline, run, record)
        except Exception as error:  # noqa: BLE001 - an OOM of one run must not lose the rest
            run["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        run.update(peak_bytes=peak_bytes(), host_peak_rss_bytes=host_peak_rss_bytes())
        record.save()
    done = any("tokens_per_s" in r for r in result["runs"])
    record.save(status="ok" if done else "error", reason=None if done else "no run finished")


def run_item(spec: dict) -> dict:
    """Run one item of `device_check.plan`; returns (and writes to spec["record"]) its record."""
    record = Record(spec.get("record"))
    try:
        record.save(card=device_card())
        (step_item if spec["kind"] == "step" else gen_item)(spec, record)
        if record.data["status"] == "running":
            record.save(status="ok")
    except Exception as error:  # noqa: BLE001 - recorded with its traceback, the run goes on
        trace = traceback.format_exc()
        print(trace, flush=True)
        record.save(
            status="error",
            reason=f"{type(error).__name__}: {str(error)[:500]}",
            traceback=trace[-4000:],
        )
    return record.data
