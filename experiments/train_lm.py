"""Train a byte-level language model on text, resumably (DESIGN §9).

  python -m experiments.train_lm --workdir=runs/demo --preset=demo --steps=300

The model is a preset of `moejax.models.lm` (tiny, demo, small, hybrid, 340m, 1b) whose fields
--mixer, --ffn, --router, --num_experts and --top_k override; its vocabulary is the data's (256
bytes), whatever the preset's. The paper presets 340m and 1b (the Q-Delta authors' models: gated
Q-Delta, untied embeddings, N(0, 0.02²) init) also bring the authors' optimiser
(`moejax.train.config.OPTIMIZER_PRESETS`: AdamW ε 1e-15, clip 1, warmup 1024 / 2048, cosine to
0.1×, lr 1e-3 / 4e-4, 128 × 4096 tokens per step, 28600 / 57200 steps) as the defaults of
--lr, --warmup_steps, --eps, --batch_size, --seq_len and --steps; the other presets default to
lr 3e-3, warmup 100, ε 1e-8, 16 × 256 tokens, 1000 steps. The data is the default corpus (the
running Python's standard-library sources) or --data=GLOB, byte-level; its val split is used for
validation loss and bits per byte. Writes DIR/metrics.jsonl, DIR/checkpoints, DIR/tensorboard
and DIR/*.png; rerunning with the same DIR resumes from the latest checkpoint and continues the
same trajectory (a DIR holding a run with other settings is refused). Ends by printing a sample.

SIGTERM (what preemptible VMs send) or Ctrl-C: the current step finishes, a checkpoint is
written, and the script prints the step it stopped at and exits 0; rerun the same command to
continue. A damaged latest checkpoint is reported and moved to DIR/checkpoints_damaged, and the
run resumes from the newest intact one.

--init_from=MODEL_DIR fine-tunes a saved model instead of a fresh preset: a directory written by
`experiments.convert_hf` (a converted Hugging Face checkpoint) or `checkpoint.save_model`; its
config replaces --preset and the model flags. The data stay byte-level (ids < 256), so the
model's vocabulary must hold at least 256 ids.

Scale out (`experiments.mesh_flags`): --mesh=data:D,fsdp:F,expert:X places the run on a device
mesh (FSDP shards the parameters and optimizer state, `expert` runs the MoE layers
expert-parallel); --coordinator_address/--num_processes/--process_id (or a TPU pod slice / SLURM
environment) make it one process of a multi-process run, each reading only its share of the
data. A run resumes on another mesh or process count. See the README's "Scale out".
"""

import os

import grain
import jax
import jax.numpy as jnp
from absl import app, flags, logging
from jax.experimental import multihost_utils

from experiments import mesh_flags
from moejax import data
from moejax.models import decode, lm
from moejax.train import checkpoint, loop
from moejax.train import config as train_config

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; resumed if it holds a run.",
                               required=True)
_PRESET = flags.DEFINE_string("preset", "demo", "Model preset: tiny, demo, small, hybrid, 340m "
                              "or 1b (340m / 1b: the Q-Delta authors' models and optimiser).")
_MIXER = flags.DEFINE_string("mixer", None, "Token mixer (default: the preset's), e.g. qdelta, "
                             "gated_qdelta, deltanet, gated_deltanet, softmax, gated_softmax.")
_FFN = flags.DEFINE_string("ffn", None, "Feed-forward: moe or dense (default: the preset's).")
_ROUTER = flags.DEFINE_string("router", None, "MoE router name (default: the preset's).")
_NUM_EXPERTS = flags.DEFINE_integer("num_experts", None, "Routed experts (default: preset's).")
_TOP_K = flags.DEFINE_integer("top_k", None, "Experts per token (default: the preset's).")
_DATA = flags.DEFINE_string("data", None, "Glob of text files; default: stdlib .py sources.")
_DOC_BOUNDARIES = flags.DEFINE_bool(
    "document_boundaries", True, "Model each file of the packed windows as if alone (attention "
    "masked and delta-rule states reset across files); --nodocument_boundaries trains on the "
    "plain token stream.")
_STEPS = flags.DEFINE_integer("steps", None, "Total training steps (> 0; default 1000, or the "
                              "paper preset's).")
_LR = flags.DEFINE_float("lr", None, "Peak learning rate, cosine decay to 10% of it (default "
                         "3e-3, or the paper preset's).")
_WARMUP = flags.DEFINE_integer("warmup_steps", None, "Linear warmup steps (default 100, or the "
                               "paper preset's).")
_EPS = flags.DEFINE_float("eps", None, "AdamW epsilon (default 1e-8, or the paper preset's "
                          "1e-15).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Sequences per step, all devices "
                                   "(default 16, or the paper preset's).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Tokens (bytes) per sequence (default 256, or "
                                "the paper preset's).")
