"""Test setup: 8 simulated CPU devices for every test, set before jax is imported."""

import os

# 8 simulated devices; XLA:CPU backend optimisation off, which halves compile time (the suite is
# compile-bound; benchmarks run fully optimised).
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
