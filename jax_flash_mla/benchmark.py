"""`jax-flash-mla bench`: the benchmark grid (GPU). DESIGN.md's target rows, a page-size sweep and a s_k sweep, through the
public JAX API inside jax.jit.

Timing: each measurement jits one function that makes `calls` back-to-back decode calls
(metadata precomputed, as in FlashMLA's figures). On a GPU the figure is device time: the
function's span on the GPU from the profiler's kernel timestamps, over `calls`, median of
`repeats` runs (device_timing.py); no host time is in it. Elsewhere (CPU) it is the wall time of
the whole function over `calls`, median of `repeats` runs after warm-up. The calls differ in softmax_scale by 1e-6 relative steps so that XLA cannot merge
them, and rotate over copies of the page pool (through the block table) so that the cache read
by consecutive calls exceeds 4x the L2 and each call reads from HBM.

Formulas (per call, h_kv KV heads, L_i the clamped lengths):
  bytes = sum_i L_i * h_kv * d * 2 + b * s_q * h_q * (d + dv) * 2
  FLOPs = 2 * s_q * h_q * (d + dv) * sum_i L_i
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import numpy as np
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_flash_mla
from jax_flash_mla.device_timing import device_time_per_call

D, DV = 576, 512
HERE = os.path.dirname(os.path.abspath(__file__))

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
TIMING = {True: "GPU span of a run (profiler kernel timestamps) / calls",
          False: "wall time of a run / calls"}
PAGE_SWEEP = [16, 32, 64, 128, 256]  # at b=64, h_q=16, s_k=4096 and 16384
# Page 16 against page 64 on the other kernels too (b=64, s_k=4096): h_q = 64 runs the 64-row
# kernel, h_q = 128 the paired seesaw; h_q = 16 above runs the narrow one.
PAGE_SWEEP_HEADS = [64, 128]
SK_SWEEP = [512, 1024, 2048, 4096, 8192, 16384, 32768]  # at b=64, h_q=16


def page_sweep_rows():
    """(row, page) of the page-size sweep: every page of PAGE_SWEEP at b=64 h_q=16 (s_k 4096
    and 16384), then page 16 and 64 at b=64 s_k=4096 for each of PAGE_SWEEP_HEADS."""
    return ([((64, 16, s_k, 1, False, False), page)
             for s_k in (4096, 16384) for page in PAGE_SWEEP] +
            [((64, h_q, 4096, 1, False, False), page)
             for h_q in PAGE_SWEEP_HEADS for page in (16, 64)])


def lengths_for(rng, b, s_k, varlen):
    if not varlen:
        return np.full(b, s_k, np.int32)
    return np.clip(rng.normal(s_k, s_k / 2, size=b), 1, 2 * s_k).astype(np.int32)


def traffic(lengths, b, h_q, s_q, h_kv=1):
    total = float(np.sum(lengths))
    return (total * h_kv * D * 2 + b * s_q * h_q * (D + DV) * 2,
            2.0 * s_q * h_q * (D + DV) * total)


def time_per_call(fn, args, calls, repeats):
    """Seconds per call: GPU span from the profiler on a GPU, wall time elsewhere."""
    if jax.devices()[0].platform == "gpu":
        return device_time_per_call(fn, args, calls, repeats)
    return time_function(fn, args, repeats) / calls


def time_function(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile + warm-up
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_case(rng, b, h_q, s_k, s_q, varlen, page, l2_bytes):
    lengths = lengths_for(rng, b, s_k, varlen)
    max_blocks = -(-int(lengths.max()) // page)
    blocks_per_copy = b * max_blocks
    copy_bytes = blocks_per_copy * page * D * 2
    copies = max(1, math.ceil(4 * l2_bytes / copy_bytes))
    pool = jax.random.normal(jax.random.key(int(rng.integers(1 << 30))),
                             (copies * blocks_per_copy, page, 1, D), jnp.bfloat16)
    # Separate arrays, not one stacked array: slicing it inside the jitted function would add a
    # copy kernel before every call.
    tables = tuple(jnp.asarray((rng.permutation(blocks_per_copy).reshape(b, max_blocks)
                                + c * blocks_per_copy).astype(np.int32)) for c in range(copies))
    q = jax.random.normal(jax.random.key(1), (b, s_q, h_q, D), jnp.bfloat16)
    return q, pool, tables, jnp.asarray(lengths), copies


def make_many_calls(impl, calls, copies, causal):
    # One element of every call's output is kept, gathered by a single fusion at the end, so
    # that no per-call glue kernel runs between the decode calls.
    def many(q, pool, tables, lengths, metadata):
        kept = []
        for i in range(calls):
            scale = D ** -0.5 * (1.0 + 1e-6 * i)
            out, lse = impl(q, pool, tables[i % copies], lengths, DV, metadata,
                            softmax_scale=scale, causal=causal)
            kept += [out[0, 0, 0, 0].astype(jnp.float32), lse[0, 0, 0]]
        return jnp.sum(jnp.stack(kept))
    return jax.jit(many)


def measure(rng, row, page, args, l2_bytes, with_reference, head_shards=1):
    """One row's time per call; with head_shards > 1, q (and out, lse) split on heads over that
    many devices (tensor parallel), the cache replicated, the schedule sized for one shard."""
    b, h_q, s_k, s_q, varlen, causal = row
    q, pool, tables, lengths, copies = build_case(rng, b, h_q, s_k, s_q, varlen, page, l2_bytes)
    metadata = jax_flash_mla.get_mla_metadata(lengths, s_q * h_q // head_shards, 1)
    if head_shards > 1:
        mesh = Mesh(np.array(jax.devices()[:head_shards]), ("tp",))
        q = jax.device_put(q, NamedSharding(mesh, P(None, None, "tp", None)))
        pool, tables, lengths, metadata = jax.device_put((pool, tables, lengths, metadata),
                                                         NamedSharding(mesh, P()))
    fn = make_many_calls(jax_flash_mla.flash_mla_with_kvcache, args.calls, copies, causal)
    ours = time_per_call(fn, (q, pool, tables, lengths, metadata), args.calls, args.repeats)
    ref = None
    if with_reference:
        calls = max(2, args.calls // 5)
        ref_fn = make_many_calls(jax_flash_mla.reference.flash_mla_with_kvcache, calls, copies,
                                 causal)
        try:
            ref = time_per_call(ref_fn, (q, pool, tables, lengths, metadata), calls, 3)
        except Exception as e:  # e.g. out of memory for the dense gather
            print(f"  reference failed: {type(e).__name__}")
    nbytes, flops = traffic(np.asarray(lengths), b, h_q, s_q)
    return dict(b=b, h_q=h_q, s_k=s_k, s_q=s_q, varlen=varlen, causal=causal, page=page,
                devices=head_shards, us=ours * 1e6, gbps=nbytes / ours / 1e9, tflops=flops / ours / 1e12,
                ref_us=None if ref is None else ref * 1e6)


def measure_ceilings():
    """Copy bandwidth (read + write) and bf16 matmul rate of this GPU, measured now."""
    x = jax.random.normal(jax.random.key(0), (1 << 30,), jnp.float32)  # 4 GiB
    copy = jax.jit(lambda x: x * 2)
    t = time_per_call(copy, (x,), 1, 20)
    a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
    mm = jax.jit(lambda a: a @ a)
    tm = time_per_call(mm, (a,), 1, 20)
    del x
    return 2 * 4 * (1 << 30) / t / 1e9, 2 * 8192**3 / tm / 1e12


def load_anchors(gpu_name):
    kind = "h200" if "H200" in gpu_name else "h100"
    rows = {}
    with open(os.path.join(HERE, "anchors", f"flashmla_dense_bf16_{kind}.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            rows[(r["b"], r["h_q"], r["s_k"], r["s_q"], r["varlen"], r["causal"])] = r["ms"] * 1e3
    return kind, rows


def print_table(title, results, copy_gbps, mm_tflops, anchors):
    print(f"\n{title}")
    print(f"{'b':>4} {'h_q':>4} {'s_k':>6} {'s_q':>3} {'var':>3} {'page':>4} {'dev':>3} | {'us':>8} "
          f"{'GB/s':>7} {'TFLOP/s':>7} {'%roof':>5} | {'FlashMLA':>8} {'ratio':>5} | {'jnp ref':>8}")
    for r in results:
        key = (r["b"], r["h_q"], r["s_k"], r["s_q"], r["varlen"], r["causal"])
        devices = r.get("devices", 1)  # GB/s and TFLOP/s are of the whole call; the roof is per device
        roof = max(r["gbps"] / copy_gbps, r["tflops"] / mm_tflops) / devices * 100
        fm = anchors.get(key) if r["page"] == 64 else None
        fm_s = f"{fm:8.1f} {fm / r['us']:5.2f}" if fm else f"{'-':>8} {'-':>5}"
        ref_s = f"{r['ref_us']:8.1f}" if r.get("ref_us") else f"{'-':>8}"
        print(f"{r['b']:>4} {r['h_q']:>4} {r['s_k']:>6} {r['s_q']:>3} {'v' if r['varlen'] else '':>3} "
              f"{r['page']:>4} {devices:>3} | {r['us']:8.1f} {r['gbps']:7.0f} {r['tflops']:7.1f} {roof:5.0f} | "
              f"{fm_s} | {ref_s}")


def plot(results, copy_gbps, mm_tflops, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 5))
    intensity = [r["tflops"] * 1e12 / (r["gbps"] * 1e9) for r in results]
    achieved = [r["tflops"] for r in results]
    xs = np.logspace(0, 3, 200)
    ax.loglog(xs, np.minimum(xs * copy_gbps / 1e3, mm_tflops), "k-", label="roofline (measured)")
    ax.loglog(intensity, achieved, "o", label="jax-flash-mla")
    ax.set_xlabel("FLOP per byte")
    ax.set_ylabel("TFLOP/s")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def add_arguments(parser) -> None:
    parser.add_argument("--out", default=".", help="folder for bench.json and roofline.png")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="target rows only, no reference")
    parser.add_argument("--batch", type=int, default=None,
                        help="only the target rows of this batch size (with --quick)")
    parser.add_argument("--tp", action="store_true",
                        help="also the h_q = 128 rows with heads split over every local device, "
                             "next to one device running one shard's heads")


def run(args) -> int:
    os.makedirs(args.out, exist_ok=True)
    device = jax.devices()[0]
    l2_bytes = 60 << 20
    copy_gbps, mm_tflops = measure_ceilings()
    kind, anchors = load_anchors(device.device_kind)
    print(f"device: {device.device_kind}; measured copy {copy_gbps:.0f} GB/s, "
          f"bf16 matmul {mm_tflops:.0f} TFLOP/s; FlashMLA figures: {kind}")
    rng = np.random.default_rng(0)
    rows = [row for row in TARGET_ROWS if args.batch is None or row[0] == args.batch]
    # Per section: (row, page, with the plain-JAX reference, devices the heads are split over).
    jobs = {"target rows (page 64)": [(row, 64, not args.quick, 1) for row in rows]}
    if not args.quick:
        jobs["page-size sweep"] = [(row, page, False, 1) for row, page in page_sweep_rows()]
        jobs["s_k sweep (b=64, h_q=16)"] = [((64, 16, s_k, 1, False, False), 64, False, 1)
                                            for s_k in SK_SWEEP]
    devices = len(jax.devices())
    if args.tp and devices > 1:
        shard_rows = [row for row in rows if row[1] == 128 and row[3] == 1 and row[0] >= 32]
        jobs[f"tensor parallel: h_q 128 over {devices} devices, then one device with "
             f"{128 // devices} heads"] = (
            [(row, 64, False, devices) for row in shard_rows] +
            [((row[0], 128 // devices) + row[2:], 64, False, 1) for row in shard_rows])
    sections = {}
    for title, section_jobs in jobs.items():  # each table printed as soon as it is measured
        sections[title] = [measure(rng, row, page, args, l2_bytes, with_reference, shards)
                           for row, page, with_reference, shards in section_jobs]
        print_table(title, sections[title], copy_gbps, mm_tflops, anchors)
    all_rows = [dict(r, section=t) for t, rs in sections.items() for r in rs]
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(dict(device=device.device_kind, copy_gbps=copy_gbps, matmul_tflops=mm_tflops,
                       method=(f"{args.calls} calls per jitted function, median of {args.repeats}"
                               f" runs; {TIMING[device.platform == 'gpu']}"),
                       rows=all_rows), f, indent=1)
    plot(all_rows, copy_gbps, mm_tflops, os.path.join(args.out, "roofline.png"))
    return 0
