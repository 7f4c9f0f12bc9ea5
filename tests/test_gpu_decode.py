"""The CUDA kernels against the reference computed on the GPU: the CPU grid, then an all-pairs
covering set of FlashMLA's own test grid (see decode_grid.py), then the head counts that stage
the query rows by TMA and some that fall back to cp.async."""

import functools

import jax
import pytest

from jax_flash_mla import device_timing

from decode_grid import CPU_GRID, FLASHMLA_GRID, Case, check_case, poisoned_decode

pytestmark = pytest.mark.gpu


def gpu():
    return jax.devices("gpu")[0]


@pytest.mark.parametrize("case", CPU_GRID, ids=str)
def test_gpu_decode_cpu_grid(case, rng):
    check_case(case, rng, gpu())


@pytest.mark.parametrize("case", FLASHMLA_GRID, ids=str)
def test_gpu_decode_flashmla_grid(case, rng):
    check_case(case, rng, gpu())


# The query rows go by TMA (query_tensor_map.h) when one box per 64 columns covers a CTA's
# rows: heads_per_kv a multiple of the rows per CTA (64 for the 64-row blocks, 16 or 32 for the
# narrow kernel; a run of heads of one token) or a divisor of them (whole tokens, those past s_q
# out of range and written as zeros). Two or more 64-row blocks a KV head run the seesaw kernel
# in CTA pairs (d = 576), one the 64-row kernel (or the seesaw alone, below). Other head counts take the cp.async path. Small
# num_sm_parts make a CTA walk several requests, so the query buffer is refilled (its barrier
# phases turn) within one CTA.
QUERY_TMA_CASES = [
    # 64-row blocks, 64 heads of one token a box: two row blocks per token (paired seesaw).
    Case(b=2, s_q=1, h_q=128, s_k=300),
    Case(b=3, s_q=2, h_q=256, h_kv=2, s_k=140, causal=True, num_sm_parts=1),
    # 64-row blocks, whole tokens (32 heads x 2): the second block's second token is past s_q,
    # its rows not stored (paired seesaw).
    Case(b=2, s_q=3, h_q=32, s_k=200, causal=True, num_sm_parts=3),
    # Key tiles by cp.async (page 7), query rows by TMA.
    Case(b=2, s_q=2, h_q=64, s_k=150, page=7),
    # Narrow kernel, 32 rows: 16 heads x 2 tokens.
    Case(b=3, s_q=2, h_q=16, s_k=300, causal=True, num_sm_parts=1),
    # Narrow kernel, 16 rows: 8 heads x 2 tokens, on the second KV head too.
    Case(b=2, s_q=2, h_q=16, h_kv=2, s_k=300, dtype="float16"),
    # Narrow kernel, 32 rows: 8 heads x 4 tokens, the last past s_q; d = 512.
    Case(b=3, s_q=3, h_q=8, s_k=100, d=512, num_sm_parts=3),
    # Narrow kernel, 16 rows: one head x 16 tokens, 15 of them past s_q.
    Case(b=2, s_q=1, h_q=1, s_k=500, num_sm_parts=132),
    # Fallback to cp.async: 48 heads (64-row kernel), 3 heads (narrow, 16 rows).
    Case(b=2, s_q=1, h_q=48, s_k=300),
    Case(b=3, s_q=2, h_q=6, h_kv=2, s_k=140, causal=True, num_sm_parts=1),
]


@pytest.mark.parametrize("case", QUERY_TMA_CASES, ids=str)
def test_gpu_decode_query_tma(case, rng):
    check_case(case, rng, gpu())


# One row block a KV head (33-64 rows) runs the seesaw kernel unpaired where the block table
# holds at least 96 tiles of 64 keys a CTA and there is a request for every four CTAs
# (seesaw_alone_pays in decode_wgmma_kernel.cu); num_sm_parts=1 reaches that at test sizes
# (the table's capacity is the longest request and two pages). Edges inside the segments: an
# empty request, the causal mask, page 16, fp16, and a CTA walking several requests (the query
# buffer and the pipeline refilled).
SEESAW_ALONE_CASES = [
    Case(b=4, s_q=1, h_q=64, s_k=2000, num_sm_parts=1),
    Case(b=3, s_q=2, h_q=32, s_k=2100, causal=True, page=16, lengths="fixed+zeros",
         num_sm_parts=1),
    Case(b=2, s_q=1, h_q=64, h_kv=2, s_k=3100, dtype="float16", num_sm_parts=1),
]


@pytest.mark.parametrize("case", SEESAW_ALONE_CASES, ids=str)
def test_gpu_decode_seesaw_alone(case, rng):
    check_case(case, rng, gpu())


