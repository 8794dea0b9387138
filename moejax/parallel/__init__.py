"""Expert parallelism over a `('data', 'expert')` device mesh (DESIGN §5)."""

from moejax.parallel.expert_parallel import ExpertParallel as ExpertParallel
from moejax.parallel.expert_parallel import ep_experts as ep_experts
from moejax.parallel.mesh import make_mesh as make_mesh
from moejax.parallel.mesh import single_device_mesh as single_device_mesh
from moejax.parallel.sharding import batch_sharding as batch_sharding
from moejax.parallel.sharding import param_shardings as param_shardings
from moejax.parallel.sharding import replicate as replicate
from moejax.parallel.sharding import restore_params as restore_params
from moejax.parallel.sharding import shard_batch as shard_batch
from moejax.parallel.sharding import shard_params as shard_params

__all__ = [
    "ExpertParallel",
    "batch_sharding",
    "ep_experts",
    "make_mesh",
    "param_shardings",
    "replicate",
    "restore_params",
    "shard_batch",
    "shard_params",
    "single_device_mesh",
]
