"""A stand-in training run in a child process, for the tests that kill or signal a run.

  python -m tests.train.run_child WORKDIR '{"steps": 40, "ckpt_every": 4, "pace": 0.05}'

Runs `loop.run` on the stand-in model (`tests.train`) with `tests.train.test_loop`'s batches and
`train_cfg(**options)`, so an in-process run with the same options computes the same trajectory
bit for bit; then prints one JSON line `{"step": ..., "preempted": ...}` and exits 0. Options
besides `train_cfg`'s fields:

  pace          seconds to sleep before each batch, so that a signal or kill lands mid-run
  hang_in_save  a step whose checkpoint save stops half-way: orbax's writer thread blocks right
                after writing the first JSON item of that checkpoint (its temporary directory is
                on disk, the rename to `<step>` is not done) and `WORKDIR/HANG` appears; the test
                then kills the process in the middle of the save

The parent (`spawn`) passes its XLA flags on through the environment (tests/conftest.py sets
them), and the child uses the same matmul precision, as the parent's test session does.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class Paced:
    """`it`'s batches, each after `seconds` of sleep (checkpointable like `it`)."""

    def __init__(self, it, seconds: float):
        self.it, self.seconds = it, seconds

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(self.seconds)
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def hang_in_save(workdir: Path, step: int) -> None:
    """Makes the save of checkpoint `step` block after its first JSON item (see the docstring)."""
    import orbax.checkpoint as ocp

    handler = ocp.handlers.JsonCheckpointHandler
    original = handler._save_fn

    async def _save_fn(self, x, directory):
        await original(self, x, directory)
        if re.search(rf"(^|/){step}\.orbax-checkpoint-tmp", str(directory)):
            (workdir / "HANG").write_text(str(directory))
            while True:  # the writer thread; the test kills the process here
                time.sleep(1.0)

    handler._save_fn = _save_fn


def spawn(workdir: Path, **options) -> subprocess.Popen:
    """Starts the child on `workdir` (stdout and stderr to files in `workdir`'s parent)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = workdir.parent / f"{workdir.name}.child.log"
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.train.run_child", str(workdir), json.dumps(options)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def child_log(workdir: Path) -> str:
    """What the children on `workdir` printed so far (for failure messages)."""
    log = workdir.parent / f"{workdir.name}.child.log"
    return log.read_text(errors="replace") if log.exists() else ""


def main(argv: list[str]) -> None:
    import tests.conftest  # noqa: F401  (XLA flags and matmul precision, before jax is used)

    _run(argv)


def run_in_process(workdir: Path, *, train_data=None, pace: float = 0.0, **options):
    """The child's run, in this process: the same model, batches, config and mesh."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from moejax.train import loop
    from tests.train import stand_in
    from tests.train.test_loop import batches, train_cfg

    if train_data is None:
        train_data = Paced(batches(), pace) if pace else batches()
    return loop.run(stand_in.StandInConfig(), train_cfg(**options), workdir,
                    train_data=train_data, model=stand_in,
                    mesh=Mesh(np.asarray(jax.devices()[:1]), ("data",)), progress=False)


def _run(argv: list[str]) -> None:
    workdir, options = Path(argv[1]), json.loads(argv[2])
    if (hang := options.pop("hang_in_save", None)) is not None:
        hang_in_save(workdir, hang)
    result = run_in_process(workdir, **options)
    print(json.dumps({"step": result.step, "preempted": result.preempted}), flush=True)


if __name__ == "__main__":
    main(sys.argv)
