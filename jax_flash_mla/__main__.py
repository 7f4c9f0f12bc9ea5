"""`python -m jax_flash_mla [check|demo|bench]`. check: one jitted paged MLA decode on random data,
on whatever JAX has.

Reports the agreement with the pure-jnp reference and the time per call: on a GPU the call's
span on the device (first kernel's start to last kernel's end, from the profiler's kernel
timestamps, as `bench` reports it), so that host dispatch and sync, several times the kernels'
time at these sizes, do not pass for the kernel's speed; elsewhere the host's wall time per
call, dispatch and sync included, and said so.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import jax
import jax.numpy as jnp

import jax_flash_mla
from jax_flash_mla import paged_inputs
from jax_flash_mla.device_timing import device_time_per_call, on_gpu
from jax_flash_mla.validation import non_negative_int, positive_int


def time_per_call(decode, args, iters: int) -> tuple[float, str]:
    """(seconds per call of decode(*args), how they were measured), median of `iters`."""
    if on_gpu():
        try:
            seconds = device_time_per_call(decode, args, calls=1, repeats=iters)
            return seconds, (f"on the GPU: the span of the call's kernels in the profiler's "
                             f"trace (median of {iters} calls)")
        except RuntimeError as e:  # a trace without the GPU's kernels
            print(f"no profiler span ({e}); timing on the host instead", file=sys.stderr)
    jax.block_until_ready(decode(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(decode(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), (f"host wall time, dispatch and sync included (median of "
                                      f"{iters} calls)")


def run_check(args) -> int:
    rng = np.random.default_rng(args.seed)
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float16
    # A DeepSeek-shaped decode step (h_kv = 1, d = 576) in the tests' hostile layout: lengths
    # around --seqlen, NaN in every slot no request may read, garbage ids past each request.
    seqlens = paged_inputs.random_seqlens(rng, args.batch, args.seqlen, varlen=True)
    q, k_cache, block_table, seqlens = (jnp.asarray(x) for x in paged_inputs.make_paged_inputs(
        rng, seqlens, s_q=1, h_q=args.heads, h_kv=1, d=576, page=args.page_size, dtype=dtype))

    @jax.jit
    def decode(q, k_cache, block_table, seqlens):
        metadata = jax_flash_mla.get_mla_metadata(seqlens, q.shape[1] * q.shape[2], 1)
        return jax_flash_mla.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512,
                                                    metadata)

    reference = jax.jit(jax_flash_mla.reference.flash_mla_with_kvcache)
    out, lse = jax.block_until_ready(decode(q, k_cache, block_table, seqlens))
    ref_out, ref_lse = reference(q, k_cache, block_table, seqlens)
    out_err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref_out.astype(jnp.float32))))
    lse_err = float(jnp.max(jnp.abs(lse - ref_lse)))

    seconds, timed_how = time_per_call(decode, (q, k_cache, block_table, seqlens), args.iters)

    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), CUDA handlers built: "
          f"{jax_flash_mla.BUILT_WITH_CUDA}")
    print(f"shape: batch={args.batch} lengths {int(seqlens.min())}-{int(seqlens.max())} "
          f"(around --seqlen {args.seqlen}) heads={args.heads} d=576 dv=512 "
          f"page={args.page_size} {args.dtype}")
    print(f"max |out - reference| = {out_err:.3e}, max |lse - reference| = {lse_err:.3e}")
    print(f"time per call: {seconds * 1e6:.1f} us {timed_how}")
    ok = np.isfinite(out_err) and out_err <= 2e-2 and lse_err <= 1e-3
    print("agreement with the reference:", "OK" if ok else "FAILED")
    return 0 if ok else 1


def add_check_arguments(parser) -> None:
    parser.add_argument("--batch", type=positive_int, default=4)
    parser.add_argument("--seqlen", type=positive_int, default=1024)
    parser.add_argument("--heads", type=positive_int, default=16)
    parser.add_argument("--page-size", type=positive_int, default=64)
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--iters", type=positive_int, default=20)
    parser.add_argument("--seed", type=non_negative_int, default=0)


def main(argv=None) -> int:
    """`demo` (a DeepSeek-style decode loop) or `check` (one decode against the reference);
    with no command, `check`, so that options alone keep working."""
    parser = argparse.ArgumentParser(
        prog="jax-flash-mla", description="Paged MLA decode for JAX: a model demo, the "
        "benchmark grid, and a check of one decode against the reference.")
    commands = parser.add_subparsers(dest="command")
    from . import benchmark, demo
    demo.add_arguments(commands.add_parser(
        "demo", help="a DeepSeek-style model decoding a ragged batch (tokens/s, latency)"))
    benchmark.add_arguments(commands.add_parser("bench", help="the benchmark grid (GPU)"))
    add_check_arguments(commands.add_parser("check", help="one decode vs the reference, timed"))
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("demo", "bench", "check", "-h", "--help"):
        argv = ["check"] + argv
    args = parser.parse_args(argv)
    runners = {"demo": demo.run, "bench": benchmark.run, "check": run_check}
    return runners[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
