r"""Convert Hugging Face checkpoints (Mixtral, Qwen3-MoE, Qwen3-Next, Qwen3.5-MoE, DeepSeek-V3,
Kimi Linear) to moejax and back.

HF → moejax (writes a model directory that `train_lm --init_from=` fine-tunes):

  python -m experiments.convert_hf --hf_dir=PATH/Qwen3-Next-80B-A3B-Instruct \
      --workdir=runs/qwen3_next [--mixer_override=gated_qdelta] [--router_override=star]

  --mixer_override=gated_qdelta   Gated DeltaNet layers become gated Q-Delta with λ ≡ --lam_init
                                  (W_λ = 0), so the model starts where GDN was; `qdelta` does the
                                  same for DeltaNet layers, `kda_qdelta` for Kimi Linear's KDA.
  --router_override=star          top-k routers, and the aux-free routers of DeepSeek-V3 / Kimi
                                  Linear (sigmoid scores, e_score_correction_bias, expert groups,
                                  scaling kept as STAR options), become STAR with
                                  σ(a) = --star_mix_init, R = I (--star_r_init=zero: R = 0 and
                                  W_g / σ(a), an exact start), and V from a GHA warm-up over
                                  --gha_batches batches of text (tokenised by the checkpoint's
                                  tokenizer when transformers can load one, else byte ids).

The logit difference of each override against the plain conversion is printed and stored in the
model directory's `model_config.json` ("info"). Everything is checked before anything is
written: a failed conversion leaves no directory behind.

moejax → HF (`--to_hf`): reads --workdir (a model directory, or a train_lm run: its latest
checkpoint) and writes --hf_dir (config.json + model.safetensors).

  python -m experiments.convert_hf --to_hf --workdir=runs/finetune --hf_dir=out/qwen3_next_ft
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from moejax import data
from moejax.interop import SUPPORTED, export_hf, load_hf, upcycle
from moejax.interop.hf_config import read_json
from moejax.models import lm
from moejax.train import checkpoint, loop

FLAGS = flags.FLAGS
MIXER_OVERRIDES = ("", "qdelta", "gated_qdelta", "kda_qdelta")
ROUTER_OVERRIDES = ("", "star")


def define_flags() -> None:
    """The script's flags (defined only when run as a script: importing stays flag-free)."""
    flags.DEFINE_string("hf_dir", None, "Hugging Face model directory (input, or output with "
                        "--to_hf).", required=True)
    flags.DEFINE_string("workdir", None, "moejax model directory (output, or input with "
                        "--to_hf).", required=True)
    flags.DEFINE_bool("to_hf", False, "Export --workdir to --hf_dir instead of converting.")
    flags.DEFINE_string("model_type", None, f"With --to_hf: one of {SUPPORTED} (default: the "
                        "one recorded when the model was converted).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Params/compute dtype.")
    flags.DEFINE_integer("max_seq_len", None, "Longest sequence (default: the config's).")
    flags.DEFINE_enum("mixer_override", "", MIXER_OVERRIDES, "Upcycle delta layers to Q-Delta.")
    flags.DEFINE_float("lam_init", 1e-4, "Q-Delta's initial λ on every token.")
    flags.DEFINE_enum("router_override", "", ROUTER_OVERRIDES,
                      "Upcycle top-k / aux-free routers to STAR.")
    flags.DEFINE_float("star_mix_init", 0.999, "STAR's initial σ(a) (weight of the old gate).")
    flags.DEFINE_enum("star_r_init", "identity", list(upcycle.R_INITS),
                      "STAR's initial R: identity, or zero (with W_g / σ(a): the logits start "
                      "as the original's up to float rounding).")
    flags.DEFINE_float("star_eta", 2e-5, "STAR's GHA step size for training.")
    flags.DEFINE_integer("gha_batches", 16, "Batches of the GHA warm-up pass.")
    flags.DEFINE_float("gha_eta", 1e-2, "GHA step size of the warm-up pass.")
    flags.DEFINE_integer("batch_size", 4, "Sequences per warm-up / check batch.")
    flags.DEFINE_integer("seq_len", 128, "Tokens per warm-up / check sequence.")
    flags.DEFINE_integer("seed", 0, "Seed of STAR's init and of the text windows.")


