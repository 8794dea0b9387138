"""Delta-rule family (DeltaNet, Gated DeltaNet, Q-Delta): oracle, chunkwise path, public ops."""

from moejax.kernels.delta_rule.ops import delta_rule as delta_rule
from moejax.kernels.delta_rule.ops import delta_rule_step as delta_rule_step

__all__ = ["delta_rule", "delta_rule_step"]
