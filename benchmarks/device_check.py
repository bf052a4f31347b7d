"""The real train step and sampler timed on an accelerator, in one run under a time budget.

For a device lent for minutes, with nothing to install. Measured, most important first: the
train step (`mesh_step.make_train_step` on the 1-device mesh, the state created already sharded by
`state_init.init_state_sharded`; a Qwen3 shape with random weights, the largest of `--models` that
fits; bf16 compute, remat full, `scan_layers`, `logit_chunk` 512, prompt 256) at 1K response
tokens with flowtracer then uniform credit, then the same at 8K; `sampling.generate` tokens/s
at batch 64 then 256 (float32 parameters, as `loop.run` samples, and bfloat16); `credit_pass
separate` at 1K and 8K; then the next model's steps.
Per step: compile time, first call, the median of warm steps, XLA's plan (`memory_analysis()`
of that same compile) and the measured peak (`memory_stats()["peak_bytes_in_use"]`). The card
and the package versions go with them.

Each item runs in its own subprocess: the device's peak counter cannot be reset, so only a fresh
process gives a per-setting peak; an out-of-memory error or a hang then costs one item, not the
run. The price is the process start and the state's init in every item (the persistent
compilation cache, `--cache_dir`, takes the repeated init compiles off). `--isolate none` runs
the items in this process instead (tests; the peaks are then running peaks). A micro-batch whose
plan is over the device's limit is halved before anything runs. An item is not started with
less than `--min_item_s` left; a running one is killed at the deadline, and every finished item
is in --out (one JSON file and one Markdown table, both named device_check; each item's own
record under items/) as soon as it ends.
Usage: python -m benchmarks.device_check --out DIR [--budget_s 480] [--tiny]
       [--models qwen3-4b,qwen3-1.7b] [--repeats 3] [--isolate process|none]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.metadata
import json
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time

# The driver imports no jax: on a GPU, a backend started here would take the memory the items
# need. The items import it (`run_item`).

GIB = 2**30
REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = (  # noqa: SIM905 - one line beats twelve
    "jax jaxlib jax-cuda12-plugin jax-cuda13-plugin libtpu flax optax orbax-checkpoint chex numpy"
).split()
# name -> (prompt, responses (short, long), rows and first micro_batch per length, logit_chunk,
# generation batches, new tokens).
SIZES = {
    "full": dict(
        prompt=256,
        responses=(1024, 8192),
        rows=(8, 2),
        micro=(8, 1),
        logit_chunk=512,
        gen_batches=(64, 256),
        new_tokens=1024,
    ),
    "tiny": dict(
        prompt=8,
        responses=(24, 56),
        rows=(4, 2),
        micro=(4, 1),
        logit_chunk=8,
        gen_batches=(2, 4),
        new_tokens=16,
    ),
}


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the JSON and Markdown reports")
    parser.add_argument("--budget_s", type=float, default=480.0, help="whole run, seconds")
    parser.add_argument(
        "--min_item_s",
        type=float,
        default=None,
        help="do not start an item with less left (default 60; tiny 0)",
    )
    parser.add_argument(
        "--models",
        default="qwen3-4b,qwen3-1.7b",
        help="named shapes, largest first: the first that fits is measured first; NAME:LAYERS "
        "cuts a shape to LAYERS layers",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny model and lengths (CPU tests)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--gen_repeats", type=int, default=1, help="timed generations")
    parser.add_argument("--isolate", default="process", choices=("process", "none"))
    parser.add_argument(
        "--cache_dir",
        default=None,
        help="persistent compilation cache for the items ('none': off; default "
        "/tmp/ftjax-device-check-jax-cache, tiny: off; JAX_COMPILATION_CACHE_DIR "
        "wins)",
    )
    parser.add_argument(
        "--items",
        default=None,
        help="run only these plan indices, e.g. 0,1,2 (the others: skipped)",
    )
    parser.add_argument("--item", default=None, help=argparse.SUPPRESS)  # a subprocess's item
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.gen_repeats < 1:
        parser.error("--repeats and --gen_repeats must be >= 1")
    return args


def plan(args: argparse.Namespace) -> list[dict]:
    """The items, most important first. `role` main is the largest model that fits (decided at
    run time), second the next one."""
    size = SIZES["tiny" if args.tiny else "full"]
    (short, long), (rows_s, rows_l), (micro_s, micro_l) = (
        size["responses"],
        size["rows"],
        size["micro"],
    )
    step = lambda role, r, rows, micro, credit, cpass="fused", attention="xla": dict(  # noqa: E731
        kind="step",
        role=role,
        prompt=size["prompt"],
        response=r,
        rows=rows,
        micro_batch=micro,
        credit=credit,
        credit_pass=cpass,
        attention=attention,
        logit_chunk=size["logit_chunk"],
        repeats=args.repeats,
    )
    gen = lambda role, batch, dtypes: dict(  # noqa: E731
        kind="gen",
        role=role,
        prompt=size["prompt"],
        new_tokens=size["new_tokens"],
        runs=[(batch, d) for d in dtypes],
        repeats=args.gen_repeats,
    )
    small, large = size["gen_batches"]
    return [
        step("main", short, rows_s, micro_s, "flowtracer"),
        step("main", short, rows_s, micro_s, "uniform"),
        step("main", long, rows_l, micro_l, "flowtracer"),
        step("main", long, rows_l, micro_l, "uniform"),
        gen("main", small, ("float32", "bfloat16")),
        gen("main", large, ("bfloat16", "float32")),
        step("main", short, rows_s, micro_s, "flowtracer", "separate"),
        step("main", long, rows_l, micro_l, "flowtracer", "separate"),
        # cuDNN flash attention in the layers that do not capture (never run yet: no GPU so far)
        step("main", long, rows_l, micro_l, "flowtracer", attention="cudnn"),
        step("main", long, rows_l, micro_l, "uniform", attention="cudnn"),
        step("second", short, rows_s, micro_s, "flowtracer"),
        step("second", short, rows_s, micro_s, "uniform"),
        step("second", long, rows_l, micro_l, "flowtracer"),
        step("second", long, rows_l, micro_l, "uniform"),
    ]


def item_name(item: dict) -> str:
    if item["kind"] == "step":
        return (
            f"step {item['model']} response {item['response']} {item['credit']} "
            f"{item['credit_pass']} {item.get('attention', 'xla')}"
        )
    return f"generate {item['model']} batch {item['runs'][0][0]}"


def host_card() -> dict:
    """What the driver can say without starting a backend: versions, Python, nvidia-smi."""
    versions = {}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    card = {"versions": versions, "python": platform.python_version(), "host": platform.node()}
    if shutil.which("nvidia-smi"):
        query = [
            "nvidia-smi",
            "--query-gpu=name,memory.total,driver_version",
            "--format=csv,noheader",
        ]
        done = subprocess.run(query, capture_output=True, text=True, timeout=30, check=False)
        card["nvidia_smi"] = done.stdout.strip()
    return card


def write_report(report: dict, out: pathlib.Path) -> None:
    """Both files, each replaced whole (a kill mid-write leaves the previous one)."""
    for name, text in (
        ("device_check.json", json.dumps(report, indent=1)),
        ("device_check.md", markdown(report)),
    ):
        tmp = out / (name + ".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, out / name)


def _gib(value) -> str:
    return "" if value is None else f"{value / GIB:.2f}"


def _num(value, digits=2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    card = report.get("card") or {}
    versions = ", ".join(f"{k} {v}" for k, v in report["host"]["versions"].items())
    lines = [
        "# Device check (`python -m benchmarks.device_check`)",
        "",
        f"Device: {card.get('device_kind', '?')} ({card.get('platform', '?')}, "
        f"{card.get('device_count', '?')} devices, allocator limit "
        f"{_gib(card.get('bytes_limit'))} GiB); {report['host'].get('nvidia_smi', '')}",
        f"Python {report['host']['python']}; {versions}.",
        f"Budget {report['budget_s']:.0f} s, elapsed {report['elapsed_s']:.0f} s, started "
        f"{report['started']}, isolation `{report['isolate']}`"
        + ("" if report["finished"] else " (**still running or killed: partial**)")
        + ".",
        "",
        "## Train step",
        "",
        "Random weights, 1-device mesh, bf16 compute, remat full, scan_layers, logit_chunk "
        f"{report['logit_chunk']}. step s = median of the warm steps; compile s = XLA compile of "
        "the step alone; planned = that compile's memory_analysis (args + outputs + temps - "
        "aliased); peak = `peak_bytes_in_use` of the item's process (with `--isolate none`: of "
        "the whole run so far); /512 = step s / rows x 512 (one device, linear).",
        "",
        "| model | T | rows | micro | credit | pass | compile s | first s | step s (n) | "
        "tokens/s | / uniform | /512 s | planned GiB | peak GiB | state GiB | status |",
        "|" + "---|" * 16,
    ]
    steps = [i for i in report["items"] if i["kind"] == "step"]
    for item in steps:
        r = item.get("result", {})
        base = uniform_of(item, steps)
        ratio = (r["step_s"] / base) if r.get("step_s") and base else None
        per512 = r["step_s"] / item["rows"] * 512 if r.get("step_s") else None
        lines.append(
            f"| {item['model'] or item['role']} | {item['prompt'] + item['response']} | "
            f"{item['rows']} | {r.get('micro_batch', item['micro_batch'])} | {item['credit']} | "
            f"{item['credit_pass']}{' cudnn' if item.get('attention') == 'cudnn' else ''} | "
            f"{_num(r.get('compile_s'), 1)} | "
            f"{_num(r.get('first_call_s'))} | {_num(r.get('step_s'), 3)} "
            f"({len(r.get('step_times_s', []))}) | {_num(r.get('tokens_per_s'), 0)} | "
            f"{_num(ratio)} | {_num(per512, 0)} | {_gib(r.get('planned_bytes'))} | "
            f"{_gib(r.get('peak_bytes'))} | {_gib(r.get('state_bytes'))} | "
            f"{status_text(item)} |"
        )
    lines += [
        "",
        "## Rollout generation",
        "",
        "`sampling.generate`, temperature 1, random prompts, no EOS (every row decodes all "
        "its tokens); tokens/s = batch x new tokens / run s (prefill included); first s = "
        "compile + one run; peak = the item process's running peak.",
        "",
        "| model | dtype | batch | prompt | new tokens | first s | run s | tokens/s | "
        "peak GiB | status |",
        "|" + "---|" * 10,
    ]
    for item in (i for i in report["items"] if i["kind"] == "gen"):
        runs = item.get("result", {}).get("runs") or [
            {"batch": b, "dtype": d} for b, d in item["runs"]
        ]
        for run in runs:
            lines.append(
                f"| {item['model'] or item['role']} | {run['dtype']} | {run['batch']} | "
                f"{item['prompt']} | {item['new_tokens']} | {_num(run.get('first_call_s'))} | "
                f"{_num(run.get('run_s'), 3)} | {_num(run.get('tokens_per_s'), 0)} | "
                f"{_gib(run.get('peak_bytes'))} | {run.get('error') or status_text(item)} |"
            )
    return "\n".join(lines)


def uniform_of(item: dict, steps: list[dict]) -> float | None:
    """The step time of the uniform fused item with `item`'s model, lengths and attention."""
    for other in steps:
        keys = ("model", "response", "rows", "attention")
        same = all(other.get(k) == item.get(k) for k in keys)
        if same and other["credit"] == "uniform" and other["credit_pass"] == "fused":
            return other.get("result", {}).get("step_s")
    return None


