"""Two processes on localhost with jax.distributed (CPU collectives over gloo), 4 CPU devices
each, run two train steps on an (8, 1) mesh and match the single-process 8-device result."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
from test_train import CFG, make_batch, run_steps

from ftjax import sharding

WORKER = """
import json, os, sys
pid, port = int(sys.argv[1]), sys.argv[2]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=pid)
import numpy as np
from flax import nnx
from tests.test_train import CFG, MODEL, make_batch
from ftjax import sharding, train
from ftjax.models import transformer

full = make_batch()
mesh = sharding.make_mesh(sharding.MeshConfig(8, 1))
graphdef, state = train.init_state(transformer.Transformer(MODEL, rngs=nnx.Rngs(0)), CFG,
                                   jax.random.PRNGKey(0))
step_fn, state = train.make_train_step(graphdef, state, full, CFG, mesh)
rows = full.tokens_BxT.shape[0] // jax.process_count()
mine = jax.tree.map(lambda x: np.asarray(x)[pid * rows:(pid + 1) * rows], full)
batch = sharding.global_batch(mine, mesh)
history = []
for _ in range(2):
    state, metrics = step_fn(state, batch)
    history.append({k: float(v) for k, v in metrics.items()})
print("RESULT " + json.dumps(history), flush=True)
jax.distributed.shutdown()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_process():
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"}
    port = str(free_port())
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(pid), port], cwd=root,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for pid in (0, 1)]
    outputs = []
    try:
        for worker in workers:
            out, _ = worker.communicate(timeout=300)
            assert worker.returncode == 0, out[-3000:]
            outputs.append(out)
    finally:
        for worker in workers:
            worker.kill()
    _, want, _ = run_steps(sharding.MeshConfig(8, 1), CFG, make_batch())
    for out in outputs:
        (line,) = [x for x in out.splitlines() if x.startswith("RESULT ")]
        got = json.loads(line[len("RESULT "):])
        for step, tol in ((0, 1e-5), (1, 1e-4)):
            for key, value in want[step].items():
                atol = 1e-3 if key.startswith("credit/corr") else tol / 10
                np.testing.assert_allclose(got[step][key], value, rtol=tol, atol=atol,
                                           err_msg=f"step {step} {key}")
