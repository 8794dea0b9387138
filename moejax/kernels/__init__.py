"""moejax.kernels."""
