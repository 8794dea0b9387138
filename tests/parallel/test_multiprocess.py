"""`experiments.train_lm` as two processes × 4 CPU devices over `jax.distributed` (gloo
collectives, coordinator on 127.0.0.1), resumed across topologies (2 × 4 → 1 process × 8
devices → 1 device): each continues the same trajectory; processes given different
flags, and a coordinator that never answers, fail by name.

Every run is a real `python -m experiments.train_lm` subprocess on the default corpus (the tiny
MoE preset, 8 steps of 8 × 32 tokens).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from moejax.train import read_metrics

REPO = Path(__file__).resolve().parents[2]
STEPS = 8
MESH = "data:2,fsdp:2,expert:2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                         "--xla_backend_optimization_level=0")
    return env


def _args(workdir: Path, mesh: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "experiments.train_lm", f"--workdir={workdir}", "--preset=tiny",
            f"--steps={STEPS}", "--batch_size=8", "--seq_len=32", "--log_every=1",
            "--eval_every=0", "--eval_batches=1", "--ckpt_every=2", "--warmup_steps=1",
            "--lr=1e-2", "--sample_tokens=0", f"--mesh={mesh}", *extra]


def _check(proc: subprocess.CompletedProcess | tuple, what: str) -> None:
    rc, out = proc if isinstance(proc, tuple) else (proc.returncode, proc.stdout)
    assert rc == 0, f"{what} failed (rc {rc}):\n{out[-3000:]}"


def run_one(workdir: Path, mesh: str, devices: int, *extra: str) -> str:
    proc = subprocess.run(_args(workdir, mesh, *extra), env=_env(devices), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    _check((proc.returncode, proc.stdout + proc.stderr), f"train_lm on {devices} devices")
    return proc.stdout + proc.stderr


def run_two(workdir: Path, mesh: str, *extra: str, per_process=((), ()),
            timeout: int = 600) -> list[tuple[int, str]]:
    """Both processes of a 2 × 4-device run; returns each one's (returncode, output)."""
    port = _free_port()
    procs = [subprocess.Popen(
        _args(workdir, mesh, *extra, f"--coordinator_address=127.0.0.1:{port}",
              "--num_processes=2", f"--process_id={i}", *per_process[i]),
        env=_env(4), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    results = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append((p.returncode, out))
    return results


def _losses(workdir: Path) -> np.ndarray:
    return np.asarray([r["loss"] for r in read_metrics(workdir / "metrics.jsonl")])


def _as_if_stopped_after(src: Path, dest: Path, step: int) -> None:
    """A copy of run `src` as if it had been stopped after checkpoint `step` (newer checkpoints
    removed; the resumed run drops the metrics lines past it itself)."""
    shutil.copytree(src, dest)
    for ckpt in (dest / "checkpoints").iterdir():
        if ckpt.name.isdigit() and int(ckpt.name) > step:
            shutil.rmtree(ckpt)


def test_two_processes_train_as_one_and_resume_on_other_topologies(tmp_path):
    """2 × 4 devices, then resumed from its step-4 checkpoint by 1 × 8 devices, then from that
    run's step-6 checkpoint by one device: every step after a change of topology equals the 2 × 4
    run's (≤ 1e-5), so the topologies compute the same step on the same state and data (a
    wrong split of the data or of the state across processes would show from step 5 on)."""
    two = tmp_path / "two"
    results = run_two(two, MESH)
    for i, (rc, out) in enumerate(results):
        _check((rc, out), f"process {i}")
    assert "2 process(es), 8 devices, mesh data:2,fsdp:2,expert:2; this process reads share 0 " \
           "of 2 of each batch" in results[0][1]  # the log names processes and mesh
    reference = _losses(two)
    steps = [r["step"] for r in read_metrics(two / "metrics.jsonl")]
    assert steps == list(range(1, STEPS + 1))  # process 0 wrote each step once
    assert np.all(np.isfinite(reference)) and reference[-1] < reference[0]  # it learns

    # Saved by 2 processes × 4 devices at step 4, resumed by 1 process × 8 devices...
    eight = tmp_path / "eight"
    _as_if_stopped_after(two, eight, 4)
    assert "Resuming from step 4" in run_one(eight, MESH, 8)
    np.testing.assert_allclose(_losses(eight), reference, rtol=1e-5)
    # ... whose step-6 checkpoint resumes on one device (the data position carries over).
    one = tmp_path / "one"
    _as_if_stopped_after(eight, one, 6)
    out = run_one(one, "data:1", 1)
    assert "Resuming from step 6" in out and "train.mesh: 'data:2,fsdp:2,expert:2' != " in out
    np.testing.assert_allclose(_losses(one), reference, rtol=1e-5)


def test_processes_with_different_flags_are_refused(tmp_path):
    results = run_two(tmp_path / "run", MESH, per_process=(("--lr=1e-2",), ("--lr=3e-3",)),
                      timeout=300)
    for rc, out in results:
        assert rc != 0 and "the processes were given different flags: --lr" in out, out[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_coordinator_that_never_answers_is_a_clear_error(tmp_path):
    port = _free_port()  # nothing listens there
    proc = subprocess.run(
        _args(tmp_path / "run", MESH, f"--coordinator_address=127.0.0.1:{port}",
              "--num_processes=2", "--process_id=1", "--distributed_timeout=2"),
        env=_env(4), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert (f"--coordinator_address=127.0.0.1:{port}: no coordinator answered within 2 s "
            "(--distributed_timeout) for process 1 of 2") in proc.stderr + proc.stdout
