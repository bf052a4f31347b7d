"""Test-session setup, before any test touches jax (XLA reads these when the backend starts):

- 8 fake CPU devices, so mesh-sharded code runs as it would on 8 chips;
- a persistent compilation cache shared by the pytest workers and the processes the tests start
  (a run directory resumed in a subprocess, the 2-process multi-host tests). Many tests compile
  the same tiny programs; the cache hands back the executable XLA built the first time, so it
  changes how long a run takes, never what it computes. A user's own JAX_COMPILATION_CACHE_DIR
  wins; delete the directory to start cold.
"""

import os
import tempfile

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

_CACHE = os.path.join(tempfile.gettempdir(), f"ftjax-tests-jax-cache-{os.getuid()}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
