"""moejax.finetune."""
