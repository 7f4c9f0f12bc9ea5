"""Random paged MLA decode inputs: the one generator of the tests, `check`, `bench` and the
scripts in benchmarks/.

Two layouts, built from the same helpers (lengths, pages laid out into a block table):

- hostile (`make_paged_inputs`, on the host with NumPy), so that a kernel reading what it must
  not shows it: a request's pages are taken from a shuffled permutation of a pool larger than
  needed; every cache slot that holds no live token is NaN (pages no request uses, tokens past
  a request's length inside its last page, pages behind masked table entries; all bytes 0xFF
  in an FP8 pool, quantized_pool); block_table
  entries past a request's last page are garbage int32 (negative, huge, just past the pool, or
  ids of other pages, NaN ones and other requests' live ones).
- the benchmark's (`rotated_case`): every request's pages permuted within one copy of the page
  pool, and as many copies, each with its own block table, as make the cache that consecutive
  calls read exceed 4x the L2, so that each call reads from HBM. The pool and q are drawn on
  the device (a pool of gigabytes would take the host minutes).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import fp8_cache

INT32_MIN = np.iinfo(np.int32).min
INT32_MAX = np.iinfo(np.int32).max


class PagedInputs(NamedTuple):
    q: np.ndarray  # [b, s_q, h_q, d]
    k_cache: np.ndarray  # [num_blocks, page, h_kv, d]
    block_table: np.ndarray  # int32 [b, max_blocks]
    cache_seqlens: np.ndarray  # int32 [b]


class RotatedCase(NamedTuple):
    """The benchmark's inputs: call i reads the pool through tables[i % len(tables)]."""
    q: jax.Array  # [b, s_q, h_q, d] bfloat16
    pool: jax.Array  # [copies * pages a copy, page, 1, d] bfloat16
    tables: tuple[np.ndarray, ...]  # int32 [b, max_blocks], one per copy of the pool
    lengths: np.ndarray  # int32 [b]


