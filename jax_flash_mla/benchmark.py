"""`jax-flash-mla bench`: the benchmark grid (GPU). DESIGN.md's target rows, small batches, a
page-size sweep and a s_k sweep, through the public JAX API inside jax.jit; with --flashmla,
DeepSeek's FlashMLA on the same rows, the same inputs, in the same run, by the same method
(flashmla_baseline.py). Without a GPU it says so in one line on stderr and exits with status 2.
With --sparse, the sparse decode rows (DeepSeek-V3.2 top-k) instead, by the same method
(sparse_benchmark.py); with --sparse-prefill, the sparse prefill rows
(sparse_prefill_benchmark.py); with --fp8-cache, dense decode over the FP8 cache beside the bf16
paths (fp8_decode_benchmark.py).

Timing (device_timing.py): the timed unit is a block of `calls` back-to-back decode calls,
metadata precomputed: for ours one jitted function (make_many_calls), for FlashMLA one CUDA
graph. Each block is issued `blocks` times without host sync, then waited on; the figure `us`
is the wall time over every call, median of `repeats`, and the ratio is FlashMLA's over ours
(> 1: ours is faster). On a GPU, `us_span` is a second figure of ours: a block's span on the
GPU from the profiler's kernel timestamps, over `calls`. The calls differ in softmax_scale by
1e-6 relative steps so that XLA cannot merge them, and rotate over copies of the page pool
(through the block table, paged_inputs.rotated_case) so that the cache read by consecutive
calls exceeds 4x the L2 and each call reads from HBM.

Formulas (per call, h_kv KV heads, L_i the clamped lengths):
  bytes = sum_i L_i * h_kv * d * 2 + b * s_q * h_q * (d + dv) * 2
  FLOPs = 2 * s_q * h_q * (d + dv) * sum_i L_i
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_flash_mla
from jax_flash_mla import flashmla_baseline, paged_inputs
from jax_flash_mla.device_timing import device_time_per_call, on_gpu, wall_time_per_call
from jax_flash_mla.validation import positive_int

D, DV = 576, 512

# (b, h_q, s_k, s_q, varlen, causal): DESIGN.md's target table.
TARGET_ROWS = [
    (1, 16, 4096, 1, False, False), (1, 32, 4096, 1, False, False),
    (1, 64, 4096, 1, False, False), (1, 128, 4096, 1, False, False),
    (32, 16, 4096, 1, False, False), (32, 32, 4096, 1, False, False),
    (32, 64, 4096, 1, False, False), (32, 128, 4096, 1, False, False),
    (64, 16, 4096, 1, False, False), (64, 32, 4096, 1, False, False),
    (64, 64, 4096, 1, False, False), (64, 128, 4096, 1, False, False),
    (128, 16, 4096, 1, False, False), (128, 32, 4096, 1, False, False),
    (128, 64, 4096, 1, False, False), (128, 128, 4096, 1, False, False),
    (128, 128, 8192, 1, False, False), (128, 128, 16384, 1, False, False),
    (64, 16, 32768, 1, False, False), (132, 128, 8192, 1, False, False),
    (128, 128, 4096, 1, True, False), (64, 16, 8192, 1, True, False),
    (128, 128, 4096, 2, False, True),
]
# Small batches with many heads (b 2-16, h_q 64 and 128, s_k 2048 and 16384, page 64): too few
# row blocks to fill the GPU at s_k = 2048, so the split-KV schedule and the combine decide them.
SMALL_BATCH_ROWS = [(b, h_q, s_k, 1, False, False)
                    for b in (2, 4, 8, 16) for h_q in (64, 128) for s_k in (2048, 16384)]
PAGE_SWEEP = [16, 32, 64, 128, 256]  # at b=64, h_q=16, s_k=4096 and 16384
# Pages 16 and 32 against page 64 on the other kernels too (b=64, s_k=4096): h_q = 64 and 128
# run the 64-row kernels, h_q = 16 above the transposed one.
PAGE_SWEEP_HEADS = [64, 128]
PAGE_SWEEP_HEADS_PAGES = [16, 32, 64]
SK_SWEEP = [512, 1024, 2048, 4096, 8192, 16384, 32768]  # at b=64, h_q=16
# FlashMLA against ours on one call of the same inputs: each within the tests' kernel bounds of
# the exact result (tests/comparisons.py: 4 bf16 roundings of out, 1e-4 of lse), so within twice
# those of each other.
AGREE_OUT_ROUNDINGS, AGREE_LSE_ATOL = 8, 2e-4
L2_BYTES = 60 << 20  # no less than the L2 of a Hopper GPU (50 MB on the H100)


def page_sweep_rows():
    """(row, page) of the page-size sweep: every page of PAGE_SWEEP at b=64 h_q=16 (s_k 4096
    and 16384), then pages 16, 32 and 64 at b=64 s_k=4096 for each of PAGE_SWEEP_HEADS."""
    return ([((64, 16, s_k, 1, False, False), page)
             for s_k in (4096, 16384) for page in PAGE_SWEEP] +
            [((64, h_q, 4096, 1, False, False), page)
             for h_q in PAGE_SWEEP_HEADS for page in PAGE_SWEEP_HEADS_PAGES])


def traffic(lengths, b, h_q, s_q, h_kv=1):
    total = float(np.sum(lengths))
    return (total * h_kv * D * 2 + b * s_q * h_q * (D + DV) * 2,
            2.0 * s_q * h_q * (D + DV) * total)


def time_per_call(fn, args, calls, repeats, blocks):
    """Seconds per call of fn(*args), a jitted block of `calls` calls: wall time of `blocks`
    blocks issued without host sync, median of `repeats` (device_timing.wall_time_per_call)."""
    return wall_time_per_call(lambda: fn(*args), jax.block_until_ready, calls, blocks, repeats)


def call_scales(calls):
    """Call i's softmax scale: 1e-6 relative steps apart, so that XLA cannot merge the calls."""
    return [D ** -0.5 * (1.0 + 1e-6 * i) for i in range(calls)]


