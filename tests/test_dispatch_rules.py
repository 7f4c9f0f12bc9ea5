"""The rules that pick the CUDA decode's split-KV kernel (cpp/sm90/heuristics.h), walked on the
CPU through the extension's binding of them; the testing-only route that forces a kernel; and
the C++ constants the Python side reads instead of copying."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash_mla
from jax_flash_mla import _constants, _jax_flash_mla, api, testing
from jax_flash_mla.primitives import mla_decode_local_p, mla_decode_p
from jax_flash_mla.testing import (SPLIT_KV_KERNELS, choose_split_kv_kernel,
                                   runnable_split_kv_kernels)

from comparisons import KERNEL_LSE_ATOL, KERNEL_OUT_ROUNDINGS, assert_attention_close
from decode_grid import Case, reference_decode

ROWS = _constants.ROWS_PER_CTA
TILE = _constants.TOKENS_PER_TILE
FORCED = [name for name in SPLIT_KV_KERNELS if name != "dispatch"]

# A call every rule could take either way: one row block at d = 576, both operands boxed by
# TMA, 4 requests of 16 tiles over 16 pieces on an H100-like device (132 SMs; 66 pairs, as if
# every GPC held an even number of SMs).
BASE = dict(rows_per_kv=ROWS, head_dim=576, batch=4, max_blocks_per_seq=16, page_block_size=TILE,
            num_sm_parts=16, num_heads_k=1, keys_fit_tma=True, query_fits_tma=True, sms=132,
            max_resident_pairs=66)


def tiles(n):
    """Block-table columns of one-tile pages holding n tiles."""
    return dict(max_blocks_per_seq=n, page_block_size=TILE)


# id: (overrides of BASE, the kernel the rules pick). The boundaries of each rule sit next to
# each other: rows 16/17 and 32/33, batch * table tiles at 3 tiles a CTA, at 96 tiles a CTA and
# at 4 CTAs a request, pairs in as few waves as single CTAs or not.
RULES = {
    # transposed: at most 16 rows always, even with one tile over 132 pieces.
    "16_rows_one_tile": (dict(rows_per_kv=16, batch=1, num_sm_parts=132, **tiles(1)),
                         "transposed"),
    "1_row_d512": (dict(rows_per_kv=1, head_dim=512, **tiles(1)), "transposed"),
    "17_rows_one_tile": (dict(rows_per_kv=17, batch=1, num_sm_parts=132, **tiles(1)),
                         "lockstep"),
    # 17-32 rows: more than 3 tiles a CTA (batch * table tiles > 3 * num_sm_parts).
    "17_rows_3_tiles_a_cta": (dict(rows_per_kv=17, batch=1, num_sm_parts=4, **tiles(12)),
                              "lockstep"),
    "17_rows_past_3_tiles_a_cta": (dict(rows_per_kv=17, batch=1, num_sm_parts=4, **tiles(13)),
                                   "transposed"),
    "32_rows_3_tiles_a_cta": (dict(rows_per_kv=32, batch=3, num_sm_parts=8, **tiles(8)),
                              "lockstep"),
    "32_rows_past_3_tiles_a_cta": (dict(rows_per_kv=32, batch=5, num_sm_parts=8, **tiles(5)),
                                   "transposed"),
    # The table's capacity counts in whole tiles, rounded up: 48 pages of 16 keys are 12 tiles,
    # 49 are 13 (the last one partly filled).
    "32_rows_small_pages_12_tiles": (dict(rows_per_kv=32, batch=1, num_sm_parts=4,
                                          max_blocks_per_seq=48, page_block_size=16),
                                     "lockstep"),
    "32_rows_small_pages_13_tiles": (dict(rows_per_kv=32, batch=1, num_sm_parts=4,
                                          max_blocks_per_seq=49, page_block_size=16),
                                     "transposed"),
    # 33 rows never go to the transposed kernel, however long the keys.
    "33_rows_long_d512": (dict(rows_per_kv=33, head_dim=512, **tiles(5000)), "lockstep"),
    # seesaw alone: one row block, at least 96 tiles a CTA and 4 CTAs at most a request.
    "64_rows_under_96_tiles_a_cta": (dict(batch=4, num_sm_parts=16, **tiles(383)), "lockstep"),
    "64_rows_96_tiles_a_cta": (dict(batch=4, num_sm_parts=16, **tiles(384)), "seesaw_alone"),
    "33_rows_96_tiles_a_cta": (dict(rows_per_kv=33, batch=4, num_sm_parts=16, **tiles(384)),
                               "seesaw_alone"),
    "32_rows_96_tiles_a_cta": (dict(rows_per_kv=32, batch=4, num_sm_parts=16, **tiles(384)),
                               "transposed"),
    "64_rows_4_ctas_a_request": (dict(batch=4, num_sm_parts=16, **tiles(2000)), "seesaw_alone"),
    "64_rows_past_4_ctas_a_request": (dict(batch=4, num_sm_parts=17, **tiles(2000)),
                                      "lockstep"),
    "64_rows_long_d512": (dict(head_dim=512, **tiles(2000)), "lockstep"),
    "64_rows_long_keys_by_cp_async": (dict(keys_fit_tma=False, **tiles(2000)), "lockstep"),
    "64_rows_long_query_by_cp_async": (dict(query_fits_tma=False, **tiles(2000)), "lockstep"),
    # Two row blocks alone never run the unpaired seesaw: pairs or nothing.
    "128_rows_long_no_pairs": (dict(rows_per_kv=2 * ROWS, max_resident_pairs=0, **tiles(2000)),
                               "lockstep"),
    # seesaw paired: an even number of row blocks, and the pairs in as few waves as single CTAs
    # (132 CTAs: one wave of 132 SMs; 66 pairs fit in one wave of 66, not of 65).
    "128_rows_pairs_fit": (dict(rows_per_kv=2 * ROWS, num_sm_parts=66, **tiles(1)),
                           "seesaw_paired"),
    "65_rows_pairs_fit": (dict(rows_per_kv=ROWS + 1, num_sm_parts=66, **tiles(1)),
                          "seesaw_paired"),
    "128_rows_pairs_do_not_fit": (dict(rows_per_kv=2 * ROWS, num_sm_parts=66,
                                       max_resident_pairs=65, **tiles(1)), "lockstep"),
    "256_rows_pairs_fit": (dict(rows_per_kv=4 * ROWS, num_sm_parts=33, **tiles(1)),
                           "seesaw_paired"),
    "192_rows_odd_row_blocks": (dict(rows_per_kv=3 * ROWS, num_sm_parts=44, **tiles(2000)),
                                "lockstep"),
    "128_rows_unknown_sms": (dict(rows_per_kv=2 * ROWS, num_sm_parts=66, sms=0, **tiles(1)),
                             "lockstep"),
    "128_rows_d512": (dict(rows_per_kv=2 * ROWS, num_sm_parts=66, head_dim=512, **tiles(1)),
                      "lockstep"),
    "128_rows_keys_by_cp_async": (dict(rows_per_kv=2 * ROWS, num_sm_parts=66, keys_fit_tma=False,
                                       **tiles(1)), "lockstep"),
    "128_rows_query_by_cp_async": (dict(rows_per_kv=2 * ROWS, num_sm_parts=66,
                                        query_fits_tma=False, **tiles(1)), "lockstep"),
    # Two KV heads double the CTAs: 2 waves of single CTAs, 66 pairs twice fit in 2 waves too.
    "128_rows_two_kv_heads": (dict(rows_per_kv=2 * ROWS, num_sm_parts=66, num_heads_k=2,
                                   **tiles(1)), "seesaw_paired"),
}


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_choose_split_kv_kernel(rule):
    overrides, kernel = RULES[rule]
    inputs = {**BASE, **overrides}
    assert choose_split_kv_kernel(**inputs) == kernel
    assert kernel in runnable_split_kv_kernels(**inputs)


@pytest.mark.parametrize("rows,head_dim,keys_fit_tma,query_fits_tma,runnable", [
    (1, 576, True, True, ["transposed", "lockstep"]),
    (32, 576, True, True, ["transposed", "lockstep"]),
    (33, 576, True, True, ["lockstep", "seesaw_alone"]),
    (ROWS, 576, True, True, ["lockstep", "seesaw_alone"]),
    (ROWS + 1, 576, True, True, ["lockstep", "seesaw_alone", "seesaw_paired"]),
    (3 * ROWS, 576, True, True, ["lockstep", "seesaw_alone"]),
    (2 * ROWS, 512, True, True, ["lockstep"]),
    (2 * ROWS, 576, False, True, ["lockstep"]),
    (2 * ROWS, 576, True, False, ["lockstep"]),
])
def test_runnable_split_kv_kernels(rows, head_dim, keys_fit_tma, query_fits_tma, runnable):
    """What each kernel can run at all: the transposed one at most 32 rows, the seesaw one
    d = 576 with both operands by TMA (paired: row blocks in pairs), the lockstep one all."""
    inputs = {**BASE, "rows_per_kv": rows, "head_dim": head_dim, "keys_fit_tma": keys_fit_tma,
              "query_fits_tma": query_fits_tma}
    assert runnable_split_kv_kernels(**inputs) == runnable


def test_the_rules_pick_a_kernel_that_can_run():
    for rows in (1, 16, 17, 32, 33, ROWS, ROWS + 1, 2 * ROWS, 3 * ROWS, 4 * ROWS):
        for head_dim, tma in ((576, True), (576, False), (512, True)):
            for batch, n_tiles, parts in ((1, 1, 132), (4, 2000, 16), (64, 64, 1), (8, 12, 33)):
                for pairs in (0, 60, 66):
                    inputs = {**BASE, "rows_per_kv": rows, "head_dim": head_dim, "batch": batch,
                              "num_sm_parts": parts, "keys_fit_tma": tma, "query_fits_tma": tma,
                              "max_resident_pairs": pairs, **tiles(n_tiles)}
                    assert choose_split_kv_kernel(**inputs) in runnable_split_kv_kernels(
                        **inputs), inputs


def test_split_kv_kernel_names():
    assert SPLIT_KV_KERNELS == _jax_flash_mla.split_kv_kernels()
    assert SPLIT_KV_KERNELS["dispatch"] == _constants.DISPATCH == 0
    assert sorted(SPLIT_KV_KERNELS.values()) == list(range(len(SPLIT_KV_KERNELS)))
    assert set(FORCED) == {"transposed", "lockstep", "seesaw_alone", "seesaw_paired"}


# --- the forced route on the CPU --------------------------------------------------------------

FORCED_CASE = Case(b=3, s_q=2, h_q=16, s_k=200, page=16, causal=True, lengths="varlen+zeros",
                   num_sm_parts=5)


@pytest.fixture(scope="module")
def forced_inputs():
    return tuple(jnp.asarray(x) for x in FORCED_CASE.make_inputs(np.random.default_rng(3)))


def poisoned(inputs, kernel):
    return testing.flash_mla_with_kvcache_poisoned(*inputs, 512, causal=True, kernel=kernel)


@pytest.mark.parametrize("kernel", FORCED)
def test_forced_kernel_on_the_cpu_gives_the_reference_answer(kernel, forced_inputs):
    """The CPU handler has one implementation for every kernel: the same bits as dispatch."""
    out, lse = poisoned(forced_inputs, kernel)
    ref_out, ref_lse = reference_decode(*forced_inputs, causal=True)
    assert_attention_close(out, lse, ref_out, ref_lse, dtype=jnp.dtype(FORCED_CASE.dtype),
                           out_roundings=KERNEL_OUT_ROUNDINGS, lse_atol=KERNEL_LSE_ATOL)
    for a, b in zip((out, lse), poisoned(forced_inputs, "dispatch")):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kernel", ["seesaw", "Lockstep", "", 2, None])
def test_forced_kernel_by_a_bad_name_is_refused(kernel, forced_inputs):
    with pytest.raises(ValueError) as error:
        poisoned(forced_inputs, kernel)
    message = str(error.value)
    assert message.startswith("kernel: expected"), message
    assert all(repr(name) in message for name in SPLIT_KV_KERNELS), message
    assert message.endswith(f"got {kernel!r}"), message


@pytest.mark.parametrize("value", [-1, len(SPLIT_KV_KERNELS)])
def test_decode_target_refuses_a_kernel_value_out_of_range(value, forced_inputs):
    """The C++ handler checks the attribute again: anyone can call the target directly."""
    q, k_cache, block_table, cache_seqlens = forced_inputs
    metadata = jax_flash_mla.get_mla_metadata(cache_seqlens, 32, 1, num_sm_parts=5)
    with pytest.raises(jax.errors.JaxRuntimeError, match=rf"kernel: expected .*got {value}"):
        jax.block_until_ready(mla_decode_p.bind(
            q, k_cache, block_table, cache_seqlens, *metadata, softmax_scale=0.1, causal=True,
            head_dim_v=512, kernel=value))


# --- the constants ----------------------------------------------------------------------------

def test_constants_are_the_extensions():
    for name in ("METADATA_INTS", "TOKENS_PER_TILE", "FIXED_OVERHEAD_TILES", "ROWS_PER_CTA"):
        value = getattr(_constants, name)
        assert type(value) is int and value == getattr(_jax_flash_mla, name) > 0, name
    fields = _constants.METADATA_FIELDS
    assert sorted(fields.values()) == list(range(len(fields))) and len(fields) <= (
        _constants.METADATA_INTS)


def test_metadata_width_is_the_exported_one():
    metadata = jax_flash_mla.get_mla_metadata(np.array([5, 0], np.int32), 16, 1, num_sm_parts=3)
    assert metadata.tile_scheduler_metadata.shape == (3, _constants.METADATA_INTS)
    narrow = metadata._replace(tile_scheduler_metadata=metadata.tile_scheduler_metadata[:, :-1])
    q, k_cache = jnp.zeros((2, 1, 16, 576), jnp.bfloat16), jnp.zeros((2, 16, 1, 576), jnp.bfloat16)
    with pytest.raises(ValueError, match=rf"\(num_sm_parts, {_constants.METADATA_INTS}\)"):
        jax_flash_mla.flash_mla_with_kvcache(q, k_cache, jnp.zeros((2, 1), jnp.int32),
                                             jnp.zeros((2,), jnp.int32), metadata=narrow)


@pytest.mark.parametrize("batch,parts", [(1, 1), (3, 16), (64, 132)])
def test_split_scratch_is_sized_by_the_exported_slot_count(batch, parts):
    q = jax.ShapeDtypeStruct((batch, 2, 16, 576), jnp.bfloat16)
    k_cache = jax.ShapeDtypeStruct((4, 16, 1, 576), jnp.bfloat16)
    table = jax.ShapeDtypeStruct((batch, 2), jnp.int32)
    seqlens = jax.ShapeDtypeStruct((batch,), jnp.int32)
    tsm = jax.ShapeDtypeStruct((parts, _constants.METADATA_INTS), jnp.int32)
    splits = jax.ShapeDtypeStruct((batch + 1,), jnp.int32)
    _, _, o_accum, lse_accum = jax.eval_shape(
        lambda *args: mla_decode_local_p.bind(*args, softmax_scale=0.1, causal=False,
                                              head_dim_v=512, kernel=_constants.DISPATCH),
        q, k_cache, table, seqlens, tsm, splits)
    slots = _jax_flash_mla.max_split_slots(batch, parts)
    assert slots == _constants.max_split_slots(batch, parts) >= batch
    assert o_accum.shape == (slots, 1, 32, 512) and lse_accum.shape == (slots, 1, 32)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="virtual SMs are the CPU's")
@pytest.mark.parametrize("rows", [1, ROWS, ROWS + 1, 4 * ROWS])
def test_default_num_sm_parts_counts_row_blocks_of_the_exported_size(rows):
    blocks = math.ceil(rows / ROWS)
    assert api.default_num_sm_parts(rows, 1) == max(1, api.CPU_VIRTUAL_SMS // blocks)


def test_tiles_are_the_exported_size():
    """A request of TOKENS_PER_TILE keys is one tile, one key more is two: the schedule's
    pieces end at those tiles."""
    for length, n_tiles in ((TILE, 1), (TILE + 1, 2)):
        metadata = jax_flash_mla.get_mla_metadata(np.array([length], np.int32), 16, 1,
                                                  num_sm_parts=64)
        tsm = np.asarray(metadata.tile_scheduler_metadata)
        assert tsm[:, _constants.METADATA_FIELDS["end_tile"]].max() == n_tiles