def random_seqlens(rng, b, s_k, *, varlen=False, with_zeros=False):
    """`b` lengths around `s_k`; varlen draws them from N(s_k, s_k / 2) (as FlashMLA's test
    does), clipped to [1, 2 s_k]; with_zeros empties about a third of the requests, but never
    all of them (a batch with nothing to attend to is a case of its own)."""
    if varlen:
        lengths = np.clip(np.rint(rng.normal(s_k, s_k / 2, size=b)), 1, 2 * s_k)
    else:
        lengths = np.full(b, s_k)
    if with_zeros and b > 1:
        lengths[rng.choice(b, size=max(1, b // 3), replace=False)] = 0
    return lengths.astype(np.int32)


def pages_needed(seqlens, page):
    """int [b]: the pages that hold each request's tokens (none for a length <= 0)."""
    return -(-np.maximum(np.asarray(seqlens), 0) // page)


def lay_out_pages(page_ids, needed, columns, padding):
    """int32 [b, columns]: request i's pages are the next needed[i] ids of `page_ids`, in
    order; padding(count) fills the rest of its row."""
    block_table = np.empty((len(needed), columns), np.int32)
    used = 0
    for i, n in enumerate(needed):
        block_table[i, :n] = page_ids[used : used + n]
        block_table[i, n:] = padding(columns - n)
        used += n
    return block_table


def garbage_page_ids(rng, size, num_blocks):
    """int32 table entries that must never be followed: a mix of every kind of bad id."""
    kinds = [
        rng.integers(INT32_MIN, INT32_MAX, size=size, endpoint=True),
        rng.integers(-4, 0, size=size),
        rng.integers(num_blocks, num_blocks + 4, size=size),
        rng.choice([INT32_MIN, INT32_MAX], size=size),
        rng.integers(0, num_blocks, size=size),  # a real page: NaN or another request's
    ]
    pick = rng.integers(0, len(kinds), size=size)
    return np.choose(pick, kinds).astype(np.int32)


def make_block_table(rng, seqlens, page, *, extra_columns=2, invalid_pages=0):
    """Returns (block_table, num_blocks) for requests of lengths `seqlens`.

    `extra_columns` garbage columns follow the longest request's last page. `invalid_pages`
    in-length entries are replaced by out-of-pool ids: the contract masks their tokens.
    """
    needed = pages_needed(seqlens, page)
    total = int(needed.sum())
    num_blocks = total + max(2, total // 4)
    max_blocks = max(1, int(needed.max(initial=0)) + extra_columns)
    block_table = lay_out_pages(rng.permutation(num_blocks).astype(np.int32), needed,
                                max_blocks, lambda n: garbage_page_ids(rng, n, num_blocks))
    if invalid_pages:
        in_length = np.argwhere(np.arange(max_blocks) < needed[:, None])
        chosen = in_length[rng.choice(len(in_length), size=invalid_pages, replace=False)]
        bad = rng.choice([-1, INT32_MIN, num_blocks, INT32_MAX], size=invalid_pages)
        block_table[chosen[:, 0], chosen[:, 1]] = bad
    return block_table, num_blocks


def live_slots(block_table, seqlens, num_blocks, page):
    """bool [num_blocks, page]: the cache slots holding a token some request may attend to."""
    live = np.zeros((num_blocks, page), bool)
    capacity = block_table.shape[1] * page
    for i, length in enumerate(np.clip(seqlens, 0, capacity)):
        tokens = np.arange(length)
        pages = block_table[i, tokens // page]
        valid = (pages >= 0) & (pages < num_blocks)
        live[pages[valid], tokens[valid] % page] = True
    return live


def random_layer(rng, block_table, seqlens, num_blocks, page, *, s_q, h_q, h_kv, d, dtype,
                 q_scale=1.0):
    """Fresh (q, k_cache) for one layer of the given page layout; dead slots are NaN."""
    b = block_table.shape[0]
    q = q_scale * rng.standard_normal((b, s_q, h_q, d), dtype=np.float32)
    k_cache = rng.standard_normal((num_blocks, page, h_kv, d), dtype=np.float32)
    k_cache[~live_slots(block_table, seqlens, num_blocks, page)] = np.nan
    return q.astype(dtype), k_cache.astype(dtype)


def make_paged_inputs(rng, seqlens, *, s_q, h_q, h_kv, d, page, dtype, extra_columns=None,
                      invalid_pages=0, q_scale=1.0, overflow=False, fp8=False):
    """The hostile layout (module docstring) for requests of lengths `seqlens`, with
    `extra_columns` garbage columns (default 2, or 0 with overflow: the longest requests then
    fill the table), `invalid_pages` masked in-length entries and, with overflow, the lengths
    made out-of-contract by overflow_lengths. With fp8 the pool is the FP8 cache (h_kv 1, d
    576): a float32 draw through quantized_pool, q in `dtype`."""
    if extra_columns is None:
        extra_columns = 0 if overflow else 2
    seqlens = np.asarray(seqlens, np.int32)
    block_table, num_blocks = make_block_table(
        rng, seqlens, page, extra_columns=extra_columns, invalid_pages=invalid_pages)
    q, k_cache = random_layer(rng, block_table, seqlens, num_blocks, page, s_q=s_q, h_q=h_q,
                              h_kv=h_kv, d=d, dtype=np.float32 if fp8 else dtype,
                              q_scale=q_scale)
    if fp8:
        q, k_cache = q.astype(dtype), quantized_pool(k_cache)
    inputs = PagedInputs(q, k_cache, block_table, seqlens)
    return overflow_lengths(rng, inputs) if overflow else inputs


def quantized_pool(k_cache) -> np.ndarray:
    """The FP8 (656-byte, uint8) form of a hostile float pool [num_blocks, page, 1, 576]: live
    tokens quantized, every dead one (holding NaN) all bytes 0xFF, NaN codes and NaN scales, so
    that reading one shows in the output."""
    packed = np.array(fp8_cache.quantize_fp8_kvcache(jnp.asarray(k_cache, jnp.float32)))
    packed[np.isnan(np.asarray(k_cache, np.float32)).any(axis=-1)] = 0xFF
    return packed


def overflow_lengths(rng, inputs):
    """Out-of-contract lengths that clamp back to the true ones: a request that fills the
    table's capacity gets a length beyond it, an empty one a negative length."""
    page = inputs.k_cache.shape[1]
    capacity = inputs.block_table.shape[1] * page
    lengths = inputs.cache_seqlens.astype(np.int64)
    full, empty = lengths == capacity, lengths == 0
    lengths[full] += rng.integers(1, INT32_MAX - capacity, size=full.sum(), endpoint=True)
    lengths[empty] = rng.integers(INT32_MIN, 0, size=empty.sum())
    return inputs._replace(cache_seqlens=lengths.astype(np.int32))


def stack_instances(instances):
    """Stacks (q, k_cache, block_table, seqlens) instances whose pools and tables differ in
    size along a new leading axis: pools are padded with NaN pages (never referenced; all bytes
    0xFF in an FP8 pool), tables with -1 columns (past every length). Page ids stay local to
    each instance's pool; ids past it stay past the padded pool."""
    blocks = max(x[1].shape[0] for x in instances)
    columns = max(x[2].shape[1] for x in instances)
    poison = lambda dtype: 0xFF if np.dtype(dtype) == np.uint8 else np.nan
    pad_pool = lambda k: np.concatenate(
        [np.asarray(k), np.full((blocks - k.shape[0],) + k.shape[1:], poison(k.dtype), k.dtype)])

    def pad_table(table, own_blocks):
        # An entry past the instance's own pool must stay past the padded one: shifted by the
        # padding (saturating), it still names no page instead of a NaN padding page.
        table = np.asarray(table).astype(np.int64)
        table = np.where(table >= own_blocks, np.minimum(table + blocks - own_blocks, INT32_MAX),
                         table).astype(np.int32)
        return np.pad(table, ((0, 0), (0, columns - table.shape[1])), constant_values=-1)

    return (np.stack([np.asarray(x[0]) for x in instances]),
            np.stack([pad_pool(x[1]) for x in instances]),
            np.stack([pad_table(x[2], x[1].shape[0]) for x in instances]),
            np.stack([np.asarray(x[3]) for x in instances]))


def rotated_case(rng, b, h_q, s_k, s_q, varlen, page, l2_bytes, d=576):
    """The benchmark's inputs for one row (lengths random_seqlens'): enough copies of the pool
    that one pass over them reads more than 4x `l2_bytes` (one copy for l2_bytes = 0). Each copy
    holds exactly the pages its table names, permuted; columns past a short request's last page
    name that copy's first page, a valid id that no call reads (FlashMLA's API, timed on the
    same inputs, has no masking contract for garbage ids)."""
    lengths = random_seqlens(rng, b, s_k, varlen=varlen)
    needed = pages_needed(lengths, page)
    per_copy = int(needed.sum())
    copy_bytes = per_copy * page * d * 2
    copies = max(1, math.ceil(4 * l2_bytes / copy_bytes))
    columns = int(needed.max())
    tables = tuple(
        lay_out_pages(c * per_copy + rng.permutation(per_copy).astype(np.int32), needed,
                      columns, lambda n, first=c * per_copy: np.full(n, first, np.int32))
        for c in range(copies))
    pool_key, q_key = jax.random.split(jax.random.key(int(rng.integers(1 << 30))))
    pool = jax.random.normal(pool_key, (copies * per_copy, page, 1, d), jnp.bfloat16)
    q = jax.random.normal(q_key, (b, s_q, h_q, d), jnp.bfloat16)
    return RotatedCase(q, pool, tables, lengths)
