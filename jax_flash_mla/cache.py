"""A paged latent cache in pure JAX: a page pool per layer, pages handed to requests on the
device, new tokens' latents written in place.

State (a pytree, so it passes through jit, donation and sharding like any array tuple):
  pool         [num_layers, num_blocks, page_block_size, 1, head_dim]  the latent pages
  block_table  [max_requests, max_blocks_per_seq] int32                 -1: no page
  seqlens      [max_requests] int32                                    cached tokens
  page_owner   [num_blocks] int32                                      owning request, -1 free

The pool's dtype says how a token is stored: a floating pool holds latents as they are; a uint8
pool (init_cache(..., dtype=jnp.uint8)) holds each 576-wide latent in the 656-byte FP8 layout
of DeepSeek-V3.2 (see fp8_cache), pool [..., 1, 656], the k_cache FlashMLA's sparse decode
reads. write_latents takes latents [..., 576] either way and quantizes them for a uint8 pool.

Every update is a pure function of the state. Jit the step that uses them with the cache
donated (`jax.jit(step, donate_argnums=...)`) and XLA updates the pool in place: the scatter
writes only the new tokens' rows (see tests/test_cache.py, which checks the aliasing).

Errors: what the shapes tell (a wrong rank, dtype or request count, a layer index out of
range) raises ValueError or TypeError at trace time, naming the argument. What only the values
tell (pool exhausted, a count past a request's capacity or negative, a write past a request's
pages) changes nothing for the requests concerned and comes back in the returned `ok` flags;
`check(ok, what)` turns a False flag into a ValueError on the host (one transfer, where the
caller chooses). No update can write into a page another request owns.

Invariants every update keeps: a page is owned by at most one request; block_table[r] holds
exactly the pages whose page_owner is r, as a prefix of its columns; 0 <= seqlens[r] <= the
tokens those pages hold <= max_blocks_per_seq * page_block_size < 2^31.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import fp8_cache
from .validation import _dtype_name

NO_PAGE = -1
INT32_MAX = int(np.iinfo(np.int32).max)


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

    @property
    def is_fp8(self) -> bool:
        """Whether the pool holds tokens in the 656-byte FP8 layout."""
        return _is_fp8_pool(self.pool)

    @property
    def head_dim(self) -> int:
        """Width of a latent as write_latents takes it (576 for an FP8 pool)."""
        return fp8_cache.LATENT_DIM if self.is_fp8 else self.pool.shape[4]


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_fp8_pool(pool) -> bool:
    return np.dtype(pool.dtype) == np.uint8


def init_cache(num_layers: int, num_blocks: int, page_block_size: int, max_requests: int,
               max_blocks_per_seq: int, head_dim: int = 576, dtype=jnp.bfloat16
               ) -> PagedLatentCache:
    """An empty cache: every page free, every request empty.

    dtype: a floating dtype of 16 bits or more stores latents [head_dim] as they are; uint8
    stores each latent (head_dim 576) in the 656-byte FP8 layout, a pool of
    [num_layers, num_blocks, page_block_size, 1, 656] bytes (zeros, which read back as zero
    latents).
    """
    for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks),
                        ("page_block_size", page_block_size), ("max_requests", max_requests),
                        ("max_blocks_per_seq", max_blocks_per_seq), ("head_dim", head_dim)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    # Lengths and page ids are int32, and num_blocks itself is the index of a dropped write.
    if num_blocks >= INT32_MAX:
        raise ValueError(f"num_blocks: expected less than {INT32_MAX} (page ids are int32), got "
                         f"{num_blocks}")
    if max_blocks_per_seq * page_block_size > INT32_MAX:
        raise ValueError(f"max_blocks_per_seq: expected at most {INT32_MAX // page_block_size} "
                         f"(a request's max_blocks_per_seq * page_block_size tokens is an int32 "
                         f"length), got {max_blocks_per_seq}")
    if max_requests * max_blocks_per_seq > INT32_MAX:
        raise ValueError(f"max_requests: expected at most {INT32_MAX // max_blocks_per_seq} (the "
                         f"pages of all requests are counted in int32), got {max_requests}")
    fp8 = np.dtype(dtype) == np.uint8
    # An 8-bit float pool would cast latents to e4m3 without scales: point to the FP8 layout.
    if not fp8 and (not jnp.issubdtype(dtype, jnp.floating) or np.dtype(dtype).itemsize < 2):
        raise TypeError(f"dtype: expected a floating dtype of 16 bits or more, or uint8 (the "
                        f"{fp8_cache.FP8_BYTES_PER_TOKEN}-byte FP8 layout), got "
                        f"{np.dtype(dtype).name}")
    if fp8 and head_dim != fp8_cache.LATENT_DIM:
        raise ValueError(f"head_dim: expected {fp8_cache.LATENT_DIM} with dtype uint8 (the FP8 "
                         f"layout packs {fp8_cache.LATENT_DIM}-wide latents), got {head_dim}")
    token_width = fp8_cache.FP8_BYTES_PER_TOKEN if fp8 else head_dim
    return PagedLatentCache(
        pool=jnp.zeros((num_layers, num_blocks, page_block_size, 1, token_width), dtype),
        block_table=jnp.full((max_requests, max_blocks_per_seq), NO_PAGE, jnp.int32),
        seqlens=jnp.zeros((max_requests,), jnp.int32),
        page_owner=jnp.full((num_blocks,), NO_PAGE, jnp.int32),
    )


def check_cache_layout(cache) -> None:
    """Raises TypeError or ValueError unless `cache` is a PagedLatentCache whose arrays agree
    with each other (the layout in this module's docstring) and whose page ids, request ids and
    lengths fit int32. Shapes only: it runs at trace time."""
    if not isinstance(cache, PagedLatentCache):
        hint = ("; reserve, write_latents and advance return (cache, ok)"
                if isinstance(cache, tuple) and cache and isinstance(cache[0], PagedLatentCache)
                else "")
        raise TypeError(f"cache: expected a PagedLatentCache (from init_cache), got "
                        f"{type(cache).__name__}{hint}")
    for name, x in zip(cache._fields, cache):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"cache.{name}: expected an array, got {type(x).__name__}")
    pool, table, seqlens, owner = cache
    if np.ndim(pool) != 5 or pool.shape[3] != 1:
        raise ValueError(f"cache.pool: expected shape [num_layers, num_blocks, page_block_size, "
                         f"1, head_dim], got {tuple(np.shape(pool))}")
    if not jnp.issubdtype(pool.dtype, jnp.floating) and not _is_fp8_pool(pool):
        raise TypeError(f"cache.pool: expected a floating dtype or uint8 (the FP8 layout), got "
                        f"{_dtype_name(pool)}")
    if _is_fp8_pool(pool) and pool.shape[4] != fp8_cache.FP8_BYTES_PER_TOKEN:
        raise ValueError(f"cache.pool: expected {fp8_cache.FP8_BYTES_PER_TOKEN} bytes per token "
                         f"(last axis) in a uint8 pool (the FP8 layout), got shape "
                         f"{tuple(pool.shape)}")
    for name, x in (("block_table", table), ("seqlens", seqlens), ("page_owner", owner)):
        if np.dtype(x.dtype) != np.int32:
            raise TypeError(f"cache.{name}: expected dtype int32, got {_dtype_name(x)}")
    if np.ndim(table) != 2:
        raise ValueError(f"cache.block_table: expected shape [max_requests, max_blocks_per_seq], "
                         f"got {tuple(np.shape(table))}")
    if tuple(np.shape(seqlens)) != (table.shape[0],):
        raise ValueError(f"cache.seqlens: expected shape ({table.shape[0]},) (max_requests, "
                         f"cache.block_table.shape[0]), got {tuple(np.shape(seqlens))}")
    if tuple(np.shape(owner)) != (pool.shape[1],):
        raise ValueError(f"cache.page_owner: expected shape ({pool.shape[1]},) (num_blocks, "
                         f"cache.pool.shape[1]), got {tuple(np.shape(owner))}")
    # Lengths, page ids and the running page counts of reserve are int32.
    capacity = table.shape[1] * pool.shape[2]
    if capacity > INT32_MAX:
        raise ValueError(f"cache: expected max_blocks_per_seq * page_block_size <= {INT32_MAX} "
                         f"(lengths are int32), got {table.shape[1]} * {pool.shape[2]}")
    # num_blocks itself is the index a dropped scatter row points at.
    if math.prod(table.shape) > INT32_MAX or pool.shape[1] >= INT32_MAX:
        raise ValueError(f"cache: expected max_requests * max_blocks_per_seq <= {INT32_MAX} and "
                         f"num_blocks < {INT32_MAX} (page ids are int32), got block_table shape "
                         f"{tuple(table.shape)}, {pool.shape[1]} blocks")


def _token_counts(name: str, value, cache: PagedLatentCache) -> jax.Array:
    """`value` as int32 [max_requests], or TypeError / ValueError naming `name`."""
    if not hasattr(value, "dtype"):
        value = np.asarray(value)
    if not jnp.issubdtype(value.dtype, jnp.integer):
        raise TypeError(f"{name}: expected an integer dtype, got {_dtype_name(value)}")
    requests = cache.seqlens.shape[0]
    if tuple(np.shape(value)) != (requests,):
        raise ValueError(f"{name}: expected shape ({requests},) (one count per request of the "
                         f"cache), got {tuple(np.shape(value))}")
    if isinstance(value, np.ndarray) and value.size and (
            value.min() < -INT32_MAX - 1 or value.max() > INT32_MAX):
        raise ValueError(f"{name}: expected int32 counts, got {value.min()}..{value.max()}")
    return jnp.asarray(value, jnp.int32)


def _room(cache: PagedLatentCache) -> jax.Array:
    """Tokens each request can still take, [max_requests]; no int32 sum can overflow."""
    capacity = cache.capacity_per_request
    return capacity - jnp.clip(cache.seqlens, 0, capacity)


def _fits(cache: PagedLatentCache, counts) -> jax.Array:
    """Whether each count is a number of tokens its request can still take: seqlens + count
    is compared as count <= capacity - seqlens, so that a huge count cannot wrap around."""
    return (counts >= 0) & (counts <= _room(cache))


def _pages_for(tokens, page: int):
    return -(-tokens // page)  # rounded up without adding page - 1, which could overflow


def _owned_columns(cache: PagedLatentCache) -> jax.Array:
    """[max_requests, max_blocks_per_seq]: whether each table entry is a page its row owns."""
    table, owner = cache.block_table, cache.page_owner
    valid = (table >= 0) & (table < owner.shape[0])
    request = jnp.arange(table.shape[0], dtype=jnp.int32)[:, None]
    return valid & (owner[jnp.clip(table, 0, owner.shape[0] - 1)] == request)


def reserve(cache: PagedLatentCache, num_new_tokens) -> tuple[PagedLatentCache, jax.Array]:
    """Gives each request the pages its next `num_new_tokens[r]` tokens need, on the device.

    num_new_tokens: integer [max_requests], each in [0, capacity_per_request - seqlens[r]].

    Returns the cache and ok [max_requests]. All-or-nothing, so that a step never runs
    half-allocated: if any count is negative or passes its request's capacity, or the free
    pages do not suffice, no request gets a page, the cache comes back unchanged and every
    flag is False; otherwise every flag is True.
    """
    check_cache_layout(cache)
    counts = _token_counts("num_new_tokens", num_new_tokens, cache)
    page = cache.page_block_size
    fits = _fits(cache, counts)
    have = jnp.sum(cache.block_table != NO_PAGE, axis=1, dtype=jnp.int32)
    want_tokens = cache.seqlens + jnp.where(fits, counts, 0)
    need = jnp.maximum(_pages_for(want_tokens, page) - have, 0)
    free = cache.page_owner == NO_PAGE
    done = jnp.all(fits) & (jnp.sum(need) <= jnp.sum(free, dtype=jnp.int32))
    need = jnp.where(done, need, 0)

    # The k-th page any request needs (request-major order) is the k-th free page.
    free_pages = jnp.argsort(~free, stable=True).astype(jnp.int32)  # free ones first
    columns = jnp.arange(cache.block_table.shape[1], dtype=jnp.int32)[None, :]
    is_new = (columns >= have[:, None]) & (columns < (have + need)[:, None])
    rank = jnp.cumsum(need) - need  # first global index of each request's new pages
    slot = jnp.clip(rank[:, None] + columns - have[:, None], 0, cache.page_owner.shape[0] - 1)
    new_pages = free_pages[slot]
    block_table = jnp.where(is_new, new_pages, cache.block_table)
    requests = jnp.broadcast_to(jnp.arange(block_table.shape[0], dtype=jnp.int32)[:, None],
                                block_table.shape)
    page_owner = cache.page_owner.at[jnp.where(is_new, new_pages, cache.page_owner.shape[0])].set(
        requests, mode="drop")
    ok = jnp.broadcast_to(done, counts.shape)
    return cache._replace(block_table=block_table, page_owner=page_owner), ok


def _layer_in_range(layer, num_layers: int) -> jax.Array | bool:
    """A Python int layer is checked now; a traced one (a loop over layers) on the device, its
    result joining the ok flags (a negative traced index would otherwise wrap around)."""
    if _is_int(layer):
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer: expected an int in [0, {num_layers}) (the cache's "
                             f"num_layers), got {layer}")
        return True
    if (not hasattr(layer, "dtype") or np.ndim(layer) != 0
            or not jnp.issubdtype(layer.dtype, jnp.integer)):
        raise TypeError(f"layer: expected an int or an integer scalar array, got "
                        f"{type(layer).__name__} {getattr(layer, 'dtype', '')}".rstrip())
    return (layer >= 0) & (layer < num_layers)


def write_latents(cache: PagedLatentCache, layer, latents, num_new_tokens
                  ) -> tuple[PagedLatentCache, jax.Array]:
    """Writes latents [max_requests, n, head_dim] of layer `layer` at each request's next
    positions (seqlens .. seqlens + num_new_tokens - 1): request r's first num_new_tokens[r]
    rows, the rest ignored. seqlens does not move: call `advance` once all layers are written.
    A uint8 (FP8) pool stores fp8_cache.quantize_fp8_kvcache of each row (head_dim 576).

    Returns ok [max_requests], per request: False where num_new_tokens[r] is negative or more
    than n, a position has no page of that request (reserve first), or a traced layer is out
    of range; nothing of that request is written then (never elsewhere either).
    """
    check_cache_layout(cache)
    num_layers, _, page_size, _, _ = cache.pool.shape
    head_dim = cache.head_dim
    layer_ok = _layer_in_range(layer, num_layers)
    requests = cache.seqlens.shape[0]
    if not hasattr(latents, "dtype") or np.ndim(latents) != 3:
        raise ValueError(f"latents: expected rank 3 [max_requests, n, head_dim], got "
                         f"{getattr(latents, 'shape', type(latents).__name__)}")
    if latents.shape[0] != requests or latents.shape[2] != head_dim:
        raise ValueError(f"latents: expected shape ({requests}, n, {head_dim}) (the cache's "
                         f"max_requests and head_dim), got {tuple(latents.shape)}")
    if not jnp.issubdtype(latents.dtype, jnp.floating):
        raise TypeError(f"latents: expected a floating dtype, got {_dtype_name(latents)}")
    counts = _token_counts("num_new_tokens", num_new_tokens, cache)

    n = latents.shape[1]
    offset = jnp.arange(n, dtype=jnp.int32)[None, :]
    position = cache.seqlens[:, None] + offset                          # [r, n]
    wanted = offset < counts[:, None]
    column = position // page_size
    in_table = (column >= 0) & (column < cache.block_table.shape[1])
    clipped = jnp.clip(column, 0, cache.block_table.shape[1] - 1)
    page = jnp.take_along_axis(cache.block_table, clipped, axis=1)
    owned = jnp.take_along_axis(_owned_columns(cache), clipped, axis=1)
    writable = in_table & owned
    ok = (layer_ok & _fits(cache, counts) & (counts <= n)
          & jnp.all(writable | ~wanted, axis=1))
    dropped = cache.pool.shape[1]  # an out-of-range page index: the scatter drops it
    target_page = jnp.where(wanted & ok[:, None], page, dropped)
    layer_index = layer if layer_ok is True else jnp.where(layer_ok, layer, 0)
    rows = (fp8_cache.quantize_fp8_kvcache(latents) if cache.is_fp8
            else latents.astype(cache.pool.dtype))
    pool = cache.pool.at[layer_index, target_page, position % page_size, 0].set(rows, mode="drop")
    return cache._replace(pool=pool), ok


def advance(cache: PagedLatentCache, num_new_tokens) -> tuple[PagedLatentCache, jax.Array]:
    """Counts the written tokens into seqlens (after every layer's write_latents).

    Returns the cache and ok [max_requests], per request: False where num_new_tokens[r] is
    negative or some new position has no page of that request; its seqlens does not move then.
    """
    check_cache_layout(cache)
    counts = _token_counts("num_new_tokens", num_new_tokens, cache)
    fits = _fits(cache, counts)
    seqlens = cache.seqlens + jnp.where(fits, counts, 0)
    columns = jnp.arange(cache.block_table.shape[1], dtype=jnp.int32)[None, :]
    needed = columns < _pages_for(seqlens, cache.page_block_size)[:, None]
    ok = fits & jnp.all(_owned_columns(cache) | ~needed, axis=1)
    return cache._replace(seqlens=jnp.where(ok, seqlens, cache.seqlens)), ok


def free(cache: PagedLatentCache, finished) -> PagedLatentCache:
    """Returns the pages of the requests where finished (bool [max_requests]) is True to the
    pool and empties those requests."""
    check_cache_layout(cache)
    if not hasattr(finished, "dtype"):
        finished = np.asarray(finished)
    if np.dtype(finished.dtype) != np.bool_:
        raise TypeError(f"finished: expected dtype bool (a mask over requests), got "
                        f"{_dtype_name(finished)}")
    requests = cache.seqlens.shape[0]
    if tuple(np.shape(finished)) != (requests,):
        raise ValueError(f"finished: expected shape ({requests},) (one flag per request of the "
                         f"cache), got {tuple(np.shape(finished))}")
    finished = jnp.asarray(finished)
    owner = cache.page_owner
    released = (owner != NO_PAGE) & finished[jnp.clip(owner, 0, requests - 1)]
    return cache._replace(
        block_table=jnp.where(finished[:, None], NO_PAGE, cache.block_table),
        seqlens=jnp.where(finished, 0, cache.seqlens),
        page_owner=jnp.where(released, NO_PAGE, owner),
    )


def check(ok, what: str) -> None:
    """Raises ValueError naming the failing requests if any flag of ok (bool [max_requests],
    as reserve, write_latents, advance or a model step return it) is False. A host sync: call
    it outside jax.jit, on the flags the jitted function returns."""
    if not isinstance(what, str):
        raise TypeError(f"what: expected a str (named in the error), got {type(what).__name__}")
    if isinstance(ok, jax.core.Tracer):
        raise TypeError("ok: expected concrete flags, got a traced array (check syncs with the "
                        "host: return ok from the jitted function and check it outside)")
    if not hasattr(ok, "dtype"):
        raise TypeError(f"ok: expected a bool array [max_requests] (the flags an update "
                        f"returns), got {type(ok).__name__}")
    if np.dtype(ok.dtype) != np.bool_ or np.ndim(ok) != 1:
        raise TypeError(f"ok: expected a bool array [max_requests] (the flags an update "
                        f"returns), got {_dtype_name(ok)} of shape {tuple(np.shape(ok))}")
    bad = np.flatnonzero(~np.asarray(ok)).tolist()
    if bad:
        raise ValueError(f"{what}: failed for requests {bad}")
