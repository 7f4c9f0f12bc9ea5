"""The CUDA kernels against the reference computed on the GPU: the CPU grid and an all-pairs
covering set of FlashMLA's own test grid (see decode_grid.py) through the dispatch; a reduced
grid through every split-KV kernel in turn, forced by the testing-only route; and the kernel
the dispatch runs, by its profiler name, against the rules of cpp/sm90/heuristics.h."""

import functools

import jax
import pytest

from jax_flash_mla import api, device_timing
from jax_flash_mla._constants import ROWS_PER_CTA
from jax_flash_mla.testing import choose_split_kv_kernel, runnable_split_kv_kernels

from decode_grid import (CPU_GRID, FLASHMLA_GRID, FP8_CPU_GRID, FP8_GPU_GRID, Case,
                         check_case, poisoned_decode)

pytestmark = pytest.mark.gpu


def gpu():
    return jax.devices("gpu")[0]


@pytest.mark.parametrize("case", CPU_GRID, ids=str)
def test_gpu_decode_cpu_grid(case, rng):
    check_case(case, rng, gpu())


@pytest.mark.parametrize("case", FLASHMLA_GRID, ids=str)
def test_gpu_decode_flashmla_grid(case, rng):
    check_case(case, rng, gpu())


@pytest.mark.parametrize("case", FP8_CPU_GRID + FP8_GPU_GRID, ids=str)
def test_gpu_fp8_decode(case, rng):
    """Dense decode over the FP8 cache: the CPU's FP8 grid and larger cases (the FP8 key
    producer of the lockstep and transposed kernels)."""
    check_case(case, rng, gpu())


# --- every kernel through the forced route --------------------------------------------------

# One grid for all four kernels; each runs the cases it can (runnable_split_kv_kernels). By rows
# a KV head: at most 32 (transposed, lockstep), one row block (lockstep, seesaw alone), several
# (lockstep, seesaw alone with one CTA a row block, seesaw paired where they come in pairs).
# Across each kernel's share: the page sizes TMA boxes (8, 16, 24: tiles cross pages mid-tile,
# 64) and, for the kernels that gather by cp.async, pages it cannot (1, 3, 12); fp16 and bf16;
# d 576 and (not seesaw) 512; causal rows; empty requests among varying lengths; masked pages
# inside the lengths; two KV heads; one piece (a CTA walks every request: its query buffer and
# pipeline refilled), 7 (requests split, partials combined) and 132 (a tile or two a piece).
# Query rows go by TMA where one box covers a CTA's rows (query_tensor_map.h): a run of heads
# of one token, or whole tokens, those past s_q out of range (read as zeros); else by cp.async.
FORCED_GRID = [
    # At most 32 rows: 16 heads of a token; 8 heads x 2 tokens; 32 heads; 8 heads x 4 tokens
    # (the last past s_q); 1 head x 16 tokens (15 past s_q); by cp.async: the keys (pages 1, 3,
    # 12), the query rows (3 heads a KV head).
    Case(b=3, s_q=1, h_q=16, s_k=300, page=8, lengths="varlen+zeros", num_sm_parts=7),
    Case(b=2, s_q=2, h_q=16, h_kv=2, s_k=500, page=16, causal=True, dtype="float16",
         num_sm_parts=132),
    Case(b=2, s_q=1, h_q=32, s_k=700, page=24, d=512, num_sm_parts=1),
    Case(b=3, s_q=3, h_q=8, s_k=200, page=64, d=512, causal=True, num_sm_parts=7),
    Case(b=2, s_q=1, h_q=1, s_k=500, page=64, num_sm_parts=132),
    Case(b=3, s_q=2, h_q=16, s_k=400, page=1, causal=True, lengths="varlen", num_sm_parts=7),
    Case(b=2, s_q=2, h_q=6, h_kv=2, s_k=300, page=3, d=512, dtype="float16", num_sm_parts=1),
    Case(seqlens=(301, 77, 1500), h_q=16, page=12, invalid_pages=5, num_sm_parts=7),
    # One row block (33-64 rows): 64 heads of a token; 32 heads x 2 tokens; 16 heads x 4
    # tokens (the last past s_q); d = 512 and 48 heads (query rows by cp.async) and page 3 (keys
    # by cp.async): the lockstep kernel only.
    Case(b=3, s_q=1, h_q=64, s_k=300, page=8, lengths="varlen+zeros", num_sm_parts=7),
    Case(b=2, s_q=2, h_q=64, h_kv=2, s_k=500, page=16, causal=True, dtype="float16",
         num_sm_parts=132),
    Case(b=2, s_q=3, h_q=16, s_k=700, page=24, causal=True, num_sm_parts=1),
    Case(seqlens=(301, 77, 1500), h_q=64, page=16, invalid_pages=5, num_sm_parts=7),
    Case(b=2, s_q=1, h_q=64, s_k=600, page=64, d=512, num_sm_parts=7),
    Case(b=2, s_q=1, h_q=48, s_k=300, page=64, num_sm_parts=7),
    Case(b=3, s_q=1, h_q=64, s_k=300, page=3, lengths="fixed+zeros", num_sm_parts=132),
    # Two row blocks (pairs for the seesaw kernel): 128 heads; 64 heads x 2 tokens; two KV heads
    # of 128; 32 heads x 3 tokens (the second block's second token past s_q). Three row blocks
    # (no pairs). Two at d = 512 with keys by cp.async (the lockstep kernel only).
    Case(b=2, s_q=1, h_q=128, s_k=300, page=64, lengths="varlen+zeros", num_sm_parts=7),
    Case(b=2, s_q=2, h_q=64, s_k=500, page=16, causal=True, dtype="float16", num_sm_parts=132),
    Case(b=2, s_q=1, h_q=256, h_kv=2, s_k=400, page=24, num_sm_parts=1),
    Case(seqlens=(301, 77, 1500), h_q=128, page=8, invalid_pages=5, num_sm_parts=7),
    Case(b=2, s_q=3, h_q=32, s_k=200, page=64, causal=True, num_sm_parts=7),
    Case(b=2, s_q=3, h_q=64, s_k=300, page=16, dtype="float16", num_sm_parts=7),
    Case(b=3, s_q=2, h_q=64, s_k=200, page=12, d=512, causal=True, lengths="varlen+zeros",
         num_sm_parts=7),
    # FP8 keys (the lockstep and transposed kernels' FP8 instances): 16 and 32 rows, one and
    # two row blocks, pages 1, 7, 16, 64, masked pages.
    Case(b=3, s_q=1, h_q=16, s_k=300, page=16, lengths="varlen+zeros", num_sm_parts=7,
         fp8=True),
    Case(b=2, s_q=2, h_q=16, s_k=500, page=7, causal=True, num_sm_parts=132, fp8=True),
    Case(b=2, s_q=1, h_q=64, s_k=700, page=1, num_sm_parts=1, fp8=True),
    Case(seqlens=(301, 77, 1500), h_q=128, page=64, invalid_pages=5, num_sm_parts=7, fp8=True),
    Case(b=2, s_q=2, h_q=64, s_k=400, page=16, causal=True, lengths="varlen", num_sm_parts=7,
         fp8=True),
]
FORCED_KERNELS = ("transposed", "lockstep", "seesaw_alone", "seesaw_paired")


