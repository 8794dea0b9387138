"""moejax.layers."""
