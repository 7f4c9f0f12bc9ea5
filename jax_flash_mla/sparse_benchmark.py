"""`jax-flash-mla bench --sparse`: the sparse decode rows (DeepSeek-V3.2 top-k attention) of issue
25, ours and, with --flashmla, FlashMLA's on the same inputs in the same run, timed by the dense
benchmark's method (benchmark.py's docstring): a block of `calls` back-to-back calls, metadata
precomputed, a jitted function for ours and a CUDA graph for FlashMLA, the calls apart by their
softmax scale so that XLA cannot merge them.

Rows: b in {2, 16, 64, 128} x h_q in {64, 128} x s_q in {1, 2} at topk 2048, and (64, 128, 2)
at topk 16384, on the FP8 cache; h_q 16 and 32 at b = 128 (a tensor-parallel shard's heads),
which FlashMLA runs with q padded to 64 heads (flashmla_baseline.pad_heads); two rows on a bf16
cache, ours only (FlashMLA's Hopper sparse decode reads only the FP8 one).

Inputs (sparse_case): a pool of pages of 64 tokens, random bf16 latents quantized by
quantize_fp8_kvcache, at least 4x the L2 in FP8 bytes; each query token's indices are `topk`
distinct tokens drawn uniformly from the whole pool. Calls rotate over index sets, as many as
make the tokens that consecutive calls read exceed 4x the L2 (as the dense bench rotates pool
copies), so that a call does not read its tokens from the L2 where earlier calls left them; a
block of `calls` calls uses only its first `calls` sets (at b = 2, s_q = 1, 20 calls read
54 MB, about the L2, before the next block repeats them). A token can still be in the L2 by
chance, another set having read it: with probability about L2 / pool, 1/4 or less.

Formulas (per call, as FlashMLA counts them; 656 bytes a token in FP8, 1152 in bf16):
  bytes = b * s_q * topk * bytes_per_token + b * s_q * h_q * (576 + 512) * 2
  FLOPs = 2 * b * s_q * h_q * topk * (576 + 512)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import jax
import jax.numpy as jnp

import jax_flash_mla
from jax_flash_mla import benchmark, flashmla_baseline, reference
from jax_flash_mla.fp8_cache import FP8_BYTES_PER_TOKEN

D, DV = benchmark.D, benchmark.DV
PAGE = 64
# Ours against the plain-JAX reference on the first request of the first call: the tests' kernel
# bounds (tests/comparisons.py: 4 bf16 roundings of out, 1e-4 of lse); against FlashMLA,
# benchmark.AGREE_*, twice those.
REFERENCE_OUT_ROUNDINGS, REFERENCE_LSE_ATOL = 4, 1e-4


class SparseRow(NamedTuple):
    b: int
    h_q: int
    s_q: int
    topk: int
    fp8: bool = True  # the 656-byte FP8 cache; False: a bf16 one


GRID_ROWS = [SparseRow(b, h_q, s_q, 2048) for b in (2, 16, 64, 128) for h_q in (64, 128)
             for s_q in (1, 2)] + [SparseRow(64, 128, 2, 16384)]
FEW_HEADS_ROWS = [SparseRow(128, h_q, 1, 2048) for h_q in (16, 32)]
BF16_ROWS = [SparseRow(128, 64, 1, 2048, fp8=False), SparseRow(128, 128, 2, 2048, fp8=False)]
# --quick: the rows of DESIGN.md's table of FlashMLA's sparse figures, FP8 only.
QUICK_ROWS = [SparseRow(128, 128, 2, 2048), SparseRow(64, 128, 2, 2048),
              SparseRow(16, 128, 2, 2048), SparseRow(2, 128, 2, 2048),
              SparseRow(128, 64, 1, 2048), SparseRow(128, 16, 1, 2048),
              SparseRow(128, 128, 1, 2048), SparseRow(64, 128, 2, 16384)]


class SparseCase(NamedTuple):
    """One row's inputs: call i reads the pool through index_sets[i % len(index_sets)]."""
    q: jax.Array  # bfloat16 [b, s_q, h_q, 576]
    pool: jax.Array  # uint8 [num_blocks, PAGE, 1, 656] (FP8) or bfloat16 [..., 576]
    index_sets: tuple[np.ndarray, ...]  # int32 [b, s_q, topk]: page_id * PAGE + offset


def bytes_per_token(fp8: bool) -> int:
    return FP8_BYTES_PER_TOKEN if fp8 else D * 2


def traffic(row: SparseRow) -> tuple[float, float]:
    """(bytes, FLOPs) of one call, by the module docstring's formulas."""
    queries = row.b * row.s_q
    return (queries * row.topk * bytes_per_token(row.fp8) + queries * row.h_q * (D + DV) * 2,
            2.0 * queries * row.h_q * row.topk * (D + DV))


