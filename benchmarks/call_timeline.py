"""Where one decode call's time goes on the GPU, from the JAX profiler's kernel timestamps.

    python3 benchmarks/call_timeline.py [--kernel NAME] [b,h_q,s_k[,page][,fp8] ...]
                                                                      (GPU; default: ROWS)

Runs the benchmark's jitted function of back-to-back calls (jax_flash_mla/benchmark.py) under
jax.profiler.trace and reads the trace back (device_timing.py): for each row, the wall time per
call of the function issued once and waited on (host cost included), next to what the GPU did
per call: the median duration of each kernel, the busy time (the kernels' durations added), and
the span from the first kernel's start to the last one's end over the calls. span - busy is time
the GPU sat idle between kernels; wall - span is the host's share (dispatch, sync). FlashMLA's
figures are CUDA-graph replays, whose idle time between kernels is about a microsecond a launch.
A row's page size is PAGE (64, the target table's) unless it names another (b,h_q,s_k,page), and
`,fp8` after reads the pool quantized to the FP8 cache (is_fp8_kvcache); the inputs are the
benchmark's (jax_flash_mla/paged_inputs.py rotated_case: permuted pages, the pool copied beyond
L2). --kernel forces one split-KV kernel (jax_flash_mla.testing's route: transposed, lockstep,
seesaw_alone, seesaw_paired), so that two kernels are timed on one machine on the same inputs;
that route fills each call's outputs with NaN first, a fill the span then counts (the busy
time and the kernels' medians do not).

Each row is also checked once against the float32 reference (outputs poisoned with NaN before
the call; tests/comparisons.py's kernel tolerances: out within 4 units of bfloat16 roundoff
times max(1, max|ref|), lse within 1e-4), so that an A/B of an untested kernel change
(run_on_device.sh ab) cannot time a wrong result. Exit status 1 if a check fails.
"""

import collections
import functools
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_flash_mla
from jax_flash_mla import paged_inputs, reference, testing
from jax_flash_mla.benchmark import jax_inputs, make_many_calls
from jax_flash_mla.device_timing import traced_kernel_events

# The tests' kernel tolerances and their reasons, in tests/comparisons.py (not a package).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from comparisons import KERNEL_LSE_ATOL, KERNEL_OUT_ROUNDINGS, unit_roundoff  # noqa: E402
from profile_kernels import parse_row  # noqa: E402 (this script's folder is on sys.path)

ROWS = [(1, 16, 4096), (1, 128, 4096), (64, 16, 4096), (64, 64, 4096), (128, 128, 4096)]
CALLS = 20
PAGE = 64


def short_name(name):
    for key in ("split_kv_seesaw", "split_kv_lockstep", "split_kv_transposed",
                "combine",
                "tile_schedule"):
        if key in name:
            # The seesaw kernel in CTA pairs (cluster, keys multicast): kPaired = true.
            paired = key.endswith("seesaw") and (", true>" in name or "Lb1E" in name)
            return key + (" (paired)" if paired else "")
    return name.split("(")[0][:40]


def profile_row(rng, b, h_q, s_k, page=PAGE, fp8=False, kernel="dispatch"):
    q, pool, tables, lengths = jax_inputs(
        paged_inputs.rotated_case(rng, b, h_q, s_k, 1, False, page, 50 << 20))
    if fp8:
        pool = jax_flash_mla.quantize_fp8_kvcache(pool)
    metadata = jax_flash_mla.get_mla_metadata(lengths, h_q, 1)
    # The checked call: the kernel's outputs poisoned first. A forced kernel is timed through it
    # too (the public API has no route to one), the dispatch through the public API.
    poisoned = functools.partial(testing.flash_mla_with_kvcache_poisoned, is_fp8_kvcache=fp8,
                                 kernel=kernel)
    impl = (functools.partial(jax_flash_mla.flash_mla_with_kvcache, is_fp8_kvcache=fp8)
            if kernel == "dispatch" else poisoned)
    fn = make_many_calls(impl, CALLS, len(tables), False)
    args = (q, pool, tables, lengths, metadata)
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    walls = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        walls.append(time.perf_counter() - start)
    kernels = traced_kernel_events(fn, args, 1)
    durations = collections.defaultdict(list)
    for name, begin, end in kernels:
        durations[short_name(name)].append((end - begin) / 1e3)
    decode = [k for k in kernels if "split_kv" in k[0] or "combine" in k[0]]
    span = (decode[-1][2] - decode[0][1]) / 1e3 / CALLS if decode else float("nan")
    busy = sum((e - s) for _, s, e in decode) / 1e3 / CALLS
    label = (f"b={b} h_q={h_q} s_k={s_k}" + (f" page={page}" if page != PAGE else "")
             + (" fp8" if fp8 else ""))
    print(f"{label}: wall {statistics.median(walls) / CALLS * 1e6:.1f} us a call,"
          f" GPU span {span:.1f}, busy {busy:.1f} (idle between kernels {span - busy:.1f})")
    for name, values in sorted(durations.items(), key=lambda kv: -sum(kv[1])):
        print(f"    {name:40s} x{len(values):3d}  median {statistics.median(values):8.2f} us")
    schedule = jax.jit(jax_flash_mla.get_mla_metadata, static_argnums=(1, 2))
    schedule_us = [(end - begin) / 1e3
                   for name, begin, end in traced_kernel_events(schedule, (lengths, h_q, 1), 5)
                   if "tile_schedule" in name]
    if schedule_us:  # once per decode step, outside the span above
        print(f"    {'tile_schedule (per step, not in span)':40s} x{len(schedule_us):3d}"
              f"  median {statistics.median(schedule_us):8.2f} us")
    sys.stdout.flush()
    return check_row(poisoned, q, pool, tables[0], lengths, metadata, fp8)


def check_row(poisoned, q, pool, table, lengths, metadata, fp8):
    """One call of `poisoned` against the reference; prints the errors and returns whether they
    are in bounds."""
    out, lse = jax.jit(poisoned)(q, pool, table, lengths, metadata=metadata)
    ref_out, ref_lse = jax.jit(functools.partial(reference.flash_mla_with_kvcache,
                                                 is_fp8_kvcache=fp8))(q, pool, table, lengths)
    out, lse = np.asarray(out.astype(jnp.float32)), np.asarray(lse)
    ref_out, ref_lse = np.asarray(ref_out.astype(jnp.float32)), np.asarray(ref_lse)
    atol = (KERNEL_OUT_ROUNDINGS * unit_roundoff(jnp.bfloat16)
            * max(1.0, float(np.abs(ref_out).max())))
    out_err = float(np.abs(out - ref_out).max())  # NaN anywhere makes it NaN
    lse_err = float(np.abs(lse - ref_lse).max())
    ok = out_err <= atol and lse_err <= KERNEL_LSE_ATOL
    print(f"    check: max |out - ref| {out_err:.2e} (bound {atol:.2e}), max |lse - ref| "
          f"{lse_err:.2e} (bound {KERNEL_LSE_ATOL:.0e}): {'ok' if ok else 'FAILED'}")
    sys.stdout.flush()
    return ok


def main(rows, kernel="dispatch"):
    rng = np.random.default_rng(0)
    if kernel != "dispatch":
        print(f"split-KV kernel forced: {kernel}")
    failed = [row for row in rows if not profile_row(rng, *row, kernel=kernel)]
    if failed:
        print("check FAILED for", failed)
    return 1 if failed else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    forced = "dispatch"
    if args[:1] == ["--kernel"]:
        forced, args = args[1], args[2:]
    sys.exit(main([parse_row(arg) for arg in args] or ROWS, forced))
