"""Training (DESIGN §9): one optax AdamW loop, orbax checkpoints, JSONL/TensorBoard logs, plots.

  config      TrainConfig (frozen, validated hyperparameters of a run)
  optim       make_optimizer (AdamW, warmup + cosine, clipping; peak lr injected), make_schedule
  steps       the model contract, TrainState, StepHooks, train_step, eval_step, compiled_steps
  batches     first-batch checks (the model's own or the token default)
  loop        run (resumable, in a workdir), fit (a sweep cell), evaluate, load_checkpoint
  checkpoint  Checkpointer (orbax, `workdir/checkpoints`), config comparison on resume
  logging     metrics.jsonl + TensorBoard writer, tqdm bar, read_metrics
  plots       loss curves and expert-load heatmap PNGs from metrics.jsonl
"""

from moejax.train.checkpoint import Checkpointer as Checkpointer
from moejax.train.checkpoint import CheckpointReadError as CheckpointReadError
from moejax.train.checkpoint import CheckpointWriteError as CheckpointWriteError
from moejax.train.config import TrainConfig as TrainConfig
from moejax.train.logging import read_metrics as read_metrics
from moejax.train.loop import FitResult as FitResult
from moejax.train.loop import RunResult as RunResult
from moejax.train.loop import evaluate as evaluate
from moejax.train.loop import fit as fit
from moejax.train.loop import init_state as init_state
from moejax.train.loop import load_checkpoint as load_checkpoint
from moejax.train.loop import run as run
from moejax.train.optim import make_optimizer as make_optimizer
from moejax.train.optim import make_schedule as make_schedule
from moejax.train.plots import write_plots as write_plots
from moejax.train.steps import ModelFns as ModelFns
from moejax.train.steps import StepContext as StepContext
from moejax.train.steps import StepHooks as StepHooks
from moejax.train.steps import TrainState as TrainState
from moejax.train.steps import eval_step as eval_step
from moejax.train.steps import train_step as train_step

__all__ = [
    "CheckpointReadError",
    "CheckpointWriteError",
    "Checkpointer",
    "FitResult",
    "ModelFns",
    "RunResult",
    "StepContext",
    "StepHooks",
    "TrainConfig",
    "TrainState",
    "eval_step",
    "evaluate",
    "fit",
    "init_state",
    "load_checkpoint",
    "make_optimizer",
    "make_schedule",
    "read_metrics",
    "run",
    "train_step",
    "write_plots",
]
