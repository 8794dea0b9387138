"""Test setup: 8 simulated CPU devices for every test, set before jax is imported."""

import gc
import os
import signal
import warnings

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
def _module_hygiene(request):
    """What one test file leaves behind must not reach the next one on the same xdist worker.

    * jax's compiled executables (and what only they keep alive) are dropped when a file ends.
      Without it each worker kept every executable the suite compiled: about 5 GB per worker
      half-way through, on course for more than the CI machine's 24 GB (the CI run of stop 24
      lost a worker). Compiled fixtures are shared within a file, so this costs no recompiles
      inside one.
    * The SIGINT/SIGTERM handlers are put back if the file changed them (with a warning naming
      it): the preemption tests check what a second signal reaches."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in handlers.items():
        if signal.getsignal(sig) is not handler and handler is not None:
            warnings.warn(f"{request.node.nodeid} left the {sig.name} handler changed "
                          f"({signal.getsignal(sig)!r}); put back", stacklevel=1)
            signal.signal(sig, handler)
    jax.clear_caches()
    gc.collect()
