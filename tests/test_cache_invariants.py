"""The paged cache driven by random sequences of reserve / write_latents / advance / free,
invalid ones among them (negative counts, counts past the capacity or past the latents given,
counts that wrap int32, writes and advances without pages, layers out of range, an exhausted
pool), checked after every step against a NumPy model of what each update may change, and
against the cache's invariants.

Each update is jitted once: the shapes never change, so nothing recompiles per step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_flash_mla import cache as paged

LAYERS, BLOCKS, PAGE, REQUESTS, MAX_BLOCKS, D = 2, 7, 4, 3, 3, 8
CAPACITY = MAX_BLOCKS * PAGE
WRITE_WIDTH = 3  # latents [REQUESTS, WRITE_WIDTH, D] per write
INT32_MAX = int(np.iinfo(np.int32).max)
STEPS = 200

reserve = jax.jit(paged.reserve)
write_latents = jax.jit(paged.write_latents)  # the layer traced: one compile for every layer
advance = jax.jit(paged.advance)
free = jax.jit(paged.free)


def host(cache):
    return paged.PagedLatentCache(*(np.array(x) for x in cache))


def held_pages(state):
    return (state.block_table != paged.NO_PAGE).sum(axis=1)


def assert_invariants(state):
    """Every page owned by at most one request; tables and owners agree, each table a prefix of
    pages; lengths within the pages held, and those within the capacity."""
    table, owner, seqlens = state.block_table, state.page_owner, state.seqlens
    assert ((table == paged.NO_PAGE) | ((table >= 0) & (table < BLOCKS))).all(), table
    assert ((owner == paged.NO_PAGE) | ((owner >= 0) & (owner < REQUESTS))).all(), owner
    used = table[table >= 0]
    assert len(used) == len(set(used.tolist())), f"a page in two tables: {table}"
    for r in range(REQUESTS):
        pages = table[r][table[r] >= 0]
        assert (table[r][:len(pages)] >= 0).all(), f"request {r}'s table has a hole: {table[r]}"
        assert (owner[pages] == r).all(), f"request {r}'s pages are owned elsewhere: {owner}"
        assert sorted(np.flatnonzero(owner == r).tolist()) == sorted(pages.tolist()), (
            f"pages owned by {r} missing from its table: {owner}, {table[r]}")
    assert ((seqlens >= 0) & (seqlens <= held_pages(state) * PAGE)).all(), (seqlens, table)
    assert (held_pages(state) <= MAX_BLOCKS).all()


def assert_same(want, got):
    for name, x, y in zip(paged.PagedLatentCache._fields, want, got):
        np.testing.assert_array_equal(y, x, err_msg=name, strict=True)


def fits(state, counts):
    return (counts >= 0) & (counts <= CAPACITY - state.seqlens)


def expect_reserve(state, counts):
    """ok and the new pages each request gets (all-or-nothing)."""
    ok = fits(state, counts)
    want = state.seqlens + np.where(ok, counts, 0).astype(np.int64)
    need = np.maximum(-(-want // PAGE) - held_pages(state), 0)
    done = bool(ok.all()) and need.sum() <= (state.page_owner == paged.NO_PAGE).sum()
    return np.full(REQUESTS, done), need if done else np.zeros_like(need)


def expect_write(state, layer, latents, counts):
    """ok and the pool after the write, per request all-or-nothing."""
    pool = state.pool.copy()
    ok = np.zeros(REQUESTS, bool)
    for r in range(REQUESTS):
        n = int(counts[r])
        if not (0 <= layer < LAYERS and fits(state, counts)[r] and n <= WRITE_WIDTH):
            continue
        positions = state.seqlens[r] + np.arange(n)
        if (positions // PAGE >= held_pages(state)[r]).any():
            continue
        ok[r] = True
        for i, t in enumerate(positions):
            pool[layer, state.block_table[r, t // PAGE], t % PAGE, 0] = latents[r, i]
    return ok, pool


def expect_advance(state, counts):
    ok = fits(state, counts)
    end = state.seqlens + np.where(ok, counts, 0).astype(np.int64)
    ok &= -(-end // PAGE) <= held_pages(state)
    return ok, np.where(ok, end, state.seqlens).astype(np.int32)


def random_counts(rng):
    """Mostly small valid counts; now and then one that no request can take."""
    counts = rng.integers(0, 4, size=REQUESTS)
    if rng.random() < 0.3:
        counts[rng.integers(REQUESTS)] = rng.choice(
            [-1, -7, CAPACITY + 1, WRITE_WIDTH + 1, INT32_MAX, INT32_MAX - 2])
    return counts.astype(np.int32)


def step(rng, cache):
    """One random update, checked against the model; returns the new cache, the update's name
    and its ok flags (None for free, which cannot fail)."""
    before = host(cache)
    op = rng.choice(["reserve", "write", "advance", "free"], p=[0.3, 0.35, 0.25, 0.1])
    if op == "reserve":
        counts = random_counts(rng)
        cache, ok = reserve(cache, jnp.asarray(counts))
        want_ok, need = expect_reserve(before, counts)
        after = host(cache)
        np.testing.assert_array_equal(np.asarray(ok), want_ok, err_msg=f"reserve {counts}")
        np.testing.assert_array_equal(held_pages(after), held_pages(before) + need)
        # Only pages that were free change hands; everything else stays bit-for-bit.
        kept = before.block_table != paged.NO_PAGE
        np.testing.assert_array_equal(after.block_table[kept], before.block_table[kept])
        taken = (before.page_owner == paged.NO_PAGE) & (after.page_owner != paged.NO_PAGE)
        assert taken.sum() == need.sum()
        expected = before._replace(block_table=after.block_table,
                                   page_owner=np.where(taken, after.page_owner,
                                                       before.page_owner))
        assert_same(expected if want_ok.all() else before, after)
    elif op == "write":
        counts = random_counts(rng)
        layer = int(rng.choice([0, 1, 0, 1, -1, LAYERS]))
        latents = rng.standard_normal((REQUESTS, WRITE_WIDTH, D)).astype(np.float32)
        cache, ok = write_latents(cache, jnp.int32(layer), jnp.asarray(latents),
                                  jnp.asarray(counts))
        want_ok, pool = expect_write(before, layer, latents, counts)
        np.testing.assert_array_equal(np.asarray(ok), want_ok,
                                      err_msg=f"write layer {layer} {counts}")
        assert_same(before._replace(pool=pool), host(cache))
    elif op == "advance":
        counts = random_counts(rng)
        cache, ok = advance(cache, jnp.asarray(counts))
        want_ok, seqlens = expect_advance(before, counts)
        np.testing.assert_array_equal(np.asarray(ok), want_ok, err_msg=f"advance {counts}")
        assert_same(before._replace(seqlens=seqlens), host(cache))
    else:
        finished = rng.random(REQUESTS) < 0.4
        cache, ok = free(cache, jnp.asarray(finished)), None
        released = (before.page_owner >= 0) & finished[np.maximum(before.page_owner, 0)]
        assert_same(before._replace(
            block_table=np.where(finished[:, None], paged.NO_PAGE, before.block_table),
            seqlens=np.where(finished, 0, before.seqlens).astype(np.int32),
            page_owner=np.where(released, paged.NO_PAGE, before.page_owner).astype(np.int32)),
            host(cache))
    assert_invariants(host(cache))
    return cache, op, None if ok is None else np.asarray(ok)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_updates_keep_the_invariants(seed):
    rng = np.random.default_rng(seed)
    cache = paged.init_cache(LAYERS, BLOCKS, PAGE, REQUESTS, MAX_BLOCKS, D, jnp.float32)
    outcomes, pool_full = set(), False
    for _ in range(STEPS):
        cache, op, ok = step(rng, cache)
        outcomes.add((op, None if ok is None else bool(ok.all())))
        pool_full |= bool((np.asarray(cache.page_owner) != paged.NO_PAGE).all())
    # Not vacuous: the pool fills up, and every update both succeeds and fails.
    assert pool_full
    assert outcomes == {("free", None)} | {(op, done) for op in ("reserve", "write", "advance")
                                           for done in (False, True)}, outcomes
