"""Multi-process runs: `jax.distributed` set up from flags or from the environment, and a check
that every process was given the same settings.

One program runs on every host (a TPU pod slice's workers, a SLURM job's tasks, local
processes); `jax.distributed.initialize` joins them into one runtime whose `jax.devices()` are
every process's devices, so one `Mesh` spans them and XLA's collectives (ICI/DCN on TPU, NCCL on
GPU, gloo on CPU) cross hosts.

  initialize(coordinator_address="10.0.0.1:8476", num_processes=2, process_id=0)   explicit
  initialize()      auto: joins when the environment says it is one of several processes
                    (`detect_cluster`: a TPU pod slice, a SLURM job of several tasks, Open MPI),
                    else stays a single process

It must run before anything touches a device (`jax.devices()`, an array, a jit call).

`check_same_on_every_process(values)` compares named values (flags, configs) across the
processes and raises naming those that differ: processes that trained with different settings
would compute silently wrong results or hang in a collective.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from moejax.validation import ArgumentTypeError, check_int

DEFAULT_TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class Distributed:
    """How this process was started.

    Attributes:
      num_processes: processes in the run (1: a single-process run).
      process_id: this process's index.
      how: "single" (no `jax.distributed`), "flags" (explicit coordinator), or the cluster
        `detect_cluster` found ("tpu", "slurm", "mpi").
    """

    num_processes: int
    process_id: int
    how: str

    def describe(self) -> str:
        if self.num_processes == 1:
            return "1 process"
        return f"process {self.process_id} of {self.num_processes} ({self.how})"


def _int_env(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ.get(name, "1").split("(")[0])
    except ValueError:
        return 1


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """The multi-process environment this process runs in, or None for a single process.

    * "tpu": a TPU pod slice of several hosts (`TPU_WORKER_HOSTNAMES` lists more than one, or
      `MEGASCALE_COORDINATOR_ADDRESS` is set: multislice);
    * "slurm": a SLURM job step of more than one task (`SLURM_JOB_ID` and `SLURM_NTASKS` or
      `SLURM_STEP_NUM_TASKS` > 1);
    * "mpi": Open MPI with `OMPI_COMM_WORLD_SIZE` > 1.

    `jax.distributed.initialize()` then finds the coordinator, process count and index itself.
    """
    env = os.environ if environ is None else environ
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    if "SLURM_JOB_ID" in env and max(_int_env(env, "SLURM_NTASKS"),
                                     _int_env(env, "SLURM_STEP_NUM_TASKS")) > 1:
        return "slurm"
    if _int_env(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return "mpi"
    return None


def check_address(address: Any, *, name: str = "coordinator_address") -> str:
    """`HOST:PORT` (a port in 1..65535); ValueError naming `name` otherwise."""
    if not isinstance(address, str):
        raise ArgumentTypeError(f"{name} must be a string HOST:PORT, got {address!r}")
    match = re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[^:\s]+):(\d+)", address.strip())
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"{name} must be HOST:PORT (e.g. 10.0.0.1:8476), got {address!r}")
    return address.strip()


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = DEFAULT_TIMEOUT_S,
               environ: Mapping[str, str] | None = None,
               names: Mapping[str, str] | None = None) -> Distributed:
    """Joins this process to a multi-process run (see the module docstring).

    Args:
      coordinator_address: `HOST:PORT` of process 0 (it listens there); with it,
        `num_processes` and `process_id` are required.
      num_processes: N, the processes in the run.
      process_id: this process's index in [0, N).
      timeout_s: how long to wait for every process to join (and for the coordinator to
        answer) before failing, > 0.
      environ: the environment to detect a cluster in (default `os.environ`).
      names: what to call the arguments in messages, e.g. `{"coordinator_address":
        "--coordinator_address"}` (default: their own names).

    Returns:
      a `Distributed` (1 process when neither arguments nor the environment ask for more).

    Raises:
      ValueError / ArgumentTypeError: the arguments are incomplete or invalid (naming them).
      RuntimeError: the processes could not join within `timeout_s` (naming the coordinator),
        or a device was touched before this call.
    """
    names = {k: (names or {}).get(k, k) for k in
             ("coordinator_address", "num_processes", "process_id", "timeout_s")}
    given = {k: v for k, v in (("coordinator_address", coordinator_address),
                               ("num_processes", num_processes),
                               ("process_id", process_id)) if v is not None}
    check_int(names["timeout_s"], timeout_s, lo=1)
    if given:
        missing = [names[k] for k in ("coordinator_address", "num_processes", "process_id")
                   if k not in given]
        if missing:
            raise ValueError(f"{', '.join(names[k] for k in given)} given without "
                             f"{', '.join(missing)}: a multi-process run needs all three")
        address = check_address(coordinator_address, name=names["coordinator_address"])
        check_int(names["num_processes"], num_processes, lo=1)
        check_int(names["process_id"], process_id, lo=0, hi=num_processes - 1)
        if num_processes == 1:
            return Distributed(1, 0, "single")
        how, kwargs = "flags", dict(coordinator_address=address,
                                    num_processes=int(num_processes),
                                    process_id=int(process_id))
    else:
        how = detect_cluster(environ)
        if how is None:
            return Distributed(1, 0, "single")
        address, kwargs = "(from the environment)", {}
    if jax.distributed.is_initialized():
        return Distributed(jax.process_count(), jax.process_index(), how)
    # CPU collectives across processes (harmless where the devices are GPUs or TPUs).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if kwargs and process_id != 0:
        # The runtime aborts the process (no Python error) when the coordinator never answers,
        # so first wait for it to listen, and fail here, by name, if it does not.
        timeout_s = _wait_for_coordinator(address, timeout_s, names, process_id, num_processes)
    elif kwargs:
        print(f"process 0 of {num_processes}: coordinator at {address}; waiting up to "
              f"{timeout_s} s for every process to join ({names['timeout_s']})",
              file=sys.stderr, flush=True)
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=int(timeout_s))
    except Exception as e:  # the runtime raises XlaRuntimeError / RuntimeError with gRPC text
        cause = " ".join(str(e).split())[:300]
        raise RuntimeError(
            f"{names['coordinator_address']}={address}: this process "
            f"({names['process_id']}={process_id}, {names['num_processes']}={num_processes}) "
            f"could not join the run within {timeout_s} s: {cause}. Check that process 0 runs "
            "and listens at that address, that every process got the same "
            f"{names['num_processes']}, and that the port is reachable.") from e
    return Distributed(jax.process_count(), jax.process_index(), how)


def _wait_for_coordinator(address: str, timeout_s: int, names: Mapping[str, str],
                          process_id: int, num_processes: int) -> int:
    """Waits until something listens at `address`; returns the seconds left of `timeout_s`.

    Raises:
      RuntimeError: nothing listened there within `timeout_s` (naming the flags).
    """
    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, int(port)), timeout=max(0.1, min(1.0, left))):
                return max(1, int(left))
        except OSError as e:
            if left <= 0:
                raise RuntimeError(
                    f"{names['coordinator_address']}={address}: no coordinator answered within "
                    f"{timeout_s} s ({names['timeout_s']}) for process {process_id} of "
                    f"{num_processes} ({e}). Start process 0 "
                    f"({names['process_id']}=0) with the same {names['coordinator_address']}, "
                    "and check the host name and that the port is reachable.") from None
            time.sleep(0.2)


def _fingerprint(value: Any) -> int:
    text = json.dumps(value, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def check_same_on_every_process(values: Mapping[str, Any], *, what: str = "setting") -> None:
    """Raises ValueError naming each of `values` (name -> JSON-able value) that is not the
    same on every process; nothing to do with one process. Every process must call it (it is a
    collective)."""
    if jax.process_count() == 1 or not values:
        return
    from jax.experimental import multihost_utils

    names = sorted(values)
    mine = np.asarray([_fingerprint(values[n]) for n in names], np.int32)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
    differ = [n for i, n in enumerate(names) if np.any(every[:, i] != every[0, i])]
    if differ:
        me = jax.process_index()
        shown = ", ".join(f"{n} (process {me} has {values[n]!r})" for n in differ)
        raise ValueError(f"the processes were given different {what}s: {shown}; every process "
                         f"must run with the same {what}s (only the process id differs)")
