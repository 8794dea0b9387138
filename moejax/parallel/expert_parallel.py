"""Expert parallelism: experts sharded over `'expert'`, tokens moved by `all_to_all` (DESIGN §5).

Axis letters: N global tokens, n = N/(D·F·X) tokens per device, d model width, E experts,
E_l = E/X experts per device, X size of the `'expert'` axis, D of `'data'`, F of `'fsdp'` (1
when the mesh has no such axis), K assignments per token, C rows per destination buffer.

The mesh is a config choice: `MoEConfig(..., parallel=ExpertParallel(mesh=mesh))` runs the same
`moe_apply` expert-parallel. What runs where:

* **Router, losses, load metrics, router state, shared experts**: the layer's own code on the
  global `[N, d]` tokens, constrained to be sharded over `('data', 'fsdp', 'expert')`. XLA's SPMD
  partitioner computes every per-token quantity on the device that holds the token and turns the
  router's means over N (Switch loss, z-loss, STAR's GHA sums, aux-free loads, Sinkhorn's column
  sums, expert choice's top-C over tokens, ...) into collectives. So the router decision, the
  losses and the new router state are exactly those of one device, identical on every replica,
  for every router, with no per-router collective code.
* **Token exchange** (`ep_experts`, inside `shard_map`, both axes manual), per device:

    1. keep up to K assignments per local token (largest weights first, as the dropless
       dispatcher), destination `dest = e // E_l`, local expert `e % E_l`;
    2. pack per-destination buffers `[X, C, d]` in token order; an assignment past C is dropped;
    3. `all_to_all` over `'expert'`: device j receives `[X (source), C, d]` rows for its experts;
    4. sort the received rows by local expert and run the bank (grouped matmul, `gmm`);
    5. `all_to_all` back to the sources, gather each kept assignment's row, combine
       `y_n = Σ_j w_nj · row_nj` (float32).

  `C = n·min(K, E_l)` (every assignment fits: dropless) for `dispatcher="dropless"`;
  `C = min(⌈cf·n·K/X⌉, n·min(K, E_l))` for `dispatcher="capacity"`. Dropped assignments
  contribute zero (the residual carries the token) and are counted globally in
  `dropped_fraction` / `dropped_token_fraction`. Backward: `all_to_all` transposes to itself,
  and `shard_map` sums the expert-bank cotangent over `'data'` and `'fsdp'` (its spec leaves
  them out). A bank also split over `'fsdp'` (`moejax.parallel.sharding`) is gathered on the
  way in and its gradient reduce-scattered on the way out, by XLA.

`all_to_all` bytes per device per layer (forward): `2·X·C·d·itemsize` (there and back; the
`(X−1)/X` share that leaves the device is what crosses links); with capacity factor cf this is
`≈ 2·cf·n·K·d·itemsize`, summed over devices `2·N·K·cf·d·itemsize` (`experiments/bench_ep.py`
counts them, analytically and in the compiled HLO).
`jax.lax.ragged_all_to_all` would send only the filled rows on GPU/TPU; it does not run on
XLA:CPU, so the fixed-capacity path is the only one implemented.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.moe import experts
from moejax.parallel import mesh as mesh_lib

Array = jax.Array

@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpertParallel:
    """Expert-parallel layout of an MoE layer (hashable: it lives in the static `MoEConfig`).

    Attributes:
      mesh: device mesh with (at least) the data and expert axes (`mesh.make_mesh`).
      data_axis: mesh axis over which tokens are split and experts replicated.
      expert_axis: mesh axis over which tokens are split and experts sharded (`all_to_all`).
      fsdp_axis: mesh axis over which tokens are split too, if the mesh has it.
    """

    mesh: Mesh
    data_axis: str = mesh_lib.DATA
    expert_axis: str = mesh_lib.EXPERT
    fsdp_axis: str = mesh_lib.FSDP

    def __post_init__(self):
        mesh_lib.check_mesh(self.mesh, (self.data_axis, self.expert_axis))

    @property
    def token_axes(self) -> tuple[str, ...]:
        """Every axis tokens are split over: data, fsdp (if the mesh has it), expert."""
        fsdp = (self.fsdp_axis,) if self.fsdp_axis in self.mesh.shape else ()
        return (self.data_axis, *fsdp, self.expert_axis)

    @property
    def num_data(self) -> int:
        """Tokens shards outside the expert axis (D·F)."""
        n = 1
        for axis in self.token_axes[:-1]:
            n *= int(self.mesh.shape[axis])
        return n

    @property
    def num_expert(self) -> int:
        return int(self.mesh.shape[self.expert_axis])

    @property
    def num_token_shards(self) -> int:
        return self.num_data * self.num_expert

    # The three hooks `moejax.moe.layer` calls when `cfg.parallel` is set.

    def check_config(self, cfg) -> None:
        """Raises ValueError unless `cfg.num_experts` is divisible by the expert axis."""
        if cfg.num_experts % self.num_expert:
            raise ValueError(f"num_experts={cfg.num_experts} is not divisible by the "
                             f"{self.expert_axis!r} mesh axis of size {self.num_expert}")

    def shard_tokens(self, xf: Array) -> Array:
        """Constrains `[N, d]` tokens to `P(token_axes)`; ValueError if N does not split."""
        n = xf.shape[0]
        if n % self.num_token_shards:
            sizes = "×".join(str(int(self.mesh.shape[a])) for a in self.token_axes)
            raise ValueError(
                f"N={n} tokens (the leading axes of x, flattened) are not divisible by the token "
                f"axes {'×'.join(self.token_axes)} = {sizes} = {self.num_token_shards}")
        return jax.lax.with_sharding_constraint(
            xf, NamedSharding(self.mesh, P(self.token_axes)))

    def replicate(self, tree):
        """Constrains a pytree (router state) to be replicated on every device."""
        return jax.lax.with_sharding_constraint(tree, NamedSharding(self.mesh, P()))

    def dispatch(self, bank: dict, xf: Array, out, cfg) -> tuple[Array, dict]:
        """The layer's expert computation, expert-parallel: `[N, d]` -> `([N, d] f32, stats)`."""
        n = xf.shape[0] // self.num_token_shards
        k = min(cfg.max_assignments, cfg.num_experts)
        c = capacity(n_local=n, num_experts=cfg.num_experts, num_expert_shards=self.num_expert,
                     k=k, capacity_factor=cfg.capacity_factor,
                     dropless=cfg.dispatcher == "dropless")
        fn = functools.partial(ep_experts, expert_axis=self.expert_axis,
                               token_axes=self.token_axes, capacity=c, k=k,
                               gmm_impl=cfg.gmm_impl)
        tok = P(self.token_axes)
        # check=False: the gmm backends' scan carries are not typed as device-varying. Unchecked,
        # shard_map still sums the bank's cotangent over 'data' (the tests compare gradients).
        mapped = mesh_lib.shard_map(fn, mesh=self.mesh,
                                    in_specs=(P(self.expert_axis), tok, tok, tok),
                                    out_specs=(tok, P()), check=False)
        return mapped(bank, xf, out.weights, out.mask)


