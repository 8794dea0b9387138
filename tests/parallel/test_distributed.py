"""`moejax.parallel.distributed` in one process: cluster detection from the environment, the
argument checks of `initialize` (naming the flags), and the cross-process check's no-op with one
process. The multi-process paths run in tests/parallel/test_multiprocess.py."""

from __future__ import annotations

import pytest

from moejax.parallel import distributed

NAMES = {"coordinator_address": "--coordinator_address", "num_processes": "--num_processes",
         "process_id": "--process_id", "timeout_s": "--distributed_timeout"}


@pytest.mark.parametrize(("env", "want"), [
    ({}, None),
    ({"TPU_WORKER_HOSTNAMES": "t1k-w-0"}, None),  # a single-host TPU VM
    ({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"}, "tpu"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080"}, "tpu"),
    ({"SLURM_JOB_ID": "17", "SLURM_NTASKS": "1"}, None),  # one task: a plain process
    ({"SLURM_JOB_ID": "17", "SLURM_NTASKS": "16"}, "slurm"),
    ({"SLURM_JOB_ID": "17", "SLURM_STEP_NUM_TASKS": "2"}, "slurm"),
    ({"SLURM_NTASKS": "16"}, None),  # no job
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "mpi"),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, None),
], ids=lambda v: str(v))
def test_detect_cluster(env, want):
    assert distributed.detect_cluster(env) == want


def test_single_process_without_flags_or_cluster():
    got = distributed.initialize(environ={})
    assert (got.num_processes, got.process_id, got.how) == (1, 0, "single")
    assert got.describe() == "1 process"
    one = distributed.initialize("127.0.0.1:1234", 1, 0, environ={})  # N = 1: nothing to join
    assert one.num_processes == 1
    distributed.check_same_on_every_process({"--lr": 1e-3})  # one process: nothing to compare


@pytest.mark.parametrize(("args", "match"), [
    (dict(num_processes=2), "--num_processes given without --coordinator_address, "
                            "--process_id: a multi-process run needs all three"),
    (dict(coordinator_address="h:1", process_id=0), "without --num_processes"),
    (dict(coordinator_address="host", num_processes=2, process_id=0),
     "--coordinator_address must be HOST:PORT"),
    (dict(coordinator_address="host:0", num_processes=2, process_id=0), "HOST:PORT"),
    (dict(coordinator_address="host:70000", num_processes=2, process_id=0), "HOST:PORT"),
    (dict(coordinator_address=8476, num_processes=2, process_id=0), "must be a string"),
    (dict(coordinator_address="h:1", num_processes=0, process_id=0),
     "--num_processes must be >= 1"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), "--process_id must be <= 1"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=-1),
     "--process_id must be >= 0"),
    (dict(coordinator_address="h:1", num_processes="2", process_id=0), "must be an int"),
    (dict(timeout_s=0), "--distributed_timeout must be >= 1"),
])
def test_bad_arguments_name_the_flag(args, match):
    with pytest.raises(ValueError, match=match):
        distributed.initialize(**args, names=NAMES, environ={})


def test_check_address():
    assert distributed.check_address(" 10.0.0.1:8476 ") == "10.0.0.1:8476"
    assert distributed.check_address("[::1]:8476") == "[::1]:8476"
    assert distributed.check_address("node-3.cluster:1") == "node-3.cluster:1"
