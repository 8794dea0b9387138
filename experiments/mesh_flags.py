"""The scale-out flags every experiment shares: the device mesh and the multi-process set-up.

  --mesh=data:D,fsdp:F,expert:X     axes left out are 1; the sizes multiply to the global device
                                    count; default: all devices on `data`
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I
                                    one process of a multi-process run (process 0 listens at
                                    HOST:PORT); without them the environment decides (a TPU pod
                                    slice's workers, a SLURM job's tasks), else one process
  --distributed_timeout=S           seconds to wait for every process to join

`setup()` is the first thing an experiment's `main` calls: it joins the processes (before any
device is touched), checks that every process was given the same flags, and returns the mesh.
Only process 0 writes files (`is_main()`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from absl import flags
from jax.sharding import Mesh

from moejax.parallel import distributed
from moejax.parallel import mesh as mesh_lib

MESH = flags.DEFINE_string(
    "mesh", None, "Device mesh 'data:D,fsdp:F,expert:X' (axes left out are 1; the sizes "
    "multiply to the global device count); default: all devices on data.")
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 of a multi-process run (with "
    "--num_processes and --process_id); default: from the environment (TPU pod slice, SLURM), "
    "else a single process.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..N-1.")
TIMEOUT = flags.DEFINE_integer("distributed_timeout", distributed.DEFAULT_TIMEOUT_S,
                               "Seconds to wait for every process to join the run.")

FLAG_NAMES = {"coordinator_address": "--coordinator_address",
              "num_processes": "--num_processes", "process_id": "--process_id",
              "timeout_s": "--distributed_timeout"}


def setup(*, default_devices: str = "all") -> tuple[Mesh, str | None]:
    """Joins the processes, checks the flags agree, and builds the mesh.

    Args:
      default_devices: without --mesh: "all" (every device on `data`) or "one" (the first
        device alone: small sweep cells; with several processes every device on `data`,
        since one device cannot hold a run of several processes).

    Returns:
      `(mesh, spec)`: the mesh and --mesh in canonical form (None when not given), for
      `TrainConfig.mesh`.

    Raises:
      ValueError: a bad flag (named), flags that differ between processes, or a mesh that does
        not fit the devices. RuntimeError: the processes could not join in time.
    """
    spec = None if MESH.value is None else mesh_lib.format_mesh_spec(
        mesh_lib.parse_mesh_spec(MESH.value, name="--mesh"))
    distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value,
                           timeout_s=TIMEOUT.value, names=FLAG_NAMES)
    values = {f"--{name}": value for name, value in flags.FLAGS.flag_values_dict().items()
              if name != "process_id"}
    distributed.check_same_on_every_process(values, what="flag")
    if spec is not None:
        return mesh_lib.mesh_from_spec(spec, name="--mesh"), spec
    if default_devices == "one" and jax.process_count() == 1:
        return mesh_lib.single_device_mesh(), None
    return mesh_lib.make_mesh(), None


def setup_sweep(config_from_flags: Callable[[], Any]) -> tuple[Mesh, Any]:
    """A sweep script's start: `setup(default_devices="one")`, then `cfg = config_from_flags()`
    and `cfg.check_mesh(mesh)`, every failure (a bad flag, a mesh some cell cannot use, processes
    that could not join) an absl `UsageError` before any training. Returns `(mesh, cfg)`."""
    from absl import app

    try:
        mesh, _ = setup(default_devices="one")  # first: joins the processes
        cfg = config_from_flags()
        cfg.check_mesh(mesh)
    except (ValueError, RuntimeError) as e:  # RuntimeError: the processes could not join
        raise app.UsageError(str(e)) from e
    return mesh, cfg


def is_main() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0