def status_text(item: dict) -> str:
    reason = item.get("reason") or item.get("result", {}).get("reason") or ""
    return item["status"] + (f": {reason}" if reason else "")


def run_subprocess(
    item: dict, args: argparse.Namespace, path: pathlib.Path, deadline: float
) -> dict:
    """Run one item in a fresh process (its own session, killed whole at the deadline); return
    what it wrote to `path`, however far it got."""
    spec = {**item, "record": str(path), "deadline": deadline}
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # one process holds the device
    cache = args.cache_dir or ("none" if args.tiny else "/tmp/ftjax-device-check-jax-cache")
    if cache != "none":
        env.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "benchmarks.device_check", "--out", str(path.parent)]
    command += ["--item", json.dumps(spec)]
    # Its own session, so that a kill reaches the compilers XLA starts too; the item ends itself
    # when this process dies (an outer timeout) and a little after the deadline (`_guard`).
    proc = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=max(1.0, deadline - time.time() + 5))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the item's own process group, started above
        proc.wait()
        code = None
    record = json.loads(path.read_text()) if path.is_file() else {}
    if code is None or code == 3:  # killed here, or by its own watchdog (`_guard`)
        where = ""
        if "stage" in record:
            where = f" ({record['stage']} for {time.time() - record['stage_started']:.0f} s)"
        record.update(status="killed", reason=f"the budget ran out while it ran{where}")
    elif record.get("status", "running") == "running":  # it died without saying why
        record.update(status="error", reason=f"the item's process exited with code {code}")
    return record