_LOG_EVERY = flags.DEFINE_integer("log_every", 10, "Steps between metrics lines.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 200, "Steps between evals (0: only at the end).")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 8, "Validation batches per eval.")
_CKPT_EVERY = flags.DEFINE_integer("ckpt_every", 200, "Steps between checkpoints (0: at end).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of init, dropout-like noise and data order.")
_SAMPLE_TOKENS = flags.DEFINE_integer("sample_tokens", 256, "Bytes to sample at the end (0: no).")
_INIT_FROM = flags.DEFINE_string("init_from", None, "Model directory to fine-tune (from "
                                 "experiments.convert_hf); replaces --preset and model flags.")

_MODEL_FLAGS = (_MIXER, _FFN, _ROUTER, _NUM_EXPERTS, _TOP_K)
# Defaults of the run flags for presets without an entry in OPTIMIZER_PRESETS.
_RUN_DEFAULTS = dict(steps=1000, lr=3e-3, warmup_steps=100, eps=1e-8, batch_size=16,
                     seq_len=256)
_RUN_FLAGS = (_STEPS, _LR, _WARMUP, _EPS, _BATCH_SIZE, _SEQ_LEN)


def run_settings(preset: str | None) -> dict:
    """The TrainConfig fields of the run flags: a flag given wins, else the preset's optimiser
    (`OPTIMIZER_PRESETS`, for the paper presets; with --init_from: none), else `_RUN_DEFAULTS`."""
    base = {**_RUN_DEFAULTS, **train_config.OPTIMIZER_PRESETS.get(preset, {})}
    given = {f.name: f.value for f in _RUN_FLAGS if f.value is not None}
    return {**base, **given}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # progress goes to the bar; keep orbax's INFO quiet
    try:  # every bad flag, and empty or unreadable --data, fails here, before any training
        _, mesh_spec = mesh_flags.setup()  # first: joins the processes before any device use
        checkpoint.check_workdir(_WORKDIR.value, name="--workdir")
        overrides = {f.name: f.value for f in (_MIXER, _FFN) if f.value is not None}
        moe_overrides = {f.name: f.value for f in (_ROUTER, _NUM_EXPERTS, _TOP_K)
                         if f.value is not None}  # updates the preset's MoE options
        init_params, data_info = None, {}
        if _INIT_FROM.value is not None:
            given = [f"--{f.name}" for f in (_PRESET, *_MODEL_FLAGS)
                     if not flags.FLAGS[f.name].using_default_value]
            if given:
                raise ValueError(f"--init_from sets the model; drop {', '.join(given)}")
            model_cfg, params, model_state, _ = checkpoint.load_model(
                _INIT_FROM.value, lm.LMConfig, lm.init)
            if model_cfg.vocab_size < 256:
                raise ValueError(f"--init_from model has vocab_size={model_cfg.vocab_size}; "
                                 "byte-level data needs >= 256")
            init_params = (params, model_state)
            data_info["init_from"] = os.path.abspath(_INIT_FROM.value)
        else:
            if moe_overrides:
                overrides["moe"] = moe_overrides
            # The vocabulary is the data's (bytes), whatever the preset's tokenizer had.
            model_cfg = lm.get_preset(_PRESET.value, vocab_size=data.BYTE_VOCAB_SIZE,
                                      **overrides)
        preset = None if _INIT_FROM.value is not None else _PRESET.value
        train_cfg = loop.TrainConfig(
            **run_settings(preset), log_every=_LOG_EVERY.value,
            eval_every=_EVAL_EVERY.value, eval_batches=_EVAL_BATCHES.value,
            ckpt_every=_CKPT_EVERY.value, seed=_SEED.value, mesh=mesh_spec)
        if train_cfg.seq_len > model_cfg.max_seq_len:
            raise ValueError(f"--seq_len={train_cfg.seq_len} exceeds the model's "
                             f"max_seq_len={model_cfg.max_seq_len}")
        if _SAMPLE_TOKENS.value < 0:
            raise ValueError(f"--sample_tokens must be >= 0, got {_SAMPLE_TOKENS.value}")
        corpus = data.CorpusConfig(data_glob=_DATA.value,
                                   document_boundaries=_DOC_BOUNDARIES.value)
        # This process reads rows [index·B/count, (index+1)·B/count) of every global batch.
        index, count = loop.process_batch_shard(lm, model_cfg, train_cfg)
        shard = grain.sharding.ShardOptions(index, count, drop_remainder=True)

        def batches(split):
            return data.iterator(data.make_corpus_dataset(
                corpus, split=split, seed=train_cfg.seed,
                batch_size=train_cfg.batch_size // count, seq_len=train_cfg.seq_len),
                shard=shard)

        train_data = batches("train")
        batches("val")  # checks that the val split holds a batch
    except (ValueError, RuntimeError) as e:  # RuntimeError: the processes could not join
        raise app.UsageError(str(e)) from e

    result = loop.run(model_cfg, train_cfg, _WORKDIR.value, model=lm, train_data=train_data,
                      val_data=lambda: batches("val"), bytes_per_token=1,
                      data_info={"corpus": corpus, **data_info}, init_params=init_params)
    if result.preempted:  # SIGTERM/SIGINT: checkpointed; exit 0 so a VM manager reruns us
        if mesh_flags.is_main():
            print(f"\nPreempted: stopped at step {result.step} of {train_cfg.steps}, "
                  f"checkpoint saved. To resume, rerun the same command "
                  f"(--workdir={_WORKDIR.value}).")
        return

    prompt = jnp.asarray(data.encode("def "), jnp.int32)[None]
    new_tokens = min(_SAMPLE_TOKENS.value, model_cfg.max_seq_len - prompt.shape[1])
    params, model_state = result.state.params, result.state.model_state
    if new_tokens > 0 and jax.process_count() > 1:  # every process joins the gather
        params, model_state = multihost_utils.process_allgather((params, model_state),
                                                                tiled=True)
    if not mesh_flags.is_main():
        return
    if new_tokens > 0:
        tokens = decode.generate(params, model_state, prompt,
                             cfg=model_cfg, key=jax.random.key(train_cfg.seed),
                             max_new_tokens=new_tokens, temperature=0.8, top_p=0.95)
        sample = (data.decode(tokens[0]) if model_cfg.vocab_size == 256
                  else " ".join(map(str, tokens[0].tolist())))
        print(f"\nSample after step {result.step}:\n{sample}\n")
    print(f"Metrics: {result.metrics_path}")
    for path in result.plot_paths:
        print(f"Plot: {path}")


if __name__ == "__main__":
    app.run(main)
