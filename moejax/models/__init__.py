"""moejax.models."""