def capacity(*, n_local: int, num_experts: int, num_expert_shards: int, k: int,
             capacity_factor: float, dropless: bool) -> int:
    """Rows C of each per-destination buffer (static).

    `n·min(K, E_l)` is the most a source can send one destination (each token reaches each of
    its experts at most once), so that size never drops; otherwise `⌈cf·n·K/X⌉`, at most that.
    """
    e_local = num_experts // num_expert_shards
    full = n_local * min(k, e_local)
    if dropless:
        return max(1, full)
    return max(1, min(math.ceil(capacity_factor * n_local * k / num_expert_shards), full))


def ep_experts(bank: dict, x: Array, weights: Array, mask: Array, *, expert_axis: str,
               token_axes: tuple[str, ...], capacity: int, k: int,
               gmm_impl: str = "auto") -> tuple[Array, dict]:
    """Per-device body of expert parallelism (call inside `shard_map` over `token_axes`).

    Args:
      bank: this device's `E_l` experts (`{"w_up": [E_l, d, f], ...}`).
      x: `[n, d]` local tokens.
      weights: `[n, E]` combine weights of the local tokens (0 off the mask), all E experts.
      mask: `<bool>[n, E]` selected experts.
      expert_axis: manual mesh axis the experts are sharded over (X = its size = E / E_l).
      token_axes: every manual axis the tokens are split over (for the global drop counts).
      capacity: C, rows per destination buffer (`capacity`).
      k: K, assignments kept per token (the router's `max_assignments`, at most E).
      gmm_impl: grouped-matmul backend for the local experts.

    Returns:
      `(y [n, d] float32, {"dropped_fraction", "dropped_token_fraction"})`, the stats global
      (summed over `token_axes`).
    """
    n, e = mask.shape
    d = x.shape[-1]
    e_local = bank["w_up"].shape[0]
    num_dest = e // e_local
    mask = mask.astype(jnp.bool_)
    weights = weights.astype(jnp.float32)

    # 1. Up to K assignments per token, in the dropless dispatcher's order (largest weight first).
    _, idx = jax.lax.top_k(jnp.where(mask, weights, -jnp.inf), k)  # [n, K]
    valid = jnp.take_along_axis(mask, idx, axis=-1)
    slot_w = jnp.where(valid, jnp.take_along_axis(weights, idx, axis=-1), 0.0)
    dest, local = (idx // e_local).reshape(-1), (idx % e_local).reshape(-1)  # [n·K]
    valid = valid.reshape(-1)

    # 2. Slot of each assignment in its destination's buffer: rank among earlier assignments
    #    (token order) to the same destination; past C it is dropped.
    onehot = jax.nn.one_hot(dest, num_dest, dtype=jnp.int32) * valid[:, None].astype(jnp.int32)
    pos = jnp.take_along_axis(jnp.cumsum(onehot, axis=0), dest[:, None], axis=1)[:, 0] - 1
    kept = valid & (pos < capacity)
    row_d = jnp.where(kept, dest, num_dest)  # out of range: the scatter drops it
    row_c = jnp.where(kept, pos, 0)
    token = jnp.arange(n * k, dtype=jnp.int32) // k
    send_x = jnp.zeros((num_dest, capacity, d), x.dtype).at[row_d, row_c].set(
        jnp.take(x, token, axis=0), mode="drop")
    send_e = jnp.full((num_dest, capacity), e_local, jnp.int32).at[row_d, row_c].set(
        local.astype(jnp.int32), mode="drop")

    # 3. Exchange: afterwards row block i holds what source i sent to this device's experts.
    recv_x = jax.lax.all_to_all(send_x, expert_axis, 0, 0)
    recv_e = jax.lax.all_to_all(send_e, expert_axis, 0, 0)

    # 4. Local experts on the received rows, sorted by local expert (empty rows sort last).
    rows, ids = recv_x.reshape(num_dest * capacity, d), recv_e.reshape(-1)
    order = jnp.argsort(ids, stable=True)
    group_sizes = jnp.bincount(ids, length=e_local + 1)[:e_local].astype(jnp.int32)
    ys = experts.apply_grouped(bank, jnp.take(rows, order, axis=0), group_sizes, impl=gmm_impl)
    y_rows = jnp.zeros_like(ys).at[order].set(ys)

    # 5. Back to the sources, then combine each token's kept assignments.
    back = jax.lax.all_to_all(y_rows.reshape(num_dest, capacity, d), expert_axis, 0, 0)
    per_slot = back[jnp.minimum(row_d, num_dest - 1), row_c].reshape(n, k, d)
    w = jnp.where(kept.reshape(n, k), slot_w, 0.0)
    y = jnp.einsum("NK,NKd->Nd", w, per_slot.astype(jnp.float32))

    total = jnp.sum(mask, dtype=jnp.float32)
    dropped = total - jnp.sum(kept, dtype=jnp.float32)
    lost = jnp.sum(jnp.any(mask, axis=-1) & ~jnp.any(kept.reshape(n, k), axis=-1),
                   dtype=jnp.float32)
    total, dropped, lost, n_all = jax.lax.psum((total, dropped, lost, jnp.float32(n)),
                                               token_axes)
    stats = {"dropped_fraction": dropped / jnp.maximum(total, 1.0),
             "dropped_token_fraction": lost / jnp.maximum(n_all, 1.0)}
    return y, stats