def text_batches(hf_dir: str, cfg: lm.LMConfig, *, num: int, batch_size: int, seq_len: int,
                 seed: int) -> tuple[list[np.ndarray], str]:
    """`num` `[B, T]` token batches of the default corpus (the stdlib sources), tokenised by the
    checkpoint's tokenizer if transformers can load one, else as bytes (needs V ≥ 256), else
    uniform random ids. Returns the batches and the source used."""
    need = num * batch_size * seq_len
    text = data.load_corpus_tokens(data.CorpusConfig(), "train")
    start = int(np.random.default_rng(seed).integers(0, max(len(text) - 8 * need, 1)))
    window = text[start:start + 8 * need]
    ids, source = None, ""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(hf_dir)
        ids = np.asarray(tok(data.decode(window))["input_ids"], np.int64)
        ids, source = ids[ids < cfg.vocab_size], f"stdlib text, {type(tok).__name__}"
    except Exception:  # no tokenizer files, or transformers not installed
        if cfg.vocab_size >= 256:
            ids, source = window.astype(np.int64), "stdlib text as byte ids (no tokenizer)"
    if ids is None or len(ids) < need:
        rng = np.random.default_rng(seed)
        ids, source = rng.integers(0, cfg.vocab_size, need), "uniform random ids"
    return list(ids[:need].reshape(num, batch_size, seq_len).astype(np.int32)), source


def convert() -> dict:
    """HF → moejax with the requested overrides; returns the info stored with the model."""
    workdir = Path(FLAGS.workdir)
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise ValueError(f"--workdir {FLAGS.workdir} is not an empty directory; use a new one")
    cfg, params, state, hf = load_hf(FLAGS.hf_dir, dtype=FLAGS.dtype,
                                     max_seq_len=FLAGS.max_seq_len)
    print(f"Loaded {hf['model_type']} from {FLAGS.hf_dir}: {lm.num_params(params):,} params, "
          f"layers {'/'.join(sorted(set(cfg.mixers)))}")
    (check,), _ = text_batches(FLAGS.hf_dir, cfg, num=1, batch_size=FLAGS.batch_size,
                               seq_len=min(FLAGS.seq_len, cfg.max_seq_len), seed=FLAGS.seed + 1)
    info = {"hf_dir": str(Path(FLAGS.hf_dir).absolute()), "hf_model_type": hf["model_type"],
            "dtype": FLAGS.dtype, "overrides": {}}
    base = (params, state, cfg)
    if FLAGS.mixer_override:
        new_cfg, params = upcycle.to_qdelta(params, cfg, lam_init=FLAGS.lam_init)
        if FLAGS.mixer_override not in new_cfg.mixers:
            raise ValueError(f"--mixer_override={FLAGS.mixer_override}: this model's delta "
                             f"layers become {sorted(set(new_cfg.mixers))}")
        cfg = new_cfg
        diff = upcycle.logit_difference(*base, params, state, cfg, check)
        info["overrides"]["mixer"] = {"to": FLAGS.mixer_override, "lam_init": FLAGS.lam_init,
                                      "logit_difference": diff}
        print(f"mixer → {FLAGS.mixer_override} (λ = {FLAGS.lam_init:g}): logit difference {diff}")
    if FLAGS.router_override:
        before = (params, state, cfg)
        cfg, params, state = upcycle.to_star(params, state, cfg, mix_init=FLAGS.star_mix_init,
                                             eta=FLAGS.star_eta, key=jax.random.key(FLAGS.seed),
                                             r_init=FLAGS.star_r_init)
        batches, source = text_batches(FLAGS.hf_dir, cfg, num=FLAGS.gha_batches,
                                       batch_size=FLAGS.batch_size,
                                       seq_len=min(FLAGS.seq_len, cfg.max_seq_len),
                                       seed=FLAGS.seed)
        state = upcycle.gha_warmup(params, state, cfg, batches, eta=FLAGS.gha_eta)
        diff = upcycle.logit_difference(*before, params, state, cfg, check)
        info["overrides"]["router"] = {"to": "star", "from": before[2].moe.router,
                                       "mix_init": FLAGS.star_mix_init,
                                       "r_init": FLAGS.star_r_init,
                                       "gha_batches": FLAGS.gha_batches, "gha_eta": FLAGS.gha_eta,
                                       "gha_data": source, "logit_difference": diff}
        print(f"router {before[2].moe.router} → star (σ(a) = {FLAGS.star_mix_init:g}, "
              f"R init {FLAGS.star_r_init}, GHA warm-up on {source}): "
              f"logit difference {diff}")
    checkpoint.save_model(FLAGS.workdir, cfg, params, state, info=info)
    print(f"Wrote {Path(FLAGS.workdir) / checkpoint.MODEL_CONFIG}; fine-tune with\n"
          f"  python -m experiments.train_lm --init_from={FLAGS.workdir} --workdir=RUN_DIR")
    return info


