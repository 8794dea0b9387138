"""Interoperability with Hugging Face checkpoints and upcycling of converted models.

  load_hf / export_hf        Mixtral, Qwen3-MoE, Qwen3-Next ↔ moejax LM (`hf.py`)
  lm_config_from_hf, ...     config.json ↔ LMConfig (`hf_config.py`)
  params_from_hf, ...        tensor names and layouts (`hf_weights.py`)
"""

from moejax.interop.hf import export_hf, load_hf
from moejax.interop.hf_config import SUPPORTED, hf_config_from_lm, lm_config_from_hf, read_hf_config

__all__ = ["SUPPORTED", "export_hf", "hf_config_from_lm", "lm_config_from_hf", "load_hf",
           "read_hf_config"]
