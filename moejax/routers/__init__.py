"""Routers: one file per routing algorithm, all with the signature of `base` (DESIGN §4)."""

from moejax.routers.base import ROUTER_NAMES as ROUTER_NAMES
from moejax.routers.base import RouterConfig as RouterConfig
from moejax.routers.base import RouterOutput as RouterOutput
from moejax.routers.base import get_router as get_router
from moejax.routers.base import make_config as make_config

__all__ = ["ROUTER_NAMES", "RouterConfig", "RouterOutput", "get_router", "make_config"]
