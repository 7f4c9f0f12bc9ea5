"""A few decode calls for Nsight Compute: per-kernel device durations, no host time at all.

    ncu --clock-control none --metrics gpu__time_duration.sum \\
        -k regex:"split_kv|combine|tile_schedule" python3 benchmarks/profile_kernels.py

Complements jax_flash_mla/benchmark.py (which times many calls inside one jitted function): this shows
how a call's time divides between the schedule, split-KV and combine kernels.
Rows may be given as arguments, `b,h_q,s_k` or `b,h_q,s_k,page` each, with `,fp8` after for the
FP8 cache (the pool quantized, is_fp8_kvcache) (default: ROWS, page 64, bf16). With `--calls N`, each row
runs the benchmark's jitted function of N back-to-back calls instead of one call, so that a
timeline (nsys) or a list of every kernel (ncu without -k) shows what one call costs in there.
"""

import functools
import sys

import jax
import numpy as np

import jax_flash_mla
from jax_flash_mla import paged_inputs
from jax_flash_mla.benchmark import jax_inputs, make_many_calls

ROWS = [(1, 16, 4096), (1, 128, 4096), (64, 16, 4096), (64, 128, 4096), (128, 128, 4096)]
PAGE, DV = 64, 512


def parse_row(arg):
    """`b,h_q,s_k[,page][,fp8]` -> (b, h_q, s_k, page, fp8)."""
    parts = arg.split(",")
    fp8 = parts[-1] == "fp8"
    numbers = [int(x) for x in parts[:-1 if fp8 else None]]
    return (*numbers[:3], numbers[3] if len(numbers) > 3 else PAGE, fp8)


def main(rows, calls):
    rng = np.random.default_rng(0)
    for b, h_q, s_k, page, fp8 in rows:
        # The benchmark's inputs with one copy of the pool (no L2 budget): one table.
        q, pool, (table,), seqlens = jax_inputs(
            paged_inputs.rotated_case(rng, b, h_q, s_k, 1, False, page, l2_bytes=0))
        if fp8:
            pool = jax_flash_mla.quantize_fp8_kvcache(pool)
        impl = functools.partial(jax_flash_mla.flash_mla_with_kvcache, is_fp8_kvcache=fp8)
        metadata = jax_flash_mla.get_mla_metadata(seqlens, h_q, 1)
        if calls:
            many = make_many_calls(impl, calls, 1, False)
            for _ in range(3):
                jax.block_until_ready(many(q, pool, (table,), seqlens, metadata))
        else:
            decode = jax.jit(impl, static_argnums=(4,))
            for _ in range(2):
                jax.block_until_ready(decode(q, pool, table, seqlens, DV, metadata))
        print(f"profiled b={b} h_q={h_q} s_k={s_k} page={page} fp8={fp8} num_sm_parts="
              f"{metadata.tile_scheduler_metadata.shape[0]}", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    calls = int(args[args.index("--calls") + 1]) if "--calls" in args else 0
    rows = [a for i, a in enumerate(args) if a != "--calls" and (i == 0 or args[i - 1] != "--calls")]
    main([parse_row(arg) for arg in rows] or [(*row, PAGE, False) for row in ROWS], calls)
