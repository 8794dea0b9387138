"""Stops a run did not choose: SIGTERM/SIGINT (preemption, Ctrl-C) and `kill -9`.

SIGTERM or SIGINT: the step in progress finishes, a checkpoint of it is written, `run` returns
with `preempted=True` (the CLI exits 0) and the rerun continues the same trajectory. `kill -9`
at any moment, in the middle of a save included, leaves a workdir that resumes exactly.
Children run `tests/train/run_child.py` (the stand-in model); "exactly" means the final metrics
lines equal an uninterrupted run's in every deterministic field and the final state is equal
bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from moejax.train import Checkpointer, loop, read_metrics
from tests.train import run_child, stand_in
from tests.train.test_checkpoint import exact_fields
from tests.train.test_loop import batches

REPO = Path(__file__).resolve().parents[2]
TMP_MARK = "orbax-checkpoint-tmp"


def wait_for(predicate, proc: subprocess.Popen, workdir: Path, *, timeout: float = 120.0,
             log: Path | None = None):
    """Polls `predicate` until true; fails if the child exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout

    def output() -> str:
        text = log.read_text(errors="replace") if log else run_child.child_log(workdir)
        return text[-3000:]

    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"child exited ({proc.returncode}) too early:\n{output()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting:\n{output()}")
        time.sleep(0.01)


def kill_9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def checkpoint_steps(workdir: Path) -> list[int]:
    return Checkpointer(workdir, keep=1, read_only=True).all_steps()


def tmp_dirs(workdir: Path) -> list[str]:
    root = workdir / "checkpoints"
    return sorted(p.name for p in root.iterdir() if TMP_MARK in p.name) if root.exists() else []