def saved_model_config(path: Path) -> lm.LMConfig:
    """The `LMConfig` of a model directory's model_config.json, checked key by key (a broken
    file is named, with the line, the key or the field)."""
    file = path / checkpoint.MODEL_CONFIG
    saved = read_json(file)
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise ValueError(f"{file} must hold a JSON object with a 'model' object (the LMConfig "
                         "fields), as moejax.train.checkpoint.save_model writes")
    return lm.LMConfig.from_dict(saved["model"], source=f"{file} ['model']")


def load_any(workdir: str) -> tuple[lm.LMConfig, dict, dict, dict]:
    """(cfg, params, router state, info) of a model directory, or of a train_lm run's latest
    checkpoint."""
    path = Path(workdir)
    if not path.is_dir():
        raise ValueError(f"--workdir {workdir} is not a directory")
    if (path / checkpoint.MODEL_CONFIG).exists():
        saved_model_config(path)  # names a broken config before orbax reads the tree
        cfg, params, state, info = checkpoint.load_model(path, lm.LMConfig, lm.init)
        return cfg, params, state, info
    ckpt = checkpoint.Checkpointer(path, keep=1, read_only=True)
    step = ckpt.latest_step()
    if step is None:
        ckpt.close()
        raise ValueError(f"{workdir} holds neither a model directory nor a train_lm checkpoint")
    saved = ckpt.saved_config(step)
    ckpt.close()
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise ValueError(f"the checkpoint of step {step} in {workdir} records no 'model' config")
    cfg = lm.LMConfig.from_dict(saved["model"], source=f"{workdir} (step {step}) config")
    state, _ = loop.load_checkpoint(path, cfg, model=lm, step=step)
    init_from = saved.get("data", {}).get("init_from")
    info = checkpoint.read_model_config(init_from)["info"] if init_from else {}
    return cfg, state.params, state.model_state, info


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # keep orbax's INFO lines quiet
    try:
        if not FLAGS.to_hf:
            convert()
            return
        cfg, params, state, info = load_any(FLAGS.workdir)
        model_type = FLAGS.model_type or info.get("hf_model_type")
        if model_type is None:
            raise ValueError(f"--model_type is needed: {FLAGS.workdir} records none; one of "
                             f"{SUPPORTED}")
        params = jax.tree.map(lambda a: jnp.asarray(a, FLAGS.dtype), params)
        out = export_hf(params, cfg, FLAGS.hf_dir, model_type=model_type, state=state)
        print(f"Wrote {model_type} to {out}")
    except ValueError as e:
        raise app.UsageError(str(e)) from e


if __name__ == "__main__":
    define_flags()
    app.run(main)
