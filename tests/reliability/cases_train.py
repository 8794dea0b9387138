"""Bad input to the training loop and its checkpoints: `TrainConfig`, `run`, `load_checkpoint`,
`Checkpointer`. Every case fails before anything is compiled (the stand-in model of
`tests.train`; batches are small fixed arrays)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from moejax.train import Checkpointer, TrainConfig, load_checkpoint, run
from tests.reliability.cases import Case
from tests.train import stand_in

BAD = (ValueError, TypeError)
B, T = 2, 8


class Batches:
    """An endless checkpointable iterator of one `[B, T]` batch `{inputs, targets}`, with
    `changes` applied (a key mapped to None is left out)."""

    def __init__(self, **changes):
        ids = np.arange(B * T, dtype=np.int32).reshape(B, T) % 200
        batch = {"inputs": ids, "targets": ids, **changes}
        self.batch = {k: v for k, v in batch.items() if v is not None}

    def __iter__(self):
        return self

    def __next__(self):
        return dict(self.batch)

    def get_state(self):
        return {}

    def set_state(self, state):
        del state


def train_cfg(**changes) -> TrainConfig:
    return TrainConfig(**{"steps": 2, "batch_size": B, "seq_len": T, "warmup_steps": 0,
                          **changes})


def in_tmp(fn):
    """`fn(tmpdir: Path)` in a fresh temporary directory, removed after."""
    def call():
        with tempfile.TemporaryDirectory() as tmp:
            return fn(Path(tmp))
    return call


def a_file(tmp: Path) -> Path:
    path = tmp / "run.txt"
    path.write_text("a file, not a run directory")
    return path


def run_with(workdir=None, *, data=None, cfg=None, model_cfg=None, **kwargs):
    def go(tmp: Path):
        return run(model_cfg or stand_in.StandInConfig(), cfg or train_cfg(),
                   tmp / "run" if workdir is None else workdir(tmp),
                   train_data=Batches() if data is None else data, model=stand_in,
                   progress=False, **kwargs)
    return in_tmp(go)


def config_case(field: str, value, what: str) -> Case:
    return Case(f"train-config-{field}-{what}", lambda: TrainConfig(**{field: value}), BAD,
                (field,))


CASES: list[Case] = [
    # TrainConfig: numbers as strings, None, bools, negatives, out of range, non-finite.
    config_case("steps", "100", "str"),
    config_case("lr", "3e-3", "str"),
    config_case("lr", None, "none"),
    config_case("lr", float("nan"), "nan"),
    config_case("batch_size", True, "bool"),
    config_case("warmup_steps", -1, "negative"),
    config_case("seed", 0.5, "float"),
    config_case("clip_norm", "1.0", "str"),
    config_case("b1", 1.0, "one"),
    config_case("weight_decay", -0.1, "negative"),
    Case("train-config-replace-keep", lambda: train_cfg().replace(keep_checkpoints=0), BAD,
         ("keep_checkpoints", ">= 1")),
    # run(): its arguments and the first batch.
    Case("train-run-workdir-file", run_with(a_file), BAD, ("workdir", "not a directory")),
    Case("train-run-workdir-under-file", run_with(lambda tmp: a_file(tmp) / "sub"), BAD,
         ("workdir", "is a file")),
    Case("train-run-workdir-int", run_with(lambda tmp: 3), BAD, ("workdir", "path")),
    Case("train-run-train-cfg-dict", run_with(cfg={"steps": 2}), BAD, ("train_cfg",)),
    Case("train-run-train-data-list", run_with(data=[{"inputs": 0}]), BAD,
         ("train_data", "get_state")),
    Case("train-run-batch-shape", run_with(data=Batches(inputs=np.zeros((B, T + 1), np.int32))),
         BAD, ("inputs", "(batch_size, seq_len)")),
    Case("train-run-batch-float-ids", run_with(data=Batches(inputs=np.zeros((B, T)))), BAD,
         ("inputs", "integer")),
    Case("train-run-batch-no-targets", run_with(data=Batches(targets=None)), BAD, ("targets",)),
    Case("train-run-token-id-too-large",
         run_with(data=Batches(inputs=np.full((B, T), 256, np.int32))), BAD,
         ("inputs", "256", "[0, 256)", "vocab_size")),
    Case("train-run-target-id-negative",
         run_with(data=Batches(targets=np.full((B, T), -1, np.int32))), BAD,
         ("targets", "-1", "[0, 256)")),
    Case("train-run-seq-len-over-max", run_with(model_cfg=stand_in.StandInConfig(max_seq_len=4)),
         BAD, ("seq_len", "max_seq_len")),
    Case("train-run-val-data-not-callable", run_with(val_data=Batches()), BAD, ("val_data",)),
    # load_checkpoint and Checkpointer.
    Case("train-load-no-checkpoint",
         in_tmp(lambda tmp: load_checkpoint(tmp, stand_in.StandInConfig(), model=stand_in)),
         BAD, ("no checkpoint",)),
    Case("train-load-workdir-file",
         in_tmp(lambda tmp: load_checkpoint(a_file(tmp), stand_in.StandInConfig(),
                                            model=stand_in)), BAD, ("workdir", "not a directory")),
    Case("train-load-step-str",
         in_tmp(lambda tmp: load_checkpoint(tmp, stand_in.StandInConfig(), model=stand_in,
                                            step="4")), BAD, ("step",)),
    Case("train-checkpointer-keep-0", in_tmp(lambda tmp: Checkpointer(tmp, keep=0)), BAD,
         ("keep", ">= 1")),
    Case("train-checkpointer-keep-str", in_tmp(lambda tmp: Checkpointer(tmp, keep="3")), BAD,
         ("keep",)),
    Case("train-checkpointer-workdir-file", in_tmp(lambda tmp: Checkpointer(a_file(tmp), keep=1)),
         BAD, ("workdir", "not a directory")),
    Case("train-checkpointer-checkpoints-file",
         in_tmp(lambda tmp: (a_file(tmp).rename(tmp / "checkpoints"),
                             Checkpointer(tmp, keep=1))),
         BAD, ("checkpoints", "is a file")),
]
