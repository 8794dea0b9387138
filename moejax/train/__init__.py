"""Training (DESIGN §9): optax AdamW loop, orbax checkpoints, JSONL/TensorBoard logs, plots.

  loop        TrainConfig, make_optimizer, TrainState, train_step, eval_step, run, load_checkpoint
  checkpoint  Checkpointer (orbax, `workdir/checkpoints`), config comparison on resume
  logging     metrics.jsonl + TensorBoard writer, tqdm bar, read_metrics
  plots       loss curves and expert-load heatmap PNGs from metrics.jsonl
"""

from moejax.train.checkpoint import Checkpointer as Checkpointer
from moejax.train.checkpoint import CheckpointReadError as CheckpointReadError
from moejax.train.checkpoint import CheckpointWriteError as CheckpointWriteError
from moejax.train.logging import read_metrics as read_metrics
from moejax.train.loop import RunResult as RunResult
from moejax.train.loop import TrainConfig as TrainConfig
from moejax.train.loop import TrainState as TrainState
from moejax.train.loop import eval_step as eval_step
from moejax.train.loop import load_checkpoint as load_checkpoint
from moejax.train.loop import make_optimizer as make_optimizer
from moejax.train.loop import make_schedule as make_schedule
from moejax.train.loop import run as run
from moejax.train.loop import train_step as train_step
from moejax.train.plots import write_plots as write_plots

__all__ = [
    "CheckpointReadError",
    "CheckpointWriteError",
    "Checkpointer",
    "RunResult",
    "TrainConfig",
    "TrainState",
    "eval_step",
    "load_checkpoint",
    "make_optimizer",
    "make_schedule",
    "read_metrics",
    "run",
    "train_step",
    "write_plots",
]
