"""Grouped matmuls for dropless MoE (DESIGN §2): `gmm`, `tgmm` and their checkified variants."""

from moejax.kernels.gmm.ops import IMPL_NAMES as IMPL_NAMES
from moejax.kernels.gmm.ops import GmmImplUnavailableError as GmmImplUnavailableError
from moejax.kernels.gmm.ops import check_group_sizes as check_group_sizes
from moejax.kernels.gmm.ops import checked_gmm as checked_gmm
from moejax.kernels.gmm.ops import checked_tgmm as checked_tgmm
from moejax.kernels.gmm.ops import gmm as gmm
from moejax.kernels.gmm.ops import tgmm as tgmm

__all__ = [
    "IMPL_NAMES",
    "GmmImplUnavailableError",
    "check_group_sizes",
    "checked_gmm",
    "checked_tgmm",
    "gmm",
    "tgmm",
]