def pool_pages(topk: int, l2_bytes: int) -> int:
    """Pages of the pool: at least 4x l2_bytes in FP8 bytes (the same tokens for a bf16 cache,
    so that both read the same indices), and at least topk tokens, so that a query's indices
    can all differ."""
    tokens = max(topk, math.ceil(4 * l2_bytes / FP8_BYTES_PER_TOKEN))
    return -(-tokens // PAGE)


def distinct_indices(rng, queries: int, topk: int, pool_tokens: int) -> np.ndarray:
    """int32 [queries, topk]: each row topk distinct tokens, uniform over [0, pool_tokens)."""
    return np.stack([rng.choice(pool_tokens, size=topk, replace=False)
                     for _ in range(queries)]).astype(np.int32)


def sparse_case(rng, row: SparseRow, l2_bytes: int) -> SparseCase:
    """The module docstring's inputs for `row`: one index set for l2_bytes = 0. The latents and
    q are drawn on the device (a pool of hundreds of megabytes would take the host seconds)."""
    num_blocks = pool_pages(row.topk, l2_bytes)
    call_bytes = row.b * row.s_q * row.topk * bytes_per_token(row.fp8)
    copies = max(1, math.ceil(4 * l2_bytes / call_bytes))
    index_sets = tuple(
        distinct_indices(rng, row.b * row.s_q, row.topk, num_blocks * PAGE).reshape(
            row.b, row.s_q, row.topk) for _ in range(copies))
    pool_key, q_key = jax.random.split(jax.random.key(int(rng.integers(1 << 30))))
    latents = jax.random.normal(pool_key, (num_blocks, PAGE, 1, D), jnp.bfloat16)
    pool = jax_flash_mla.quantize_fp8_kvcache(latents) if row.fp8 else latents
    q = jax.random.normal(q_key, (row.b, row.s_q, row.h_q, D), jnp.bfloat16)
    return SparseCase(q, pool, index_sets)


def sparse_metadata(row: SparseRow):
    # With topk and no topk_length every query token attends over topk slots: only the shape of
    # cache_seqlens is read (it gives the batch).
    return jax_flash_mla.get_mla_metadata(jnp.zeros((row.b,), jnp.int32), row.s_q * row.h_q, 1,
                                          row.h_q, row.fp8, row.topk)


def sparse_call(impl, q, pool, indices, metadata, scale, fp8):
    """One sparse decode by `impl` (ours, or the reference), with FlashMLA's arguments."""
    return impl(q, pool, None, None, DV, metadata, scale, False, is_fp8_kvcache=fp8,
                indices=indices)


# sparse_call compiled once per implementation, shapes, scale and cache kind, not per row.
single_call = jax.jit(sparse_call, static_argnums=(0, 5, 6))


def make_many_calls(impl, calls, copies, fp8):
    # As benchmark.make_many_calls: one element of every call's output kept, gathered by one
    # fusion at the end, so that no glue kernel runs between the decode calls.
    def many(q, pool, index_sets, metadata):
        kept = []
        for i, scale in enumerate(benchmark.call_scales(calls)):
            out, lse = sparse_call(impl, q, pool, index_sets[i % copies], metadata, scale, fp8)
            kept += [out[0, 0, 0, 0].astype(jnp.float32), lse[0, 0, 0]]
        return jnp.sum(jnp.stack(kept))
    return jax.jit(many)


def check_first_call(case, row, metadata, flashmla_row):
    """Ours on a block's first call (index_sets[0], the first scale), against the plain-JAX
    reference on its first request and, given flashmla_row, against FlashMLA's first call."""
    scale = benchmark.call_scales(1)[0]
    indices = jnp.asarray(case.index_sets[0])
    out, lse = single_call(jax_flash_mla.flash_mla_with_kvcache, case.q, case.pool, indices,
                           metadata, scale, row.fp8)
    ref_out, ref_lse = single_call(reference.flash_mla_with_kvcache, case.q[:1], case.pool,
                                   indices[:1], None, scale, row.fp8)
    checks = dict(zip(("reference_out_diff", "reference_lse_diff", "reference_agrees"),
                      benchmark.differences(out[:1], lse[:1], ref_out, ref_lse,
                                            REFERENCE_OUT_ROUNDINGS, REFERENCE_LSE_ATOL)))
    if flashmla_row is not None:
        checks.update(zip(("flashmla_out_diff", "flashmla_lse_diff", "flashmla_agrees"),
                          benchmark.differences(flashmla_row.out, flashmla_row.lse, out, lse,
                                                benchmark.AGREE_OUT_ROUNDINGS,
                                                benchmark.AGREE_LSE_ATOL)))
    return checks


def measure(rng, row: SparseRow, args, l2_bytes, with_reference, flashmla=None):
    """One row's time per call, ours (and FlashMLA's where it runs the row), with the checks of
    check_first_call; with_reference: the plain-JAX reference timed too."""
    case = sparse_case(rng, row, l2_bytes)
    metadata = sparse_metadata(row)
    copies = len(case.index_sets)
    inputs = (case.q, case.pool, tuple(jnp.asarray(i) for i in case.index_sets), metadata)
    fn = make_many_calls(jax_flash_mla.flash_mla_with_kvcache, args.calls, copies, row.fp8)
    ours = benchmark.time_per_call(fn, inputs, args.calls, args.repeats, args.blocks)
    span = (benchmark.device_time_per_call(fn, inputs, args.calls, args.repeats)
            if benchmark.on_gpu() else None)
    result = dict(kind="sparse_decode", b=row.b, h_q=row.h_q, s_q=row.s_q, topk=row.topk,
                  cache="fp8" if row.fp8 else "bf16", page=PAGE,
                  pool_tokens=case.pool.shape[0] * PAGE, index_sets=copies, us=ours * 1e6,
                  us_span=None if span is None else span * 1e6, flashmla_us=None,
                  flashmla_h_q=None, ratio=None)
    fm = None
    if flashmla is not None and flashmla.runs_sparse(row.h_q, row.topk, row.fp8):
        fm = flashmla.measure_sparse(case, benchmark.call_scales(args.calls), args.blocks,
                                     args.repeats)
        result.update(flashmla_us=fm.seconds_per_call * 1e6,
                      flashmla_h_q=flashmla_baseline.sparse_heads(row.h_q),
                      ratio=fm.seconds_per_call / ours)
    result.update(check_first_call(case, row, metadata, fm))
    ref = None
    if with_reference:
        calls = max(2, args.calls // 5)
        ref_fn = make_many_calls(reference.flash_mla_with_kvcache, calls, copies, row.fp8)
        try:
            ref = benchmark.time_per_call(ref_fn, inputs, calls, 3, 2)
        except Exception as e:  # e.g. out of memory for the gathered, dequantized keys
            print(f"  reference failed: {type(e).__name__}")
    nbytes, flops = traffic(row)
    return dict(result, gbps=nbytes / ours / 1e9, tflops=flops / ours / 1e12,
                ref_us=None if ref is None else ref * 1e6)


def rows_by_section(quick: bool, batch: int | None) -> dict[str, list[SparseRow]]:
    """{section title: rows}: the module docstring's rows (QUICK_ROWS only with quick), of batch
    size `batch` if given; empty sections left out."""
    sections = {
        f"sparse decode, FP8 cache (page {PAGE})": GRID_ROWS,
        "sparse decode, h_q 16 and 32 (FlashMLA: q padded to 64 heads)": FEW_HEADS_ROWS,
        "sparse decode, bf16 cache (ours only: FlashMLA's sparse decode reads FP8)": BF16_ROWS,
    }
    picked = {title: [row for row in rows if (not quick or row in QUICK_ROWS)
                      and (batch is None or row.b == batch)]
              for title, rows in sections.items()}
    return {title: rows for title, rows in picked.items() if rows}


def print_table(title, results, copy_gbps, mm_tflops):
    print(f"\n{title}")
    print(f"{'b':>4} {'h_q':>4} {'s_q':>3} {'topk':>6} {'cache':>5} | "
          f"{'us':>8} {'us_span':>8} {'GB/s':>7} {'TFLOP/s':>7} {'%roof':>5} | "
          f"{'FlashMLA':>8} {'its h_q':>7} {'ratio':>5} | {'jnp ref':>8}")
    for r in results:
        roof = max(r["gbps"] / copy_gbps, r["tflops"] / mm_tflops) * 100
        flags = ""
        if not r.get("flashmla_agrees", True):
            flags += (f"  FlashMLA DISAGREES: max |out diff| {r['flashmla_out_diff']:.2e}, "
                      f"max |lse diff| {r['flashmla_lse_diff']:.2e}")
        if not r["reference_agrees"]:
            flags += (f"  REFERENCE DISAGREES: max |out diff| {r['reference_out_diff']:.2e}, "
                      f"max |lse diff| {r['reference_lse_diff']:.2e}")
        print(f"{r['b']:>4} {r['h_q']:>4} {r['s_q']:>3} {r['topk']:>6} {r['cache']:>5} | "
              f"{r['us']:8.1f} {benchmark._cell(r['us_span'], '.1f', 8)} {r['gbps']:7.0f} "
              f"{r['tflops']:7.1f} {roof:5.0f} | "
              f"{benchmark._cell(r['flashmla_us'], '.1f', 8)} "
              f"{benchmark._cell(r['flashmla_h_q'], 'd', 7)} "
              f"{benchmark._cell(r['ratio'], '.2f', 5)} | "
              f"{benchmark._cell(r['ref_us'], '.1f', 8)}{flags}")


def measure_sections(rng, args, flashmla, copy_gbps, mm_tflops):
    """{section title: measured rows} of `bench --sparse`, each table printed as soon as it is
    measured; the plain-JAX reference timed unless --quick."""
    sections = {}
    for title, rows in rows_by_section(args.quick, args.batch).items():
        sections[title] = [measure(rng, row, args, benchmark.L2_BYTES, not args.quick, flashmla)
                           for row in rows]
        print_table(title, sections[title], copy_gbps, mm_tflops)
    return sections
