"""moejax: sparse Mixture-of-Experts and delta-rule linear attention in functional JAX.

Axis letters used throughout the package:
  B batch · T time · H heads · Dk/Dv key/value head dims · N tokens · d model width ·
  E experts · G groups · C capacity · K selected experts per token.
"""

__version__ = "0.1.0"
