"""Scale-out: the `('data', 'fsdp', 'expert')` device mesh, the sharding rules, expert
parallelism and multi-process set-up (DESIGN §5)."""

from moejax.parallel import distributed as distributed
from moejax.parallel.expert_parallel import ExpertParallel as ExpertParallel
from moejax.parallel.expert_parallel import ep_experts as ep_experts
from moejax.parallel.mesh import format_mesh_spec as format_mesh_spec
from moejax.parallel.mesh import make_mesh as make_mesh
from moejax.parallel.mesh import mesh_from_spec as mesh_from_spec
from moejax.parallel.mesh import parse_mesh_spec as parse_mesh_spec
from moejax.parallel.mesh import single_device_mesh as single_device_mesh
from moejax.parallel.sharding import batch_shard as batch_shard
from moejax.parallel.sharding import batch_sharding as batch_sharding
from moejax.parallel.sharding import batch_spec as batch_spec
from moejax.parallel.sharding import bytes_per_device as bytes_per_device
from moejax.parallel.sharding import param_shardings as param_shardings
from moejax.parallel.sharding import replicate as replicate
from moejax.parallel.sharding import restore_params as restore_params
from moejax.parallel.sharding import shard_batch as shard_batch
from moejax.parallel.sharding import shard_params as shard_params

__all__ = [
    "ExpertParallel",
    "batch_shard",
    "batch_sharding",
    "batch_spec",
    "bytes_per_device",
    "distributed",
    "format_mesh_spec",
    "ep_experts",
    "make_mesh",
    "mesh_from_spec",
    "param_shardings",
    "parse_mesh_spec",
    "replicate",
    "restore_params",
    "shard_batch",
    "shard_params",
    "single_device_mesh",
]
