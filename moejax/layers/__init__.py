"""Layers as pure functions over parameter pytrees: delta mixers, norms, short conv."""