def assert_same_run(workdir: Path, result, reference) -> None:
    """The metrics (no step lost or repeated) and the final state equal the reference's."""
    ref_dir, ref_result = reference
    got, want = read_metrics(workdir), read_metrics(ref_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert exact_fields(got) == exact_fields(want)
    for a, b in zip(jax.tree.leaves(ref_result.state), jax.tree.leaves(result.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class SignalAt:
    """Batches of `it`; drawing batch number `at` (1-based) sends `sig` to this thread `times`
    times (checkpointable like `it`).

    `signal.pthread_kill` to the calling thread runs the Python handler before it returns, so each
    signal is handled at that line. `os.kill` of the process may be delivered to one of XLA's
    threads instead; the main thread then runs the handler at some later bytecode, possibly inside
    a gc callback, where the KeyboardInterrupt of a second SIGINT is reported as unraisable and
    lost (seen: the run then stopped normally, "DID NOT RAISE"), or two signals merge into one."""

    def __init__(self, it, *, at: int, sig: int, times: int = 1):
        self.it, self.at, self.sig, self.times, self.n = it, at, sig, times, 0
        self.handlers = []  # the handler in place before each signal

    def __iter__(self):
        return self

    def __next__(self):
        self.n += 1
        if self.n == self.at:
            for _ in range(self.times):
                self.handlers.append(signal.getsignal(self.sig))
                signal.pthread_kill(threading.get_ident(), self.sig)
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


STEPS = 24


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of `STEPS` steps: `(workdir, RunResult)` (how often it checkpoints
    does not change the trajectory)."""
    workdir = tmp_path_factory.mktemp("reference")
    return workdir, run_child.run_in_process(workdir, steps=STEPS, ckpt_every=4)


needs_main_thread = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal handlers can only be installed from the main thread")


# ---------------------------------------------------------------------------------------------
# SIGTERM / SIGINT.


def test_sigterm_checkpoints_the_step_exits_0_and_the_rerun_continues_exactly(tmp_path,
                                                                              reference):
    cfg = dict(steps=STEPS, ckpt_every=0)  # no periodic checkpoint: the stop writes the only one
    work = tmp_path / "run"
    proc = run_child.spawn(work, **cfg, pace=0.1)
    wait_for(lambda: len(read_metrics(work)) >= 3, proc, work)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, run_child.child_log(work)[-3000:]
    log = run_child.child_log(work)
    out = json.loads(log.strip().splitlines()[-1])
    stopped = out["step"]
    assert out["preempted"] and 3 <= stopped < STEPS, log[-2000:]
    assert f"Received SIGTERM: stopped after step {stopped} of {STEPS}" in log
    assert checkpoint_steps(work) == [stopped]
    assert [r["step"] for r in read_metrics(work)] == list(range(1, stopped + 1))

    resumed = run_child.run_in_process(work, **cfg)
    assert resumed.step == STEPS and not resumed.preempted
    assert_same_run(work, resumed, reference)


@needs_main_thread
def test_sigint_stops_after_the_step_and_restores_the_handlers(tmp_path, capsys, reference):
    cfg = dict(steps=STEPS, ckpt_every=0)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    work = tmp_path / "run"
    stopped = run_child.run_in_process(
        work, train_data=SignalAt(batches(), at=5, sig=signal.SIGINT), **cfg)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert stopped.preempted and stopped.step == 5 and stopped.plot_paths == []
    assert f"Received SIGINT: stopped after step 5 of {STEPS}" in capsys.readouterr().out
    assert checkpoint_steps(work) == [5]

    resumed = run_child.run_in_process(work, **cfg)
    assert resumed.step == STEPS and not resumed.preempted
    assert_same_run(work, resumed, reference)


@needs_main_thread
def test_a_second_sigint_interrupts_at_once_and_the_workdir_stays_restorable(tmp_path):
    """The second SIGINT goes to the handler that was there before `run` (here the test's own,
    which raises KeyboardInterrupt as Python's default does), so it interrupts the step."""
    cfg = dict(steps=12, ckpt_every=2)

    def previous(signum, frame):
        raise KeyboardInterrupt

    outer = signal.signal(signal.SIGINT, previous)
    work = tmp_path / "run"
    data = SignalAt(batches(), at=5, sig=signal.SIGINT, times=2)
    try:
        run_child.run_in_process(work, train_data=data, **cfg)
    except KeyboardInterrupt:
        pass
    else:
        pytest.fail("the second SIGINT did not interrupt the run; the SIGINT handler before each "
                    f"signal was {data.handlers} (before the run: {previous})")
    finally:
        restored = signal.signal(signal.SIGINT, outer)
    assert data.handlers[1] is previous and restored is previous
    assert checkpoint_steps(work) == [2, 4]  # the interrupted step 5 saved nothing
    state, _ = loop.load_checkpoint(work, stand_in.StandInConfig(), model=stand_in)
    assert int(state.step) == 4


@needs_main_thread
def test_a_signal_before_the_first_step_stops_without_training(tmp_path, capsys):
    """SIGTERM while the run restores or compiles: no step, nothing saved, a normal return."""
    result = run_child.run_in_process(
        tmp_path, train_data=SignalAt(batches(), at=1, sig=signal.SIGINT), steps=STEPS)
    assert result.preempted and result.step == 0 and int(result.state.step) == 0
    assert "stopped after step 0 of 24; nothing trained yet" in capsys.readouterr().out
    assert checkpoint_steps(tmp_path) == [] and read_metrics(tmp_path) == []


def test_train_lm_reports_a_preempted_run_and_returns_normally(tmp_path, monkeypatch,
                                                               capsys):
    """What the CLI does with `RunResult(preempted=True)` (the real signal: the slow test)."""
    from absl import flags
    from absl.testing import flagsaver

    from experiments import train_lm

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    calls = []

    def preempted_run(model_cfg, train_cfg, workdir, **kwargs):
        calls.append(workdir)
        return loop.RunResult(state=None, step=7, metrics_path=Path(workdir) / "metrics.jsonl",
                              plot_paths=[], preempted=True)

    monkeypatch.setattr(train_lm.loop, "run", preempted_run)
    work = str(tmp_path / "run")
    with flagsaver.flagsaver(workdir=work, preset="tiny", steps=20, batch_size=2, seq_len=16,
                             sample_tokens=8):
        train_lm.main(["train_lm"])  # returns: absl's app.run then exits 0
    out = capsys.readouterr().out
    assert calls == [work]
    assert "Preempted: stopped at step 7 of 20, checkpoint saved." in out
    assert f"To resume, rerun the same command (--workdir={work})." in out
    assert "Sample after" not in out and "Metrics:" not in out


@pytest.mark.slow
def test_train_lm_cli_on_sigterm_prints_the_step_and_exits_0(tmp_path):
    work = tmp_path / "run"
    flags = dict(workdir=work, preset="tiny", steps=5000, batch_size=2, seq_len=16, log_every=1,
                 eval_every=0, eval_batches=1, ckpt_every=0, warmup_steps=1, sample_tokens=8)
    log = tmp_path / "cli.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "experiments.train_lm",
             *(f"--{k}={v}" for k, v in flags.items())],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=out,
            stderr=subprocess.STDOUT)
    wait_for(lambda: len(read_metrics(work)) >= 2, proc, work, timeout=240, log=log)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    text = log.read_text(errors="replace")
    assert rc == 0, text[-3000:]
    stopped = checkpoint_steps(work)
    assert len(stopped) == 1 and 2 <= stopped[0] < 5000, text[-3000:]
    assert f"Preempted: stopped at step {stopped[0]} of 5000" in text
    assert f"rerun the same command (--workdir={work})" in text
    assert "Sample after" not in text  # preempted: no sampling, exit promptly


# ---------------------------------------------------------------------------------------------
# kill -9.


def test_kill_9_in_the_middle_of_a_save_and_of_a_step_then_resume_exactly(tmp_path, reference):
    cfg = dict(steps=STEPS, ckpt_every=4)
    work = tmp_path / "run"

    # 1. Killed while checkpoint 8 is half-written (one item on disk, the rename not done).
    proc = run_child.spawn(work, **cfg, hang_in_save=8)
    wait_for(lambda: (work / "HANG").exists(), proc, work)
    assert any(name.startswith(f"8.{TMP_MARK}") for name in tmp_dirs(work)), tmp_dirs(work)
    kill_9(proc)
    assert checkpoint_steps(work) == [4]  # the half-written 8 is not a checkpoint

    # 2. Resumed from 4 (the temporary directory does not get in the way), killed at a random
    # moment after its checkpoint 8 is complete: mid-step, mid-log-line or mid-save.
    proc = run_child.spawn(work, **cfg, pace=0.1)
    wait_for(lambda: (work / "checkpoints" / "8").is_dir(), proc, work)
    time.sleep(random.Random(0).uniform(0.0, 0.4))
    kill_9(proc)
    steps = checkpoint_steps(work)
    assert 8 in steps and max(steps) < STEPS, steps

    # 3. The final run finishes the same trajectory.
    final = run_child.run_in_process(work, **cfg)
    assert final.step == STEPS
    assert_same_run(work, final, reference)
    assert checkpoint_steps(work) == [16, 20, 24] and tmp_dirs(work) == []


@pytest.mark.slow
def test_kill_9_at_random_moments_never_leaves_an_unrestorable_workdir(tmp_path):
    cfg = dict(steps=60, ckpt_every=3, keep_checkpoints=2)
    reference = run_child.run_in_process(tmp_path / "ref", **cfg)
    work = tmp_path / "run"
    rng = random.Random(1234)
    kills, deadline = 0, time.monotonic() + 300
    while kills < 8 and time.monotonic() < deadline:
        events = len(list((work / "tensorboard").glob("events.*")))
        proc = run_child.spawn(work, **cfg, pace=0.1)  # 6 s of steps: many kills land
        # Its writer exists once it has restored: kill from then on, at a random delay (during
        # compilation, a step, a metrics line, a save or the deletion of an old checkpoint).
        wait_for(lambda n=events: len(list((work / "tensorboard").glob("events.*"))) > n,
                 proc, work)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        if proc.wait(timeout=30) == 0:  # it finished before the kill
            break
        assert proc.returncode == -signal.SIGKILL, run_child.child_log(work)[-3000:]
        kills += 1
        if checkpoint_steps(work):  # restorable after every kill, with nothing set aside
            state, _ = loop.load_checkpoint(work, stand_in.StandInConfig(), model=stand_in)
            assert int(state.step) == max(checkpoint_steps(work))
            assert not (work / "checkpoints_damaged").exists()
    assert kills >= 3, f"only {kills} kills landed"
    final = run_child.run_in_process(work, **cfg)
    assert final.step == 60
    assert_same_run(work, final, (tmp_path / "ref", reference))
    assert tmp_dirs(work) == []
