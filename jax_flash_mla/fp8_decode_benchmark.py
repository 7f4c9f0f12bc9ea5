"""`jax-flash-mla bench --fp8-cache`: dense decode over the FP8 cache (DeepSeek-V3.2's 656-byte
tokens) beside our bf16 path and FlashMLA's (bf16: its Hopper dense decode has no FP8 cache), on
the same rows, the same requests and the same pages, in the same run, by benchmark.py's method.

Each row draws one bf16 pool (paged_inputs.rotated_case, sized so that the FP8 copies alone
exceed 4x the L2) and quantizes it: the three timings read the same tokens through the same
block tables. Before a row is timed, our FP8 call is checked against our bf16 kernel over the
dequantized pool (exact in bf16 for quantize_fp8_kvcache's power-of-two scales, so the two
compute the same attention and must agree within twice the tests' kernel bounds).

Per call, L_i the lengths: FP8 bytes = sum_i L_i * 656 + b * s_q * h_q * (d + dv) * 2; FLOPs as
for bf16. `speedup` is our bf16 time over our FP8 time, `ratio` FlashMLA's bf16 time over our FP8
time (> 1: ours is faster).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

import jax_flash_mla
from jax_flash_mla import benchmark, fp8_cache, paged_inputs

D, DV = benchmark.D, benchmark.DV
BF16_BYTES_PER_TOKEN = 2 * D

# (b, h_q, s_k, s_q, varlen, causal): memory-bound rows (h_q <= 64), where the FP8 cache's
# fewer bytes are the speed, and the h_q = 128 rows, where the math is.
ROWS = [
    (1, 16, 4096, 1, False, False), (1, 128, 4096, 1, False, False),
    (32, 16, 4096, 1, False, False), (64, 16, 4096, 1, False, False),
    (64, 64, 4096, 1, False, False), (128, 16, 4096, 1, False, False),
    (128, 32, 4096, 1, False, False), (128, 64, 4096, 1, False, False),
    (64, 16, 32768, 1, False, False), (64, 16, 8192, 1, True, False),
    (32, 128, 4096, 1, False, False), (64, 128, 4096, 1, False, False),
    (128, 128, 4096, 1, False, False), (128, 128, 16384, 1, False, False),
    (128, 128, 4096, 2, False, True),
]
QUICK_ROWS = [(64, 16, 4096, 1, False, False), (128, 64, 4096, 1, False, False),
              (128, 128, 4096, 1, False, False)]


def fp8_traffic(lengths, b, h_q, s_q):
    """(bytes, FLOPs) of one call over the FP8 cache."""
    total = float(np.sum(lengths))
    return (total * fp8_cache.FP8_BYTES_PER_TOKEN + b * s_q * h_q * (D + DV) * 2,
            2.0 * s_q * h_q * (D + DV) * total)


def check_fp8_against_bf16(q, pool8, table, lengths, metadata, causal):
    """(max |out diff|, max |lse diff|, agrees) of our FP8 call against our bf16 kernel over the
    dequantized pool."""
    decode = jax.jit(jax_flash_mla.flash_mla_with_kvcache,
                     static_argnames=("head_dim_v", "softmax_scale", "causal", "is_fp8_kvcache"))
    scale = benchmark.call_scales(1)[0]
    out8, lse8 = decode(q, pool8, table, lengths, DV, metadata, softmax_scale=scale,
                        causal=causal, is_fp8_kvcache=True)
    out, lse = decode(q, fp8_cache.dequantize_fp8_kvcache(pool8), table, lengths, DV, metadata,
                      softmax_scale=scale, causal=causal)
    return benchmark.differences(out8, lse8, out, lse, benchmark.AGREE_OUT_ROUNDINGS,
                                 benchmark.AGREE_LSE_ATOL)


def measure(rng, row, args, flashmla=None):
    """One row: our bf16 and FP8 times per call, and FlashMLA's bf16 on the same inputs."""
    b, h_q, s_k, s_q, varlen, causal = row
    # Copies enough that the FP8 pools alone exceed 4x the L2 (the bf16 ones then do too).
    l2_bytes = benchmark.L2_BYTES * BF16_BYTES_PER_TOKEN // fp8_cache.FP8_BYTES_PER_TOKEN
    case = paged_inputs.rotated_case(rng, b, h_q, s_k, s_q, varlen, 64, l2_bytes, d=D)
    q, pool, tables, lengths = benchmark.jax_inputs(case)
    pool8 = fp8_cache.quantize_fp8_kvcache(pool)
    metadata = jax_flash_mla.get_mla_metadata(lengths, s_q * h_q, 1)
    out_diff, lse_diff, agrees = check_fp8_against_bf16(q, pool8, tables[0], lengths, metadata,
                                                        causal)
    copies = len(tables)
    timings = {}
    for name, impl, cache in (
            ("bf16", jax_flash_mla.flash_mla_with_kvcache, pool),
            ("fp8", functools.partial(jax_flash_mla.flash_mla_with_kvcache, is_fp8_kvcache=True),
             pool8)):
        fn = benchmark.make_many_calls(impl, args.calls, copies, causal)
        inputs = (q, cache, tables, lengths, metadata)
        timings[name] = benchmark.time_per_call(fn, inputs, args.calls, args.repeats, args.blocks)
        if name == "fp8" and benchmark.on_gpu():
            timings["fp8_span"] = benchmark.device_time_per_call(fn, inputs, args.calls,
                                                                 args.repeats)
    fp8 = timings["fp8"]
    nbytes, flops = fp8_traffic(case.lengths, b, h_q, s_q)
    result = dict(b=b, h_q=h_q, s_k=s_k, s_q=s_q, varlen=varlen, causal=causal, page=64,
                  bf16_us=timings["bf16"] * 1e6, us=fp8 * 1e6,
                  us_span=timings.get("fp8_span", 0.0) * 1e6 or None,
                  speedup=timings["bf16"] / fp8, gbps=nbytes / fp8 / 1e9,
                  tflops=flops / fp8 / 1e12, fp8_out_diff=out_diff, fp8_lse_diff=lse_diff,
                  fp8_agrees=agrees, flashmla_us=None, ratio=None)
    if flashmla is not None and flashmla.runs(64, 1):
        fm = flashmla.measure(case, benchmark.call_scales(args.calls), causal, args.blocks,
                              args.repeats)
        result.update(flashmla_us=fm.seconds_per_call * 1e6, ratio=fm.seconds_per_call / fp8)
    return result


