"""moejax.finetune: sparse fine-tuning (DARS, reconstructed from its abstract; DESIGN §7)."""

from moejax.finetune import dars

__all__ = ["dars"]