def jax_inputs(case):
    """(q, pool, tables, lengths) of a paged_inputs.RotatedCase as JAX arrays. The tables stay
    separate arrays, not one stacked array: slicing it inside the jitted function would add a
    copy kernel before every call."""
    return (case.q, case.pool, tuple(jnp.asarray(t) for t in case.tables),
            jnp.asarray(case.lengths))


def make_many_calls(impl, calls, copies, causal):
    # One element of every call's output is kept, gathered by a single fusion at the end, so
    # that no per-call glue kernel runs between the decode calls.
    def many(q, pool, tables, lengths, metadata):
        kept = []
        for i, scale in enumerate(call_scales(calls)):
            out, lse = impl(q, pool, tables[i % copies], lengths, DV, metadata,
                            softmax_scale=scale, causal=causal)
            kept += [out[0, 0, 0, 0].astype(jnp.float32), lse[0, 0, 0]]
        return jnp.sum(jnp.stack(kept))
    return jax.jit(many)


def differences(out, lse, ref_out, ref_lse, out_roundings, lse_atol):
    """(max |out - ref_out|, max |lse - ref_lse|, whether both are within out_roundings bf16
    roundings of max(1, max |ref_out|) and lse_atol); NaN anywhere fails. What every bench
    checks a row's first call with: against FlashMLA's (the AGREE_* bounds), the plain-JAX
    reference or another of our paths."""
    out, ref_out = (np.asarray(jnp.asarray(x).astype(jnp.float32)) for x in (out, ref_out))
    out_diff = float(np.abs(out - ref_out).max())
    lse_diff = float(np.abs(np.asarray(lse) - np.asarray(ref_lse)).max())
    bound = out_roundings * 2.0 ** -8 * max(1.0, float(np.abs(ref_out).max()))
    return out_diff, lse_diff, bool(out_diff <= bound and lse_diff <= lse_atol)


