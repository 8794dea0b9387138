"""Faults in a run's checkpoints: damaged ones on restore, write errors on save.

A damaged latest checkpoint (truncated array file, missing metadata, missing item or data
position) is reported by step and cause, moved to `workdir/checkpoints_damaged/`, and the run
resumes from the newest intact one with the same trajectory; with none intact the run refuses,
listing each, and moves nothing. A save that cannot be written fails naming the step, directory
and the checkpoint kept, and that checkpoint still restores.
"""

from __future__ import annotations

import errno
import json
import resource
import shutil
import signal
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import app, flags
from absl.testing import flagsaver

from moejax.train import Checkpointer, loop, read_metrics
from moejax.train import checkpoint as ckpt_lib
from tests.train import run_child, stand_in
from tests.train.test_checkpoint import Crashing, exact_fields
from tests.train.test_loop import batches, single_device_mesh, train_cfg

CFG = dict(steps=16, ckpt_every=4)  # the crashed run below holds checkpoints 4 and 8


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: `(workdir, RunResult)`."""
    workdir = tmp_path_factory.mktemp("reference")
    return workdir, run_child.run_in_process(workdir, **CFG)


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> Path:
    """A run that crashed during step 11: checkpoints 4 and 8, metrics of steps 1-10."""
    workdir = tmp_path_factory.mktemp("crashed")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_child.run_in_process(workdir, train_data=Crashing(batches(), at=11), **CFG)
    assert Checkpointer(workdir, keep=1, read_only=True).all_steps() == [4, 8]
    return workdir


def truncate_largest_array_file(step_dir: Path) -> None:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])


def drop_data_position_entry(step_dir: Path) -> None:
    path = step_dir / "data" / "metadata"
    state = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in state.items() if k != "next_index"}))


DAMAGE = {
    "truncated-array-file": (truncate_largest_array_file, "not valid for value of size"),
    "missing-ocdbt-manifest": (lambda d: (d / "state" / "manifest.ocdbt").unlink(),
                               "does not exist"),
    "missing-data-metadata": (lambda d: (d / "data" / "metadata").unlink(), "metadata not found"),
    "missing-data-entry": (drop_data_position_entry, "KeyError: next_index"),
    "missing-data-item": (lambda d: shutil.rmtree(d / "data"), "item 'data' is missing"),
    "missing-config-item": (lambda d: shutil.rmtree(d / "config"), "item 'config' is missing"),
    "emptied": (lambda d: [shutil.rmtree(p) for p in d.iterdir() if p.is_dir()], "is missing"),
}


def copy_and_damage(crashed: Path, workdir: Path, kind: str, steps=(8,)) -> None:
    shutil.copytree(crashed, workdir)
    for step in steps:
        DAMAGE[kind][0](workdir / "checkpoints" / str(step))


def stand_in_target():
    """The shapes of the stand-in run's checkpointed tree (what `run` restores into)."""
    optimizer, _ = loop.make_optimizer(train_cfg(**CFG))
    key = jax.random.key(0)
    shapes = jax.eval_shape(
        lambda k: loop.init_train_state(stand_in, stand_in.StandInConfig(), optimizer, k), key)
    return {"state": shapes, "rng": jax.eval_shape(jax.random.key_data, key)}


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints.