def print_table(title, results, copy_gbps, mm_tflops):
    print(f"\n{title}")
    print(f"{'b':>4} {'h_q':>4} {'s_k':>6} {'s_q':>3} {'var':>3} | {'bf16 us':>8} | "
          f"{'FP8 us':>8} {'us_span':>8} {'GB/s':>7} {'%copy':>5} {'TFLOP/s':>7} {'speedup':>7} | "
          f"{'FlashMLA':>8} {'ratio':>5}")
    for r in results:
        flag = "" if r["fp8_agrees"] else (
            f"  FP8 DISAGREES with bf16 over the dequantized pool: max |out diff| "
            f"{r['fp8_out_diff']:.2e}, max |lse diff| {r['fp8_lse_diff']:.2e}")
        print(f"{r['b']:>4} {r['h_q']:>4} {r['s_k']:>6} {r['s_q']:>3} "
              f"{'v' if r['varlen'] else '':>3} | {r['bf16_us']:8.1f} | {r['us']:8.1f} "
              f"{benchmark._cell(r['us_span'], '.1f', 8)} {r['gbps']:7.0f} "
              f"{r['gbps'] / copy_gbps * 100:5.0f} {r['tflops']:7.1f} {r['speedup']:7.2f} | "
              f"{benchmark._cell(r['flashmla_us'], '.1f', 8)} "
              f"{benchmark._cell(r['ratio'], '.2f', 5)}{flag}")


def measure_sections(rng, args, flashmla, copy_gbps, mm_tflops):
    """{section title: measured rows} of `bench --fp8-cache`, printed as measured."""
    rows = [row for row in (QUICK_ROWS if args.quick else ROWS)
            if args.batch is None or row[0] == args.batch]
    title = "dense decode over the FP8 cache (page 64): ours bf16, ours FP8, FlashMLA bf16"
    results = [measure(rng, row, args, flashmla) for row in rows]
    print_table(title, results, copy_gbps, mm_tflops)
    return {title: results}