def keys_fit_tma(case):
    """paged_kv_fits_tma (paged_kv_tensor_map.h) for XLA's aligned buffers: a box of 8 keys
    must not cross a page, and FP8 keys go through registers, never TMA."""
    return case.page % 8 == 0 and not case.fp8


def query_fits_tma(heads_per_kv):
    """query_box (query_tensor_map.h) for a CTA of ROWS_PER_CTA rows: a run of heads of one
    token, or whole tokens."""
    return heads_per_kv % ROWS_PER_CTA == 0 or ROWS_PER_CTA % heads_per_kv == 0


def dispatch_inputs(case, *, batch, max_blocks_per_seq, num_sm_parts, sms, max_resident_pairs):
    """The DispatchInputs the CUDA handler builds for a call of `case` (dispatch.cu)."""
    return dict(rows_per_kv=case.s_q * case.h_q // case.h_kv, head_dim=case.d, batch=batch,
                max_blocks_per_seq=max_blocks_per_seq, page_block_size=case.page,
                num_sm_parts=num_sm_parts, num_heads_k=case.h_kv,
                keys_fit_tma=keys_fit_tma(case),
                query_fits_tma=query_fits_tma(case.h_q // case.h_kv), sms=sms,
                max_resident_pairs=max_resident_pairs)


def runnable(case):
    # Whether a kernel can run a call depends on its shape only: not on the lengths, the
    # schedule or the device, given here as placeholders.
    return runnable_split_kv_kernels(**dispatch_inputs(
        case, batch=1, max_blocks_per_seq=1, num_sm_parts=1, sms=0, max_resident_pairs=0))


FORCED_CASES = [(kernel, case) for kernel in FORCED_KERNELS for case in FORCED_GRID
                if kernel in runnable(case)]


@pytest.mark.parametrize("kernel,case", FORCED_CASES,
                         ids=[f"{kernel}-{case}" for kernel, case in FORCED_CASES])
def test_gpu_decode_forced_kernel(kernel, case, rng):
    check_case(case, rng, gpu(), kernel=kernel)


def kernels_that_ran(kernel_names):
    """The split-KV kernels among the profiler's kernel names; the paired seesaw instance is
    the one whose kPaired template argument is true (demangled or mangled)."""
    ran = set()
    for name in kernel_names:
        if "split_kv_transposed_kernel" in name:
            ran.add("transposed")
        elif "split_kv_lockstep_kernel" in name:
            ran.add("lockstep")
        elif "split_kv_seesaw_kernel" in name:
            paired = ", true>" in name or "Lb1E" in name
            ran.add("seesaw_paired" if paired else "seesaw_alone")
    return ran


def profiled_kernels(case, rng, kernel):
    """(the case's inputs on the GPU, the split-KV kernels that ran one call of it)."""
    args = jax.device_put(tuple(case.make_inputs(rng)), gpu())
    call = functools.partial(poisoned_decode, num_sm_parts=case.num_sm_parts,
                             softmax_scale=case.softmax_scale, causal=case.causal, kernel=kernel,
                             fp8=case.fp8)
    events = device_timing.traced_kernel_events(call, args, runs=1)
    return args, kernels_that_ran(name for name, _, _ in events)


@pytest.mark.parametrize("kernel", FORCED_KERNELS)
def test_gpu_forced_kernel_is_the_one_that_runs(kernel, rng):
    """The forced route reaches the launch: the profiler sees the forced kernel and no other,
    on the first grid case it can run."""
    case = next(case for forced, case in FORCED_CASES if forced == kernel)
    _, ran = profiled_kernels(case, rng, kernel)
    assert ran == {kernel}


# --- what the dispatch picks ----------------------------------------------------------------

# Shapes whose pick does not depend on how many seesaw CTA pairs the device holds at once (it
# says so through an occupancy query the tests cannot repeat): at most 32 rows, an odd number
# of row blocks, keys by cp.async, or a single pair (one piece, one KV head, two row blocks),
# which fits on any device holding one. The test checks that independence (the pick at one pair
# and at SMs / 2), that the rules still pick the kernel each case is meant for, and that the
# profiler saw that kernel run. The block table holds the longest request and two pages;
# num_sm_parts None is the default: the SM count over the KV heads and row blocks.
DISPATCH_CASES = [
    # At most 16 rows, whatever the work; 32 rows with 4 x 17 tiles over 7 pieces.
    (Case(b=2, s_q=1, h_q=16, s_k=300), "transposed"),
    (Case(b=4, s_q=1, h_q=32, s_k=1000, page=32, num_sm_parts=7), "transposed"),
    # 32 rows with 3 tiles a CTA or fewer: 66 tiles over a chip of pieces; 16 heads x 2 causal
    # tokens, page 16, empty requests.
    (Case(b=1, s_q=1, h_q=32, s_k=4096), "lockstep"),
    (Case(b=3, s_q=2, h_q=16, s_k=700, page=16, causal=True, lengths="varlen+zeros"),
     "lockstep"),
    # One row block short of 96 tiles a CTA; three row blocks; keys by cp.async; d = 512.
    (Case(b=2, s_q=1, h_q=64, s_k=300, num_sm_parts=7), "lockstep"),
    (Case(b=2, s_q=3, h_q=64, s_k=300, num_sm_parts=7), "lockstep"),
    (Case(b=2, s_q=1, h_q=128, s_k=300, page=7, num_sm_parts=1), "lockstep"),
    (Case(b=3, s_q=1, h_q=64, h_kv=2, s_k=300, page=32, d=512, dtype="float16",
          invalid_pages=2), "lockstep"),
    # One row block with 4 x 34 tiles over one piece.
    (Case(b=4, s_q=1, h_q=64, s_k=2000, num_sm_parts=1), "seesaw_alone"),
    # Two row blocks over one piece: one pair.
    (Case(b=2, s_q=1, h_q=128, s_k=300, num_sm_parts=1), "seesaw_paired"),
]


@pytest.mark.parametrize("case,meant", DISPATCH_CASES,
                         ids=[f"{meant}-{case}" for case, meant in DISPATCH_CASES])
def test_gpu_dispatch_runs_the_kernel_its_rules_pick(case, meant, rng):
    args, ran = profiled_kernels(case, rng, "dispatch")
    block_table = args[2]
    rows = case.s_q * case.h_q // case.h_kv
    sms = gpu().core_count
    inputs = functools.partial(
        dispatch_inputs, case, batch=block_table.shape[0],
        max_blocks_per_seq=block_table.shape[1], sms=sms,
        num_sm_parts=case.num_sm_parts or api.default_num_sm_parts(rows, case.h_kv))
    picks = {pairs: choose_split_kv_kernel(**inputs(max_resident_pairs=pairs))
             for pairs in (1, sms // 2)}
    assert len(set(picks.values())) == 1, f"the pick depends on the pairs that fit: {picks}"
    assert picks[1] == meant, f"the rules no longer pick {meant} for this case: {picks[1]}"
    assert ran == {meant}
    check_case(case, rng, gpu())
