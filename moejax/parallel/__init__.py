"""moejax.parallel."""
