"""moejax.moe."""