def _guard(deadline: float) -> None:
    """In an item's process: SIGKILL it when the driver dies (Linux), and end it 10 s after the
    deadline, whatever it is doing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG

    def wait_then_exit():
        time.sleep(max(0.0, deadline + 10 - time.time()))
        os._exit(3)

    threading.Thread(target=wait_then_exit, daemon=True).start()


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = pathlib.Path(args.out)
    if args.item is not None:  # this process is one item of a run
        spec = json.loads(args.item)
        _guard(spec["deadline"])
        from benchmarks import device_items

        device_items.run_item(spec)
        return {}
    (out / "items").mkdir(parents=True, exist_ok=True)
    start = time.time()
    deadline = start + args.budget_s
    min_item_s = args.min_item_s if args.min_item_s is not None else (0 if args.tiny else 60)
    models = ["tiny"] if args.tiny else args.models.split(",")
    selected = None if args.items is None else {int(i) for i in args.items.split(",")}
    report = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "budget_s": args.budget_s,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "isolate": args.isolate,
        "logit_chunk": SIZES["tiny" if args.tiny else "full"]["logit_chunk"],
        "host": host_card(),
        "card": None,
        "items": [],
        "finished": False,
        "elapsed_s": 0.0,
    }
    print(f"device_check: budget {args.budget_s:.0f} s, models {models}, out {out}", flush=True)
    for n, item in enumerate(plan(args)):
        while True:
            roles = {"main": models[0], "second": models[1] if len(models) > 1 else None}
            item = {**item, "model": roles[item["role"]], "index": n}
            left = deadline - time.time()
            if selected is not None and n not in selected:
                result = {"status": "skipped", "reason": "not in --items"}
            elif item["model"] is None:
                result = {"status": "skipped", "reason": "no second model fits or is named"}
            elif left < max(min_item_s, 1.0):
                result = {"status": "skipped", "reason": f"budget: {left:.0f} s left"}
            else:
                print(f"[{time.time() - start:6.0f} s] {item_name(item)} ...", flush=True)
                if args.isolate == "process":
                    path = out / "items" / f"{len(report['items']):02d}.json"
                    result = run_subprocess(item, args, path, deadline)
                else:
                    from benchmarks import device_items

                    result = device_items.run_item({**item, "deadline": deadline})
            # The first item decides the main model: the largest that fits.
            if n == 0 and result.get("status") == "does_not_fit" and len(models) > 1:
                print(f"  {models[0]} does not fit ({result.get('reason')}); next", flush=True)
                report["items"].append({**item, **result, "name": item_name(item)})
                models.pop(0)
                continue
            break
        report["card"] = report["card"] or result.get("card")
        report["items"].append({**item, **result, "name": item_name(item)})
        report["elapsed_s"] = time.time() - start
        write_report(report, out)
        print(f"  -> {status_text(report['items'][-1])} {summary(result)}", flush=True)
    report.update(finished=True, elapsed_s=time.time() - start)
    write_report(report, out)
    print(markdown(report), flush=True)
    return report


def summary(result: dict) -> str:
    r = result.get("result", {})
    if "step_s" in r:
        return (
            f"step {r['step_s']:.3f} s, compile {r['compile_s']:.1f} s, planned "
            f"{_gib(r['planned_bytes'])} GiB, peak {_gib(r.get('peak_bytes'))} GiB"
        )
    runs = [
        f"{x['dtype']} batch {x['batch']}: "
        + (f"{x['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in x else x.get("error", "?"))
        for x in r.get("runs", [])
    ]
    return ", ".join(runs)


if __name__ == "__main__":
    main()
