"""Metadata computed once per decode step and reused by every layer under jax.jit, and the
invariants of the tile schedule itself (see cpp/common/tile_scheduler.h for the layout)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash_mla
from jax_flash_mla import testing
from jax_flash_mla._constants import (FIXED_OVERHEAD_TILES, METADATA_FIELDS, METADATA_INTS,
                                      TOKENS_PER_TILE, max_split_slots)

from comparisons import KERNEL_LSE_ATOL, KERNEL_OUT_ROUNDINGS, assert_attention_close
from decode_grid import HEAD_DIM_V, reference_decode
from jax_flash_mla.paged_inputs import make_block_table, random_layer, random_seqlens

BEGIN_REQ, BEGIN_TILE, END_REQ, END_TILE, BEGIN_SPLIT = (
    METADATA_FIELDS[name] for name in ("begin_req", "begin_tile", "end_req", "end_tile",
                                       "begin_split"))

B, S_Q, H_Q, H_KV, D, PAGE, LAYERS = 4, 2, 16, 1, 576, 16, 3


def layers_inputs(rng):
    """One page layout (block_table, cache_seqlens) and LAYERS fresh (q, k_cache) on it."""
    seqlens = random_seqlens(rng, B, 150, varlen=True, with_zeros=True)
    block_table, num_blocks = make_block_table(rng, seqlens, PAGE)
    layers = [random_layer(rng, block_table, seqlens, num_blocks, PAGE, s_q=S_Q, h_q=H_Q,
                           h_kv=H_KV, d=D, dtype=jnp.bfloat16) for _ in range(LAYERS)]
    qs, caches = zip(*layers)
    return list(qs), list(caches), block_table, seqlens


def decode_layers(decode):
    """A jitted decode step: the metadata once, then one call per layer."""

    @jax.jit
    def step(qs, caches, block_table, cache_seqlens):
        metadata = jax_flash_mla.get_mla_metadata(cache_seqlens, S_Q * H_Q // H_KV, H_KV,
                                                  num_sm_parts=3)
        return [decode(q, k_cache, block_table, cache_seqlens, HEAD_DIM_V, metadata=metadata,
                       causal=True) for q, k_cache in zip(qs, caches)]

    return step


def test_metadata_is_computed_once_for_all_layers(rng):
    step = decode_layers(jax_flash_mla.flash_mla_with_kvcache)
    hlo = step.lower(*layers_inputs(rng)).compile().as_text()  # calls inlined
    assert hlo.count('custom_call_target="jax_flash_mla_get_mla_metadata"') == 1
    assert hlo.count('custom_call_target="jax_flash_mla_decode"') == LAYERS


def test_layers_sharing_metadata_match_reference(rng):
    qs, caches, block_table, seqlens = layers_inputs(rng)
    results = decode_layers(testing.flash_mla_with_kvcache_poisoned)(qs, caches, block_table,
                                                                      seqlens)
    for q, k_cache, (out, lse) in zip(qs, caches, results):
        ref_out, ref_lse = reference_decode(q, k_cache, block_table, seqlens, causal=True)
        assert_attention_close(out, lse, ref_out, ref_lse, dtype=q.dtype,
                               out_roundings=KERNEL_OUT_ROUNDINGS, lse_atol=KERNEL_LSE_ATOL)


def test_default_metadata_equals_explicit_metadata(rng):
    qs, caches, block_table, seqlens = layers_inputs(rng)
    decode = testing.flash_mla_with_kvcache_poisoned

    @jax.jit
    def both(q, k_cache, block_table, cache_seqlens):
        metadata = jax_flash_mla.get_mla_metadata(cache_seqlens, S_Q * H_Q // H_KV, H_KV)
        explicit = decode(q, k_cache, block_table, cache_seqlens, HEAD_DIM_V, metadata=metadata)
        implicit = decode(q, k_cache, block_table, cache_seqlens, HEAD_DIM_V)
        return explicit, implicit

    explicit, implicit = both(qs[0], caches[0], block_table, seqlens)
    for a, b in zip(explicit, implicit):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def request_tiles(cache_seqlens):
    """Each request's tiles of TOKENS_PER_TILE tokens (none for a negative length)."""
    return -(-np.maximum(cache_seqlens, 0).astype(np.int64) // TOKENS_PER_TILE)


def piece_segments(row, tiles):
    """(request, first tile, end tile, split index) of each segment of a piece's metadata row,
    in order; requests with no tiles own none."""
    for r in range(row[BEGIN_REQ], min(row[END_REQ], len(tiles) - 1) + 1):
        if tiles[r] == 0:
            continue
        first = row[BEGIN_TILE] if r == row[BEGIN_REQ] else 0
        end = row[END_TILE] if r == row[END_REQ] else tiles[r]
        split = row[BEGIN_SPLIT] if r == row[BEGIN_REQ] else 0
        yield r, first, end, split


def assert_valid_schedule(metadata, cache_seqlens):
    """Walks the pieces in order: every request's tiles must be covered exactly once, in
    order, by consecutive splits numbered 0, 1, ... as num_splits says."""
    rows = np.asarray(metadata.tile_scheduler_metadata)
    num_splits = np.asarray(metadata.num_splits)
    b, parts = len(cache_seqlens), rows.shape[0]
    assert rows.dtype == np.int32 and rows.shape == (parts, METADATA_INTS)
    assert (rows[:, len(METADATA_FIELDS):] == 0).all()  # the padding
    assert num_splits.dtype == np.int32 and num_splits.shape == (b + 1,)

    tiles = request_tiles(cache_seqlens)
    splits = np.diff(num_splits)
    assert num_splits[0] == 0 and (splits >= 0).all()
    np.testing.assert_array_equal(splits > 0, tiles > 0)
    assert num_splits[-1] <= max_split_slots(b, parts)

    next_tile = np.zeros(b, np.int64)
    next_split = np.zeros(b, np.int64)
    for row in rows:
        if row[BEGIN_REQ] == b:  # idle piece
            continue
        assert 0 <= row[BEGIN_REQ] <= row[END_REQ] < b, row
        for r, first, end, split in piece_segments(row, tiles):
            assert (first, split) == (next_tile[r], next_split[r]), (row, r)
            assert first < end <= tiles[r], (row, r)
            next_tile[r], next_split[r] = end, next_split[r] + 1
    np.testing.assert_array_equal(next_tile, tiles)
    np.testing.assert_array_equal(next_split, splits)


SEQLENS = {
    "one_token": [1],
    "empty": [0],
    "all_empty": [0, 0, 0],
    "one_tile": [TOKENS_PER_TILE],
    "one_tile_and_a_token": [TOKENS_PER_TILE + 1],
    "long": [1000],
    "very_long": [1 << 20],
    "negative_and_zero": [-5, 100, 0, -(1 << 31)],
    "mixed": [0, 7, 64, 65, 300, 0, 4000, 128],
    "many_short": [3] * 200,
}


@pytest.mark.parametrize("num_sm_parts", [1, 3, 16, 132])
@pytest.mark.parametrize("seqlens", SEQLENS, ids=str)
def test_schedule_invariants(seqlens, num_sm_parts):
    cache_seqlens = np.array(SEQLENS[seqlens], np.int32)
    metadata = jax_flash_mla.get_mla_metadata(cache_seqlens, 16, 1, num_sm_parts=num_sm_parts)
    assert metadata.tile_scheduler_metadata.shape[0] == num_sm_parts
    assert_valid_schedule(metadata, cache_seqlens)


def test_schedule_of_random_batch_under_jit(rng):
    cache_seqlens = rng.integers(-10, 5000, size=64).astype(np.int32)
    compute = jax.jit(jax_flash_mla.get_mla_metadata, static_argnums=(1, 2),
                      static_argnames="num_sm_parts")
    jitted = compute(cache_seqlens, 64, 1, num_sm_parts=132)
    assert_valid_schedule(jitted, cache_seqlens)
    eager = jax_flash_mla.get_mla_metadata(cache_seqlens, 64, 1, num_sm_parts=132)
    for a, b in zip(jitted, eager):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def piece_costs(metadata, cache_seqlens):
    """Each piece's cost as the scheduler counts it: its tiles, plus FIXED_OVERHEAD_TILES for
    each request it touches."""
    tiles = request_tiles(cache_seqlens)
    return np.array([sum(end - first + FIXED_OVERHEAD_TILES
                         for _, first, end, _ in piece_segments(row, tiles))
                     for row in np.asarray(metadata.tile_scheduler_metadata)])


# Equal requests over more pieces than requests: the longest piece is the kernel's critical
# path. The equal share plus one overhead as the only budget cut 64 requests of 64 tiles into
# 34 + 30 tiles (a 39 piece); the smallest budget that fits cuts them into halves of 32. A
# smaller budget that would cut more segments (more partials for the combine) is not taken:
# one request of 64 tiles over 66 pieces stays in 32 pieces of 2 tiles, not 64 of 1.
@pytest.mark.parametrize("b,s_k,num_sm_parts,longest,segments", [
    (64, 4096, 132, 32 + FIXED_OVERHEAD_TILES, 128),
    (32, 4096, 66, 32 + FIXED_OVERHEAD_TILES, 64),
    (32, 4096, 132, 16 + FIXED_OVERHEAD_TILES, 128),
    (1, 4096, 66, 2 + FIXED_OVERHEAD_TILES, 32),
    (128, 4096, 132, 64 + FIXED_OVERHEAD_TILES, 128),
])
def test_schedule_cuts_equal_requests_evenly(b, s_k, num_sm_parts, longest, segments):
    cache_seqlens = np.full(b, s_k, np.int32)
    metadata = jax_flash_mla.get_mla_metadata(cache_seqlens, 64, 1, num_sm_parts=num_sm_parts)
    assert_valid_schedule(metadata, cache_seqlens)
    assert piece_costs(metadata, cache_seqlens).max() == longest
    assert np.asarray(metadata.num_splits)[-1] == segments


@pytest.mark.parametrize("seed", range(6))
def test_schedule_never_longer_than_the_equal_share_bound(seed):
    """The largest budget tried (an equal share of the cost plus one overhead) always fits;
    the chosen one is never larger."""
    rng = np.random.default_rng(seed)
    b, num_sm_parts = int(rng.integers(1, 200)), int(rng.choice([16, 66, 132]))
    cache_seqlens = rng.integers(-100, 9000, size=b).astype(np.int32)
    metadata = jax_flash_mla.get_mla_metadata(cache_seqlens, 64, 1, num_sm_parts=num_sm_parts)
    assert_valid_schedule(metadata, cache_seqlens)
    tiles = request_tiles(cache_seqlens)
    total = int((tiles + FIXED_OVERHEAD_TILES)[tiles > 0].sum())
    assert piece_costs(metadata, cache_seqlens).max() <= (
        -(-total // num_sm_parts) + FIXED_OVERHEAD_TILES)


@pytest.mark.gpu
@pytest.mark.parametrize("seqlens", [*SEQLENS, "random_64", "random_5000", "random_9000"],
                         ids=str)
def test_gpu_schedule_equals_cpu_schedule(seqlens):
    """The metadata kernel against the CPU handler, through each of its three shared-memory
    layouts (tile_schedule_kernel.cu's StagedLayout): up to several hundred requests a copy of
    the schedule for every candidate budget; at 5000 one copy, the chosen budget walked again;
    at 9000 nothing staged (past 48 KiB), the lengths read in place."""
    if seqlens.startswith("random_"):
        rng = np.random.default_rng(7)
        cache_seqlens = rng.integers(-10, 9000, size=int(seqlens[7:])).astype(np.int32)
    else:
        cache_seqlens = np.array(SEQLENS[seqlens], np.int32)
    for num_sm_parts in (1, 66, 132):
        on = {}
        for platform in ("cpu", "gpu"):
            with jax.default_device(jax.devices(platform)[0]):
                on[platform] = jax_flash_mla.get_mla_metadata(
                    jnp.asarray(cache_seqlens), 64, 1, num_sm_parts=num_sm_parts)
        for a, b in zip(on["cpu"], on["gpu"]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the default comes from the "
                    "default backend's devices")
def test_default_num_sm_parts_on_cpu():
    metadata = jax_flash_mla.get_mla_metadata(np.array([100, 0], np.int32), 16, 1)
    assert metadata.tile_scheduler_metadata.shape == (16, METADATA_INTS)
    assert_valid_schedule(metadata, np.array([100, 0]))
