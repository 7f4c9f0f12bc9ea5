"""Before/after A/B of two builds of the package on identical inputs (run_on_device.sh `before`).

    python3 benchmarks/before_after.py LABEL b,h_q,s_k[,s_q,varlen,causal] ...   (GPU)
    python3 benchmarks/before_after.py --summary LOG

The first form times whichever build of jax_flash_mla the process imports (the step puts one
build's folder first on PYTHONPATH and runs this file from outside both trees) and prints, per
row, `ROW <row> <LABEL> span <us>` and each kernel's median duration. It uses only what every
build has: the public API and device_timing.traced_kernel_events. So the inputs do not depend on
either tree's generator: they are made here, from a seed per row, the same bytes for both builds.
Each of the 20 calls of the timed function reads the same pool through its own permutation of
the pages (so XLA cannot merge two calls, and each call reads pages in a new order), and the pool
holds at least 60 MiB, beyond L2. The figure is the GPU span of the 20 calls (first kernel's
start to last kernel's end, from the profiler) over 20, median of 5 runs.

The step runs the two builds in turn, twice (after, before, after, before), so that the GPU's
clock drift over the run falls on both; `--summary` prints both builds' figures per row and the
change, mean of after over mean of before.
"""

import collections
import re
import statistics
import sys

CALLS = 20
RUNS = 5
PAGE = 64
POOL_BYTES = 60 << 20
D, DV = 576, 512


def time_row(b, h_q, s_k, s_q=1, varlen=0, causal=0):
    """(span per call in us of each run, {kernel: [durations in us]})."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jax_flash_mla
    from jax_flash_mla.device_timing import traced_kernel_events

    rng = np.random.default_rng([b, h_q, s_k, s_q, varlen, causal])
    pages_per_request = -(-s_k // PAGE)
    pool_pages = max(b * pages_per_request, -(-POOL_BYTES // (PAGE * D * 2)))
    pool = jnp.asarray(rng.standard_normal((pool_pages, PAGE, 1, D), np.float32), jnp.bfloat16)
    tables = [jnp.asarray(rng.permutation(pool_pages)[:b * pages_per_request]
                          .reshape(b, pages_per_request).astype(np.int32))
              for _ in range(CALLS)]
    lengths = rng.integers(s_k // 8, s_k + 1, b) if varlen else np.full(b, s_k)
    lengths = jnp.asarray(lengths.astype(np.int32))
    q = jnp.asarray(rng.standard_normal((b, s_q, h_q, D), np.float32), jnp.bfloat16)
    metadata = jax_flash_mla.get_mla_metadata(lengths, s_q * h_q, 1)

    def calls(q, pool, lengths, metadata, *tables):
        return [jax_flash_mla.flash_mla_with_kvcache(q, pool, table, lengths, DV, metadata,
                                                     causal=bool(causal))[0]
                for table in tables]

    events = traced_kernel_events(jax.jit(calls), (q, pool, lengths, metadata, *tables), RUNS)
    decode = sorted((e for e in events if "split_kv" in e[0] or "combine" in e[0]),
                    key=lambda e: e[1])
    per_run = len(decode) // RUNS
    spans = [(decode[i + per_run - 1][2] - decode[i][1]) / 1e3 / CALLS
             for i in range(0, per_run * RUNS, per_run)]
    kernels = collections.defaultdict(list)
    for name, begin, end in decode:
        match = re.search(r"(split_kv_\w+|combine\w*)", name)
        paired = ", true>" in name or "Lb1E" in name  # the seesaw (and its combine) in CTA pairs
        kernels[match.group(1) + (" (paired)" if paired else "")].append((end - begin) / 1e3)
    return spans, kernels


def summary(log_path):
    figures = collections.defaultdict(lambda: collections.defaultdict(list))
    for line in open(log_path):
        match = re.match(r"ROW (\S+) (\S+) span ([\d.]+)", line)
        if match:
            figures[match.group(1)][match.group(2)].append(float(match.group(3)))
    print(f"{'b,h_q,s_k,s_q,varlen,causal':30s} {'after (us)':>20s} {'before (us)':>20s}  change")
    worst = 0.0
    for row, by_label in figures.items():
        after, before = by_label["after"], by_label["before"]
        if not after or not before:
            print(f"{row:30s} missing a build's figures")
            continue
        change = statistics.mean(after) / statistics.mean(before) - 1
        worst = max(worst, change)
        print(f"{row:30s} {' '.join(f'{x:9.2f}' for x in after):>20s} "
              f"{' '.join(f'{x:9.2f}' for x in before):>20s}  {change:+.1%}")
    print(f"largest slowdown: {worst:+.1%}")


def main(argv):
    if argv[:1] == ["--summary"]:
        summary(argv[1])
        return 0
    label, rows = argv[0], [tuple(int(x) for x in arg.split(",")) for arg in argv[1:]]
    for row in rows:
        spans, kernels = time_row(*row)
        print(f"ROW {','.join(map(str, row))} {label} span {statistics.median(spans):.2f} "
              f"(runs: {' '.join(f'{x:.1f}' for x in spans)})")
        for name, durations in kernels.items():
            print(f"    {name:36s} x{len(durations):3d} median {statistics.median(durations):8.2f}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