# The narrow kernel (at most 32 rows a KV head) and the 64-row kernel (33-64 rows a KV head,
# every row count at d = 512) gather key tiles by TMA in key groups: one box per 8 keys with
# all their columns, through a 4-D view of the cache whose head coordinate is its own dimension
# (paged_kv_tensor_map.h); the 64-row kernel puts P and one math warpgroup's partial scores
# over the rope atom of each group (d = 576). For each kernel: every page size TMA can box
# (multiples of 8; 24 is not a power of two, so tiles cross pages mid-tile), both head dims (8
# or 9 column blocks a box), a second KV head, fp16, causal rows, keys past a request's end
# inside its last group and page (NaN in the cache), masked pages inside the length, segments
# that start and end inside a page (many splits), and two row blocks a KV head at d = 512.
KEY_GROUP_CASES = [
    # narrow kernel
    Case(b=3, s_q=1, h_q=16, s_k=300, page=8, lengths="varlen+zeros", num_sm_parts=16),
    Case(b=2, s_q=2, h_q=16, h_kv=2, s_k=700, page=16, causal=True, num_sm_parts=132),
    Case(b=2, s_q=1, h_q=32, h_kv=2, s_k=500, page=24, d=512, dtype="float16"),
    Case(b=4, s_q=1, h_q=32, s_k=1000, page=32, lengths="varlen", num_sm_parts=7),
    Case(b=2, s_q=1, h_q=16, s_k=1300, page=128, num_sm_parts=3),
    # (32 rows, over one piece: the narrow kernel's with more than 3 tiles a CTA)
    Case(b=2, s_q=4, h_q=8, s_k=900, page=256, causal=True, d=512, num_sm_parts=1),
    Case(seqlens=(301, 77, 1500), h_q=16, page=16, invalid_pages=5, num_sm_parts=16),
    # 64-row kernel
    Case(b=3, s_q=1, h_q=64, s_k=300, page=8, lengths="varlen+zeros", num_sm_parts=16),
    Case(b=2, s_q=2, h_q=32, h_kv=2, s_k=700, page=16, causal=True, num_sm_parts=132),
    Case(b=2, s_q=1, h_q=128, h_kv=2, s_k=500, page=24, d=512, dtype="float16"),
    Case(b=4, s_q=1, h_q=64, s_k=1000, page=32, lengths="varlen", num_sm_parts=7),
    Case(b=2, s_q=2, h_q=64, s_k=900, page=128, causal=True, d=512, num_sm_parts=16),
    Case(seqlens=(301, 77, 1500), h_q=48, page=16, invalid_pages=5, num_sm_parts=16),
]


@pytest.mark.parametrize("case", KEY_GROUP_CASES, ids=str)
def test_gpu_decode_key_groups(case, rng):
    check_case(case, rng, gpu())


# 17-32 rows a KV head go to the narrow kernel only where the block table holds more than 3 key
# tiles of 64 a CTA (narrow_kernel_pays, decode_narrow_kernel.cu); with fewer, a call is about
# one tile's latency and the 64-row kernel runs them in its (padded) row block. The table holds
# the longest request and two pages; num_sm_parts defaults to the SM count over the KV heads.
KERNEL_ROUTE_CASES = [
    # 64-row kernel: b=1 s_k=4096 (66 tiles over 132 or 114 pieces); 16 heads x 2 causal
    # tokens, page 16, empty requests; two KV heads of 32 rows, d = 512, fp16, masked pages; 24
    # rows, 2 x 18 tiles over 16 pieces.
    (Case(b=1, s_q=1, h_q=32, s_k=4096), "wgmma"),
    (Case(b=3, s_q=2, h_q=16, s_k=700, page=16, causal=True, lengths="varlen+zeros"), "wgmma"),
    (Case(b=3, s_q=1, h_q=64, h_kv=2, s_k=300, page=32, d=512, dtype="float16",
          invalid_pages=2), "wgmma"),
    (Case(b=2, s_q=1, h_q=24, s_k=1000, num_sm_parts=16), "wgmma"),
    # narrow kernel: 4 x 17 tiles over 7 pieces; 2 x 34 over 1, causal.
    (Case(b=4, s_q=1, h_q=32, s_k=1000, page=32, num_sm_parts=7), "narrow"),
    (Case(b=2, s_q=2, h_q=16, s_k=2000, causal=True, num_sm_parts=1), "narrow"),
]


@pytest.mark.parametrize("case,kernel", KERNEL_ROUTE_CASES,
                         ids=[f"{kernel}-{case}" for case, kernel in KERNEL_ROUTE_CASES])
def test_gpu_decode_kernel_route(case, kernel, rng):
    """The case against the reference, and the split-KV kernel that ran it, by the profiler's
    kernel names: a case meant for one kernel cannot pass on the other."""
    check_case(case, rng, gpu())
    args = jax.device_put(tuple(case.make_inputs(rng)), gpu())
    call = functools.partial(poisoned_decode, num_sm_parts=case.num_sm_parts,
                             softmax_scale=case.softmax_scale, causal=case.causal)
    names = [name for name, _, _ in device_timing.traced_kernel_events(call, args, runs=1)]
    ran = {k for k in ("narrow", "wgmma", "seesaw")
           if any(f"split_kv_decode_{k}" in name for name in names)}
    assert ran == {kernel}, names
