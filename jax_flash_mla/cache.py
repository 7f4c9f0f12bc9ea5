"""A paged latent cache in pure JAX: a page pool per layer, pages handed to requests on the
device, new tokens' latents written in place.

State (a pytree, so it passes through jit, donation and sharding like any array tuple):
  pool         [num_layers, num_blocks, page_block_size, 1, head_dim]  the latent pages
  block_table  [max_requests, max_blocks_per_seq] int32                 -1: no page
  seqlens      [max_requests] int32                                    cached tokens
  page_owner   [num_blocks] int32                                      owning request, -1 free

Every update is a pure function of the state. Jit the step that uses them with the cache
donated (`jax.jit(step, donate_argnums=...)`) and XLA updates the pool in place: the scatter
writes only the new tokens' rows (see tests/test_cache.py, which checks the aliasing).

Errors: an update that cannot be done (pool exhausted, a write past a request's pages, a
position outside the table) changes nothing for the requests concerned and reports it in the
returned `ok` flags; `check(ok, what)` turns a False flag into a ValueError on the host (one
transfer, where the caller chooses). No update can write into a page another request owns.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

NO_PAGE = -1


class PagedLatentCache(NamedTuple):
    pool: jax.Array
    block_table: jax.Array
    seqlens: jax.Array
    page_owner: jax.Array

    @property
    def page_block_size(self) -> int:
        return self.pool.shape[2]

    @property
    def capacity_per_request(self) -> int:
        return self.block_table.shape[1] * self.page_block_size


def init_cache(num_layers: int, num_blocks: int, page_block_size: int, max_requests: int,
               max_blocks_per_seq: int, head_dim: int = 576, dtype=jnp.bfloat16
               ) -> PagedLatentCache:
    """An empty cache: every page free, every request empty."""
    for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks),
                        ("page_block_size", page_block_size), ("max_requests", max_requests),
                        ("max_blocks_per_seq", max_blocks_per_seq)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return PagedLatentCache(
        pool=jnp.zeros((num_layers, num_blocks, page_block_size, 1, head_dim), dtype),
        block_table=jnp.full((max_requests, max_blocks_per_seq), NO_PAGE, jnp.int32),
        seqlens=jnp.zeros((max_requests,), jnp.int32),
        page_owner=jnp.full((num_blocks,), NO_PAGE, jnp.int32),
    )


def reserve(cache: PagedLatentCache, num_new_tokens) -> tuple[PagedLatentCache, jax.Array]:
    """Gives each request the pages its next `num_new_tokens[r]` tokens need, on the device.

    Returns the cache and ok [max_requests]: False for a request whose tokens would pass its
    table's capacity, or when the free pages do not suffice; then no request gets new pages
    (all-or-nothing, so a step never runs half-allocated).
    """
    num_new_tokens = jnp.asarray(num_new_tokens, jnp.int32)
    page = cache.page_block_size
    have = jnp.sum(cache.block_table != NO_PAGE, axis=1)
    want_tokens = cache.seqlens + jnp.maximum(num_new_tokens, 0)
    fits_table = want_tokens <= cache.capacity_per_request
    need = jnp.where(fits_table, jnp.maximum(-(-want_tokens // page) - have, 0), 0)
    free = cache.page_owner == NO_PAGE
    enough = jnp.sum(need) <= jnp.sum(free)
    ok = fits_table & enough

    # The k-th page any request needs (request-major order) is the k-th free page.
    free_pages = jnp.argsort(~free, stable=True).astype(jnp.int32)  # free ones first
    columns = jnp.arange(cache.block_table.shape[1], dtype=jnp.int32)[None, :]
    is_new = (columns >= have[:, None]) & (columns < (have + need)[:, None]) & enough
    rank = jnp.cumsum(need) - need  # first global index of each request's new pages
    slot = jnp.clip(rank[:, None] + columns - have[:, None], 0, cache.page_owner.shape[0] - 1)
    new_pages = free_pages[slot]
    block_table = jnp.where(is_new, new_pages, cache.block_table)
    requests = jnp.broadcast_to(jnp.arange(block_table.shape[0], dtype=jnp.int32)[:, None],
                                block_table.shape)
    page_owner = cache.page_owner.at[jnp.where(is_new, new_pages, cache.page_owner.shape[0])].set(
        requests, mode="drop")
    return cache._replace(block_table=block_table, page_owner=page_owner), ok


def write_latents(cache: PagedLatentCache, layer: int, latents, num_new_tokens
                  ) -> tuple[PagedLatentCache, jax.Array]:
    """Writes latents [max_requests, n, head_dim] of layer `layer` at each request's next
    positions (seqlens .. seqlens + num_new_tokens - 1); positions past num_new_tokens[r] are
    ignored. seqlens does not move: call `advance` once all layers are written.

    Returns ok [max_requests]: False where a position has no page of that request (reserve
    first); those rows are dropped, never written elsewhere.
    """
    n = latents.shape[1]
    offset = jnp.arange(n, dtype=jnp.int32)[None, :]
    position = cache.seqlens[:, None] + offset                          # [r, n]
    wanted = offset < jnp.asarray(num_new_tokens, jnp.int32)[:, None]
    column = position // cache.page_block_size
    in_table = (column >= 0) & (column < cache.block_table.shape[1])
    page = jnp.take_along_axis(cache.block_table, jnp.clip(column, 0, cache.block_table.shape[1] - 1),
                               axis=1)
    owner = cache.page_owner[jnp.clip(page, 0, cache.page_owner.shape[0] - 1)]
    request = jnp.arange(latents.shape[0], dtype=jnp.int32)[:, None]
    writable = in_table & (page != NO_PAGE) & (owner == request)
    dropped = cache.pool.shape[1]  # an out-of-range page index: the scatter drops it
    target_page = jnp.where(wanted & writable, page, dropped)
    pool = cache.pool.at[layer, target_page, position % cache.page_block_size, 0].set(
        latents.astype(cache.pool.dtype), mode="drop")
    ok = jnp.all(writable | ~wanted, axis=1)
    return cache._replace(pool=pool), ok


def advance(cache: PagedLatentCache, num_new_tokens) -> PagedLatentCache:
    """Counts the written tokens into seqlens (after every layer's write_latents)."""
    return cache._replace(seqlens=cache.seqlens + jnp.maximum(jnp.asarray(num_new_tokens,
                                                                          jnp.int32), 0))


def free(cache: PagedLatentCache, finished) -> PagedLatentCache:
    """Returns the pages of the requests where finished [max_requests] is True to the pool and
    empties those requests."""
    finished = jnp.asarray(finished, bool)
    owner = cache.page_owner
    released = (owner != NO_PAGE) & finished[jnp.clip(owner, 0, finished.shape[0] - 1)]
    return cache._replace(
        block_table=jnp.where(finished[:, None], NO_PAGE, cache.block_table),
        seqlens=jnp.where(finished, 0, cache.seqlens),
        page_owner=jnp.where(released, NO_PAGE, owner),
    )


def check(ok, what: str) -> None:
    """Raises ValueError naming the failing requests if any ok flag is False (a host sync)."""
    bad = [int(i) for i in jnp.nonzero(~jnp.asarray(ok))[0]]
    if bad:
        raise ValueError(f"{what}: failed for requests {bad}")
