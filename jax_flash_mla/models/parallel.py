"""The DeepSeek-style decode step spread over several devices, two ways.

Tensor parallel (`tp`): the attention weights are split on heads (w_uq, w_uk, w_uv on their head
axis, w_o on its first), the latent cache and the tokens are replicated. Each device computes
its heads' queries and runs the kernel on its own heads over the whole cache (the kernel's
sharding rule splits q on heads and never gathers the cache); the only communication is the
sum of the output projection over heads.

Data parallel (`dp`): one engine per device. Each device holds its own requests and their page
pool (shard-local page ids) and decodes them alone under shard_map: no communication at all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_flash_mla import cache as paged
from jax_flash_mla.models import deepseek

# Which axis of each attention weight is its head axis.
HEAD_AXIS = {"w_uq": 1, "w_uk": 1, "w_uv": 1, "w_o": 0}


def head_sharded_params(params, mesh: Mesh, axis: str = "tp"):
    """params placed on `mesh`: attention weights split on heads over `axis`, the rest
    replicated. The head count must divide by the axis size."""
    def place(path, leaf):
        name = getattr(path[-1], "key", None)
        spec = [None] * leaf.ndim
        if name in HEAD_AXIS:
            spec[HEAD_AXIS[name]] = axis
        return jax.device_put(leaf, NamedSharding(mesh, P(*spec)))
    return jax.tree_util.tree_map_with_path(place, params)


def tensor_parallel_step(config: deepseek.Config, head_shards: int):
    """The decode step for params split on heads over `head_shards` devices and a replicated
    cache (see head_sharded_params and replicated); jitted, cache donated. Returns (cache,
    logits, ok) like decode_step."""
    def step(params, cache, tokens, active):
        return deepseek.decode_step(params, cache, tokens, active, config, head_shards)
    return jax.jit(step, donate_argnums=1)


def replicated(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def stack_engine_caches(caches) -> paged.PagedLatentCache:
    """One cache from one per engine (same shapes): pools side by side on the block axis,
    tables, lengths and page owners one after the other. Page ids stay engine-local."""
    return paged.PagedLatentCache(
        pool=jnp.concatenate([c.pool for c in caches], axis=1),
        block_table=jnp.concatenate([c.block_table for c in caches]),
        seqlens=jnp.concatenate([c.seqlens for c in caches]),
        page_owner=jnp.concatenate([c.page_owner for c in caches]))


def engine_cache_specs(axis: str = "dp") -> paged.PagedLatentCache:
    """How a stacked engine cache splits over `axis`: each device gets its engine's part."""
    return paged.PagedLatentCache(pool=P(None, axis), block_table=P(axis), seqlens=P(axis),
                                  page_owner=P(axis))


def engine_sharded(stacked: paged.PagedLatentCache, mesh: Mesh, axis: str = "dp"
                   ) -> paged.PagedLatentCache:
    """A stacked engine cache placed as data_parallel_step puts its cache out (each device its
    engine's part): placed so before the first step, the step compiled for it takes every
    later step's cache too."""
    return jax.device_put(stacked, paged.PagedLatentCache(
        *(NamedSharding(mesh, spec) for spec in engine_cache_specs(axis))))


def data_parallel_step(config: deepseek.Config, mesh: Mesh, axis: str = "dp"):
    """The decode step with one engine per device of `mesh`: step(params, cache, tokens, active)
    with params replicated, a stacked engine cache (stack_engine_caches, placed by
    engine_sharded), tokens and active [requests] split on `axis`; jitted, cache donated.
    Returns (cache, logits, ok) like decode_step, each engine all-or-nothing on its own."""
    def engine(params, cache, tokens, active):
        return deepseek.decode_step(params, cache, tokens, active, config)

    specs = engine_cache_specs(axis)
    return jax.jit(jax.shard_map(engine, mesh=mesh, in_specs=(P(), specs, P(axis), P(axis)),
                                 out_specs=(specs, P(axis), P(axis))), donate_argnums=1)


def as_one_pool(stacked: paged.PagedLatentCache, num_engines: int) -> paged.PagedLatentCache:
    """The same requests and pages as one engine's cache (global page ids and request ids):
    what one device would hold for the whole batch, to check the engines against it."""
    blocks = stacked.pool.shape[1] // num_engines
    requests = stacked.block_table.shape[0] // num_engines
    table_offset = (jnp.arange(stacked.block_table.shape[0]) // requests * blocks)[:, None]
    owner_offset = jnp.arange(stacked.page_owner.shape[0]) // blocks * requests
    return stacked._replace(
        block_table=jnp.where(stacked.block_table >= 0, stacked.block_table + table_offset,
                              paged.NO_PAGE),
        page_owner=jnp.where(stacked.page_owner >= 0, stacked.page_owner + owner_offset,
                             paged.NO_PAGE))
