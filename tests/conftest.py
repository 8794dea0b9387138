"""Test setup: 8 simulated CPU devices for every test, set before jax is imported."""

import gc
import os

# 8 simulated devices; XLA:CPU backend optimisation off, which halves compile time (the suite is
# compile-bound; benchmarks run fully optimised).
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_code_after_each_module():
    """Drops jax's compiled executables (and what only they keep alive) when a test file ends.

    Without it each xdist worker keeps every executable the suite compiled: about 5 GB per worker
    half-way through, on course for more than the CI machine's 24 GB by the end (the CI run of
    stop 24 lost a worker that way). Compiled fixtures are shared within a file, so clearing at a
    file's end costs no recompiles inside one."""
    yield
    jax.clear_caches()
    gc.collect()