def measure(rng, row, page, args, l2_bytes, with_reference, head_shards=1, flashmla=None):
    """One row's time per call; with head_shards > 1, q (and out, lse) split on heads over that
    many devices (tensor parallel), the cache replicated, the schedule sized for one shard; with
    `flashmla` (flashmla_baseline.FlashMLA), FlashMLA on the same inputs where it runs."""
    b, h_q, s_k, s_q, varlen, causal = row
    case = paged_inputs.rotated_case(rng, b, h_q, s_k, s_q, varlen, page, l2_bytes, d=D)
    q, pool, tables, lengths = jax_inputs(case)
    metadata = jax_flash_mla.get_mla_metadata(lengths, s_q * h_q // head_shards, 1)
    if head_shards > 1:
        mesh = Mesh(np.array(jax.devices()[:head_shards]), ("tp",))
        q = jax.device_put(q, NamedSharding(mesh, P(None, None, "tp", None)))
        pool, tables, lengths, metadata = jax.device_put((pool, tables, lengths, metadata),
                                                         NamedSharding(mesh, P()))
    copies = len(tables)
    inputs = (q, pool, tables, lengths, metadata)
    fn = make_many_calls(jax_flash_mla.flash_mla_with_kvcache, args.calls, copies, causal)
    ours = time_per_call(fn, inputs, args.calls, args.repeats, args.blocks)
    span = device_time_per_call(fn, inputs, args.calls, args.repeats) if on_gpu() else None
    result = dict(b=b, h_q=h_q, s_k=s_k, s_q=s_q, varlen=varlen, causal=causal, page=page,
                  devices=head_shards, us=ours * 1e6, us_span=None if span is None else span * 1e6,
                  flashmla_us=None, ratio=None)
    if flashmla is not None and flashmla.runs(page, head_shards):
        fm = flashmla.measure(case, call_scales(args.calls), causal, args.blocks, args.repeats)
        first = jax.jit(jax_flash_mla.flash_mla_with_kvcache,
                        static_argnames=("head_dim_v", "softmax_scale", "causal"))
        out, lse = first(q, pool, tables[0], lengths, DV, metadata,
                         softmax_scale=call_scales(1)[0], causal=causal)
        out_diff, lse_diff, agrees = differences(fm.out, fm.lse, out, lse, AGREE_OUT_ROUNDINGS,
                                                 AGREE_LSE_ATOL)
        result.update(flashmla_us=fm.seconds_per_call * 1e6,
                      ratio=fm.seconds_per_call / ours, flashmla_out_diff=out_diff,
                      flashmla_lse_diff=lse_diff, flashmla_agrees=agrees)
    ref = None
    if with_reference:
        calls = max(2, args.calls // 5)
        ref_fn = make_many_calls(jax_flash_mla.reference.flash_mla_with_kvcache, calls, copies,
                                 causal)
        try:
            ref = time_per_call(ref_fn, inputs, calls, 3, 2)
        except Exception as e:  # e.g. out of memory for the dense gather
            print(f"  reference failed: {type(e).__name__}")
    nbytes, flops = traffic(case.lengths, b, h_q, s_q)
    return dict(result, gbps=nbytes / ours / 1e9, tflops=flops / ours / 1e12,
                ref_us=None if ref is None else ref * 1e6)


def measure_ceilings(blocks):
    """Copy bandwidth (read + write) and bf16 matmul rate of this device, measured now."""
    x = jax.random.normal(jax.random.key(0), (1 << 30,), jnp.float32)  # 4 GiB
    copy = jax.jit(lambda x: x * 2)
    t = time_per_call(copy, (x,), 1, 20, blocks)
    a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
    mm = jax.jit(lambda a: a @ a)
    tm = time_per_call(mm, (a,), 1, 20, blocks)
    del x
    return 2 * 4 * (1 << 30) / t / 1e9, 2 * 8192**3 / tm / 1e12


def _cell(value, fmt, width):
    return f"{'-':>{width}}" if value is None else f"{value:{width}{fmt}}"


def print_table(title, results, copy_gbps, mm_tflops):
    print(f"\n{title}")
    print(f"{'b':>4} {'h_q':>4} {'s_k':>6} {'s_q':>3} {'var':>3} {'page':>4} {'dev':>3} | "
          f"{'us':>8} {'us_span':>8} {'GB/s':>7} {'TFLOP/s':>7} {'%roof':>5} | "
          f"{'FlashMLA':>8} {'ratio':>5} | {'jnp ref':>8}")
    for r in results:
        devices = r.get("devices", 1)  # GB/s and TFLOP/s are of the whole call; the roof is per device
        roof = max(r["gbps"] / copy_gbps, r["tflops"] / mm_tflops) / devices * 100
        flag = "" if r.get("flashmla_agrees", True) else (
            f"  FlashMLA DISAGREES: max |out diff| {r['flashmla_out_diff']:.2e}, "
            f"max |lse diff| {r['flashmla_lse_diff']:.2e}")
        print(f"{r['b']:>4} {r['h_q']:>4} {r['s_k']:>6} {r['s_q']:>3} {'v' if r['varlen'] else '':>3} "
              f"{r['page']:>4} {devices:>3} | {r['us']:8.1f} {_cell(r.get('us_span'), '.1f', 8)} "
              f"{r['gbps']:7.0f} {r['tflops']:7.1f} {roof:5.0f} | "
              f"{_cell(r.get('flashmla_us'), '.1f', 8)} {_cell(r.get('ratio'), '.2f', 5)} | "
              f"{_cell(r.get('ref_us'), '.1f', 8)}{flag}")


def plot(results, copy_gbps, mm_tflops, path):
    """The roofline with ours and FlashMLA's points, saved to `path`; returns the figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 5))
    intensity = [r["tflops"] * 1e12 / (r["gbps"] * 1e9) for r in results]
    xs = np.logspace(0, 3, 200)
    ax.loglog(xs, np.minimum(xs * copy_gbps / 1e3, mm_tflops), "k-", label="roofline (measured)")
    ax.loglog(intensity, [r["tflops"] for r in results], "o", label="jax-flash-mla")
    # FlashMLA's points: the same FLOPs and bytes (same intensity) in its own time.
    timed = [(x, r["tflops"] * r["us"] / r["flashmla_us"])
             for x, r in zip(intensity, results) if r.get("flashmla_us")]
    if timed:
        ax.loglog(*zip(*timed), "x", label="FlashMLA (same run)")
    ax.set_xlabel("FLOP per byte")
    ax.set_ylabel("TFLOP/s")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def add_arguments(parser) -> None:
    parser.add_argument("--out", default=".", help="folder for bench.json and roofline.png")
    parser.add_argument("--calls", type=positive_int, default=20,
                        help="back-to-back calls in a block")
    parser.add_argument("--blocks", type=positive_int, default=10,
                        help="blocks issued without host sync per timing")
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--quick", action="store_true", help="target rows only, no reference")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help="only the target and small-batch rows of this batch size (with "
                             "--quick, the target rows; with "
                             "--sparse, only the sparse rows of this batch size; not used by "
                             "--sparse-prefill)")
    parser.add_argument("--tp", action="store_true",
                        help="also the h_q = 128 rows with heads split over every local device, "
                             "next to one device running one shard's heads")
    parser.add_argument("--flashmla", action="store_true",
                        help="also time DeepSeek's FlashMLA (import flash_mla; torch) on the same "
                             "inputs by the same method, on the page-64 one-device rows (with "
                             "--sparse, the FP8 rows, q padded to 64 heads where it has fewer; "
                             "with --sparse-prefill, every row); sets "
                             "XLA_PYTHON_CLIENT_PREALLOCATE=false unless set")
    sparse = parser.add_mutually_exclusive_group()
    sparse.add_argument("--sparse", action="store_true",
                        help="the sparse decode rows (DeepSeek-V3.2 top-k, FP8 and bf16 cache; "
                             "sparse_benchmark.py) instead of the dense ones; with --quick, the "
                             "rows of DESIGN.md's FlashMLA sparse table and no reference")
    sparse.add_argument("--sparse-prefill", action="store_true",
                        help="the sparse prefill rows (DeepSeek-V3.2 flash_mla_sparse_fwd, s_q "
                             "4096, topk 2048, bf16 kv; sparse_prefill_benchmark.py) instead of "
                             "the dense ones; with --quick, two of them")
    sparse.add_argument("--fp8-cache", action="store_true",
                        help="dense decode over the FP8 cache beside our bf16 and FlashMLA's "
                             "(fp8_decode_benchmark.py) instead of the bf16 rows; with --quick, "
                             "three rows")


def load_flashmla():
    """The FlashMLA baseline for --flashmla, or None with the reason printed on stderr. Run
    before JAX starts its GPU client: JAX must not preallocate the memory torch needs."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        flashmla = flashmla_baseline.load()
    except flashmla_baseline.FlashMLAUnavailable as e:
        print(f"jax-flash-mla bench: {e}", file=sys.stderr)
        return None
    if not on_gpu():
        print("jax-flash-mla bench: --flashmla needs a GPU visible to JAX (FlashMLA's kernels "
              "are sm_90a)", file=sys.stderr)
        return None
    return flashmla


def jobs_for(args, devices):
    """{section title: [(row, page, with the plain-JAX reference, devices the heads are split
    over)]}."""
    def of_batch(grid):
        return [row for row in grid if args.batch is None or row[0] == args.batch]
    rows = of_batch(TARGET_ROWS)
    jobs = {"target rows (page 64)": [(row, 64, not args.quick, 1) for row in rows]}
    if not args.quick:
        # FlashMLA beside each (page 64), the reference left out: these rows are about time.
        small = of_batch(SMALL_BATCH_ROWS)
        if small:
            jobs["small batches (page 64)"] = [(row, 64, False, 1) for row in small]
        jobs["page-size sweep"] = [(row, page, False, 1) for row, page in page_sweep_rows()]
        jobs["s_k sweep (b=64, h_q=16)"] = [((64, 16, s_k, 1, False, False), 64, False, 1)
                                            for s_k in SK_SWEEP]
    if args.tp and devices > 1:
        shard_rows = [row for row in rows if row[1] == 128 and row[3] == 1 and row[0] >= 32]
        jobs[f"tensor parallel: h_q 128 over {devices} devices, then one device with "
             f"{128 // devices} heads"] = (
            [(row, 64, False, devices) for row in shard_rows] +
            [((row[0], 128 // devices) + row[2:], 64, False, 1) for row in shard_rows])
    return jobs


def method(args):
    return (f"blocks of {args.calls} back-to-back calls (ours: one jitted function; FlashMLA: "
            f"one CUDA graph), each timing {args.blocks} blocks issued without host sync; us = "
            f"wall time / calls, median of {args.repeats}; ratio = FlashMLA us / ours us; "
            f"us_span (GPU): our block's span from the profiler's kernel timestamps / calls")


def run(args) -> int:
    flashmla = load_flashmla() if args.flashmla else None
    if args.flashmla and flashmla is None:
        return 2
    if not on_gpu():
        # On a CPU the ceilings (a 4 GiB copy, an 8192^3 matmul) and the rows take many minutes
        # with nothing printed: one line instead of a silence that looks like a hang.
        print(f"jax-flash-mla bench: needs a GPU visible to JAX (this one sees "
              f"{jax.devices()[0].platform}); `jax-flash-mla check` times one decode on any "
              f"device", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    device = jax.devices()[0]
    copy_gbps, mm_tflops = measure_ceilings(args.blocks)
    print(f"device: {device.device_kind}; measured copy {copy_gbps:.0f} GB/s, "
          f"bf16 matmul {mm_tflops:.0f} TFLOP/s; FlashMLA: "
          f"{'same inputs, same run' if flashmla else 'not timed (--flashmla)'}\n{method(args)}")
    rng = np.random.default_rng(0)
    if args.sparse or args.sparse_prefill or args.fp8_cache:
        # Imported here: they build on this module's constants and timing helpers.
        from jax_flash_mla import (fp8_decode_benchmark, sparse_benchmark,
                                   sparse_prefill_benchmark)
        other_rows = (sparse_benchmark if args.sparse else
                      sparse_prefill_benchmark if args.sparse_prefill else fp8_decode_benchmark)
        sections = other_rows.measure_sections(rng, args, flashmla, copy_gbps, mm_tflops)
    else:
        sections = {}
        for title, section_jobs in jobs_for(args, len(jax.devices())).items():
            # Each table printed as soon as it is measured.
            sections[title] = [measure(rng, row, page, args, L2_BYTES, with_reference, shards,
                                       flashmla)
                               for row, page, with_reference, shards in section_jobs]
            print_table(title, sections[title], copy_gbps, mm_tflops)
    all_rows = [dict(r, section=t) for t, rs in sections.items() for r in rs]
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(dict(device=device.device_kind, copy_gbps=copy_gbps, matmul_tflops=mm_tflops,
                       method=method(args), flashmla=flashmla is not None, rows=all_rows),
                  f, indent=1)
    plot(all_rows, copy_gbps, mm_tflops, os.path.join(args.out, "roofline.png"))
    disagreeing = [r for r in all_rows if not r.get("flashmla_agrees", True)]
    if disagreeing:
        print(f"FlashMLA and ours disagree on {len(disagreeing)} rows (see above): their "
              f"timings do not compare the same computation", file=sys.stderr)
    wrong = [r for r in all_rows if not r.get("reference_agrees", True)]  # sparse rows only
    if wrong:
        print(f"ours disagrees with the plain-JAX reference on {len(wrong)} rows (see above): "
              f"their timings are of a wrong result", file=sys.stderr)
    wrong_fp8 = [r for r in all_rows if not r.get("fp8_agrees", True)]  # --fp8-cache rows
    if wrong_fp8:
        print(f"our FP8 decode disagrees with our bf16 decode over the dequantized pool on "
              f"{len(wrong_fp8)} rows (see above): their timings are of a wrong result",
              file=sys.stderr)
        wrong += wrong_fp8
    return 1 if disagreeing or wrong else 0
