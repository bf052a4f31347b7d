"""Test-session setup: 8 fake CPU devices so mesh-sharded code runs as it would on 8 chips.

XLA reads the flag when the CPU backend starts, so it must be set before any test touches jax.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
