"""Random paged MLA decode inputs, built on the host with NumPy.

The layout is hostile on purpose, so that a kernel reading what it must not shows it:
- a request's pages are taken from a shuffled permutation of a pool larger than needed;
- every cache slot that holds no live token is NaN: pages no request uses, tokens past a
  request's length inside its last page, and pages behind masked (invalid) table entries;
- block_table entries past a request's last page are garbage int32: negative, huge, just
  past the pool, or ids of other pages (NaN ones and other requests' live ones).
"""

from typing import NamedTuple

import numpy as np

INT32_MIN = np.iinfo(np.int32).min
INT32_MAX = np.iinfo(np.int32).max


class PagedInputs(NamedTuple):
    q: np.ndarray  # [b, s_q, h_q, d]
    k_cache: np.ndarray  # [num_blocks, page, h_kv, d]
    block_table: np.ndarray  # int32 [b, max_blocks]
    cache_seqlens: np.ndarray  # int32 [b]


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


def _pages_needed(seqlens, page):
    return -(-np.maximum(seqlens, 0) // page)


def _garbage_page_ids(rng, size, num_blocks):
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
    pages_needed = _pages_needed(seqlens, page)
    total = int(pages_needed.sum())
    num_blocks = total + max(2, total // 4)
    max_blocks = max(1, int(pages_needed.max(initial=0)) + extra_columns)
    pool = rng.permutation(num_blocks).astype(np.int32)
    block_table = np.empty((len(seqlens), max_blocks), np.int32)
    used = 0
    for i, n in enumerate(pages_needed):
        block_table[i, :n] = pool[used : used + n]
        block_table[i, n:] = _garbage_page_ids(rng, max_blocks - n, num_blocks)
        used += n
    in_length = np.argwhere(np.arange(max_blocks) < pages_needed[:, None])
    if invalid_pages:
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


def make_paged_inputs(rng, seqlens, *, s_q, h_q, h_kv, d, page, dtype, extra_columns=2,
                      invalid_pages=0, q_scale=1.0):
    seqlens = np.asarray(seqlens, np.int32)
    block_table, num_blocks = make_block_table(
        rng, seqlens, page, extra_columns=extra_columns, invalid_pages=invalid_pages)
    q, k_cache = random_layer(rng, block_table, seqlens, num_blocks, page, s_q=s_q, h_q=h_q,
                              h_kv=h_kv, d=d, dtype=dtype, q_scale=q_scale)
    return PagedInputs(q, k_cache, block_table, seqlens)


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
    size along a new leading axis: pools are padded with NaN pages (never referenced), tables
    with -1 columns (past every length). Page ids stay local to each instance's pool."""
    blocks = max(x[1].shape[0] for x in instances)
    columns = max(x[2].shape[1] for x in instances)
    pad_pool = lambda k: np.concatenate(
        [np.asarray(k), np.full((blocks - k.shape[0],) + k.shape[1:], np.nan, k.dtype)])
    pad_table = lambda t: np.pad(np.asarray(t), ((0, 0), (0, columns - t.shape[1])),
                                 constant_values=-1)
    return (np.stack([np.asarray(x[0]) for x in instances]),
            np.stack([pad_pool(x[1]) for x in instances]),
            np.stack([pad_table(x[2]) for x in instances]),
            np.stack([np.asarray(x[3]) for x in instances]))
