"""moejax.data."""
