"""Shared timing helpers for the benchmarks (median wall time of warm calls)."""

from __future__ import annotations

import time

import jax
import numpy as np

from ftjax.models import config


def median_ms(fn, *args, repeats: int = 10) -> float:
    """Median wall time in ms of `fn(*args)` after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def compiled_bytes(jitted, *args) -> int:
    """Peak working memory XLA plans for one call: temporaries plus outputs (arguments excluded)."""
    stats = jitted.lower(*args).compile().memory_analysis()
    return int(stats.temp_size_in_bytes + stats.output_size_in_bytes)


def environment_line() -> str:
    device = jax.devices()[0]
    return f"jax {jax.__version__}, backend {jax.default_backend()}, device {device.device_kind}"


def interleaved_median_ms(fns_and_args, repeats: int = 10) -> list[float]:
    """Median wall times (ms) of several calls timed alternately, so that load changes on a shared
    machine hit all of them alike; each is warmed up (compiled) first."""
    for fn, args in fns_and_args:
        jax.block_until_ready(fn(*args))
    times = [[] for _ in fns_and_args]
    for _ in range(repeats):
        for slot, (fn, args) in zip(times, fns_and_args, strict=True):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            slot.append(time.perf_counter() - start)
    return [1e3 * float(np.median(slot)) for slot in times]


def small_llama_config(max_len: int) -> config.ModelConfig:
    """The CPU benchmarks' model: Llama family, 8 layers, hidden 256, 8 heads (4 KV), vocab 512."""
    return config.tiny(
        "llama",
        vocab_size=512,
        hidden_size=256,
        intermediate_size=768,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        head_dim=32,
        max_position_embeddings=max_len,
    )