@pytest.mark.parametrize("kind", ["truncated-array-file", "missing-data-entry"])
def test_damaged_latest_is_set_aside_and_the_run_resumes_exactly(kind, crashed, reference,
                                                                 tmp_path, capsys):
    work = tmp_path / "run"
    copy_and_damage(crashed, work, kind)
    result = run_child.run_in_process(work, **CFG)
    out = capsys.readouterr().out
    moved = work / "checkpoints_damaged" / "8"
    assert "Checkpoint 8 is damaged (" in out and DAMAGE[kind][1] in out, out
    assert f"moved to {moved}, nothing deleted" in out
    assert "Resuming from step 4" in out
    assert moved.is_dir() and (moved / "state").is_dir()  # set aside whole, not deleted
    assert Checkpointer(work, keep=1, read_only=True).all_steps() == [8, 12, 16]
    ref_dir, ref = reference
    assert exact_fields(read_metrics(work)) == exact_fields(read_metrics(ref_dir))
    for a, b in zip(jax.tree.leaves(ref.state), jax.tree.leaves(result.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_restore_latest_names_the_step_and_cause_of_each_kind(kind, crashed, tmp_path):
    work = tmp_path / "run"
    copy_and_damage(crashed, work, kind)
    ckpt = Checkpointer(work, keep=3)
    it = batches()
    restored = ckpt.restore_latest(stand_in_target(), set_data_state=it.set_state)
    ckpt.close()
    assert restored.step == 4 and restored.data_state == {"next_index": 4}
    [damaged] = restored.damaged
    assert damaged.step == 8 and DAMAGE[kind][1] in damaged.cause, damaged.cause
    assert "\n" not in damaged.cause and len(damaged.cause) < 500
    assert "tensorstore_spec" not in damaged.cause
    assert damaged.moved_to == work / "checkpoints_damaged" / "8"
    assert Checkpointer(work, keep=1, read_only=True).all_steps() == [4]


def test_a_second_damaged_copy_of_a_step_gets_a_suffix(crashed, tmp_path):
    work = tmp_path / "run"
    copy_and_damage(crashed, work, "truncated-array-file")
    (work / "checkpoints_damaged" / "8").mkdir(parents=True)
    ckpt = Checkpointer(work, keep=3)
    restored = ckpt.restore_latest(stand_in_target())
    ckpt.close()
    assert restored.damaged[0].moved_to == work / "checkpoints_damaged" / "8.1"
    assert (work / "checkpoints_damaged" / "8").is_dir()


def test_no_intact_checkpoint_refuses_listing_each_and_moves_nothing(crashed, tmp_path):
    work = tmp_path / "run"
    copy_and_damage(crashed, work, "truncated-array-file", steps=(4, 8))
    with pytest.raises(ValueError) as info:
        run_child.run_in_process(work, **CFG)
    message = str(info.value)
    assert "no checkpoint in" in message and "can be restored" in message
    assert "step 8: " in message and "step 4: " in message
    assert "Nothing was moved or deleted" in message
    assert not (work / "checkpoints_damaged").exists()
    assert Checkpointer(work, keep=1, read_only=True).all_steps() == [4, 8]


def test_load_checkpoint_skips_a_damaged_latest_and_leaves_it_in_place(crashed, tmp_path,
                                                                         caplog):
    work = tmp_path / "run"
    copy_and_damage(crashed, work, "missing-ocdbt-manifest")
    state, config = loop.load_checkpoint(work, stand_in.StandInConfig(), model=stand_in)
    assert int(state.step) == 4 and config["train"]["steps"] == CFG["steps"]
    assert "Checkpoint 8 is damaged" in caplog.text and "left in place" in caplog.text
    assert (work / "checkpoints" / "8").is_dir() and not (work / "checkpoints_damaged").exists()
    with pytest.raises(ValueError, match=r"checkpoint 8 in .* cannot be restored: .*not exist"):
        loop.load_checkpoint(work, stand_in.StandInConfig(), model=stand_in, step=8)


def test_an_incompatible_config_is_still_refused_not_taken_for_damage(crashed, tmp_path):
    work = tmp_path / "run"
    copy_and_damage(crashed, work, "truncated-array-file")
    with pytest.raises(ValueError, match=r"model.d_model: 32 != 16"):
        loop.run(stand_in.StandInConfig(d_model=16), train_cfg(**CFG), work,
                 train_data=batches(), model=stand_in, progress=False)
    assert not (work / "checkpoints_damaged").exists()


# ---------------------------------------------------------------------------------------------
# Write errors.


def test_a_failed_async_save_names_the_step_and_keeps_the_previous(tmp_path, monkeypatch):
    """ENOSPC from the JSON writer in orbax's background thread; keep=1, so a save that
    succeeded would delete the previous checkpoint."""
    tree = {"w": np.arange(10.0, dtype=np.float32)}
    ckpt = Checkpointer(tmp_path, keep=1)
    ckpt.save(1, tree, data_state={"i": 1}, config={"c": 1})
    ckpt.wait_until_finished()

    async def no_space(self, x, directory):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", no_space)
    ckpt.save(2, tree, data_state={"i": 2}, config={"c": 1})
    with pytest.raises(ckpt_lib.CheckpointWriteError) as info:
        ckpt.wait_until_finished()
    err = info.value
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert err.step == 2 and err.kept_step == 1
    message = str(err)
    assert f"could not write checkpoint 2 to {tmp_path / 'checkpoints' / '2'}" in message
    assert "No space left on device" in message
    assert f"step 1, is kept in {tmp_path / 'checkpoints' / '1'}" in message
    reader = Checkpointer(tmp_path, keep=1, read_only=True)
    assert reader.all_steps() == [1]
    got, data_state = reader.restore(1, tree)
    reader.close()
    np.testing.assert_array_equal(got["w"], tree["w"])
    assert data_state == {"i": 1}
    monkeypatch.undo()
    ckpt.save(3, tree, data_state={"i": 3}, config={"c": 1})  # the disk has room again
    ckpt.close()
    steps = Checkpointer(tmp_path, keep=1, read_only=True).all_steps()
    assert steps[-1] == 3 and 2 not in steps


@pytest.mark.slow  # the injected ENOSPC test covers the write-error path by default
def test_a_file_size_limit_fails_the_run_with_a_clear_message_and_keeps_the_previous(tmp_path):
    """A real write error from the kernel (EFBIG under RLIMIT_FSIZE, as ENOSPC would be) while
    tensorstore writes the arrays; the limit is far above the logs and metrics written."""
    model_cfg = stand_in.StandInConfig(d_model=256)  # ~1 MB per array file: over the limit

    def train(steps):
        cfg = train_cfg(**CFG).replace(steps=steps, ckpt_every=2, keep_checkpoints=1)
        return loop.run(model_cfg, cfg, tmp_path, train_data=batches(), model=stand_in,
                        mesh=single_device_mesh(), progress=False)

    first = train(4)  # checkpoint 4 (keep_checkpoints=1: a complete 6 would delete it)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (128 * 1024, limits[1]))
    try:
        with pytest.raises(ckpt_lib.CheckpointWriteError) as info:
            train(8)  # extends the run; checkpoint 6 cannot be written
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    message = str(info.value)
    assert f"could not write checkpoint 6 to {tmp_path / 'checkpoints' / '6'}" in message
    assert "File too large" in message
    assert "The previous checkpoint, step 4, is kept" in message
    assert info.value.errno == errno.EFBIG
    assert Checkpointer(tmp_path, keep=1, read_only=True).all_steps() == [4]
    state, _ = loop.load_checkpoint(tmp_path, model_cfg, model=stand_in)
    for a, b in zip(jax.tree.leaves(first.state), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------------
# A workdir that is not a directory, in the CLI (the library's cases are in cases_train.py).


def test_train_lm_refuses_a_workdir_that_is_a_file(tmp_path):
    from experiments import train_lm

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    path = tmp_path / "notes.txt"
    path.write_text("not a run")
    with flagsaver.flagsaver(workdir=str(path), preset="tiny", steps=1), \
            pytest.raises(app.UsageError, match=r"--workdir=.*notes.txt' is not a directory"):
        train_lm.main(["train_lm"])
    assert path.read_text() == "not a run"
