"""Per-call time of a block of back-to-back calls, by the two methods the benchmark reports.

- wall_time_per_call, the headline and the one FlashMLA is timed by too: the block is issued
  `blocks` times with no host sync in between, then waited on once; the wall time over every
  call, median of repeats. A block issued once would charge each call a share of its fixed host
  cost (argument handling, launch, sync: about 15 us a call at b = 1 with 20 calls, where a
  call takes 14-19 us on the GPU); issued back-to-back, the host runs ahead of the GPU (while it
  issues a block faster than the GPU runs one) and the GPU's time, idle gaps between kernels
  included, is what is left.
- device_time_per_call (ours, GPU only): the function runs `repeats` times inside one JAX
  profiler trace, and each run's span on the GPU (first kernel's start to last kernel's end,
  from the kernel timestamps the profiler records) is divided by the calls it makes; the median
  over runs. Host time never enters it, the GPU's idle time between kernels does.
"""

from __future__ import annotations

import glob
import statistics
import tempfile
import time

import jax


def on_gpu() -> bool:
    """Whether JAX's default device is a GPU: only there do the kernels' profiler spans exist."""
    return jax.devices()[0].platform == "gpu"


def kernel_events(data) -> list[tuple[str, float, float]]:
    """(name, start_ns, end_ns) of every kernel the first GPU ran in a jax.profiler.ProfileData,
    by start time."""
    events = []
    for plane in data.planes:
        if plane.name != "/device:GPU:0":
            continue
        for line in plane.lines:
            # Kernels sit on the per-stream lines; "XLA Ops" / "XLA Modules" lines repeat them
            # as annotations.
            if not line.name.startswith("Stream"):
                continue
            events.extend((e.name, e.start_ns, e.start_ns + e.duration_ns) for e in line.events)
    return sorted(events, key=lambda e: e[1])


def gpu_kernel_events(trace_dir: str) -> list[tuple[str, float, float]]:
    """kernel_events of the trace jax.profiler wrote under trace_dir ([] if none)."""
    files = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
    return kernel_events(jax.profiler.ProfileData.from_file(files[-1])) if files else []


def spans_per_call(events, runs: int, calls: int) -> list[float]:
    """Seconds per call of each of `runs` runs of one compiled function, whose kernels `events`
    are: every run launches the same kernels, so the sequence splits into equal runs."""
    if not events or len(events) % runs:
        raise RuntimeError(f"the trace holds {len(events)} GPU kernels for {runs} runs")
    per_run = len(events) // runs
    return [(events[(i + 1) * per_run - 1][2] - events[i * per_run][1]) * 1e-9 / calls
            for i in range(runs)]


def traced_kernel_events(fn, args, runs: int) -> list[tuple[str, float, float]]:
    """kernel_events of `runs` runs of fn(*args) inside one profiler trace (host and Python
    tracing off), after a warm-up of two runs."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    options.host_tracer_level = 0
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, profiler_options=options)
        try:
            for _ in range(runs):
                jax.block_until_ready(fn(*args))
        finally:
            jax.profiler.stop_trace()
        return gpu_kernel_events(trace_dir)


def device_time_per_call(fn, args, calls: int, repeats: int) -> float:
    """Seconds per call on the GPU: median over `repeats` traced runs of a run's kernel span
    over `calls`."""
    return statistics.median(spans_per_call(traced_kernel_events(fn, args, repeats), repeats, calls))


def wall_time_per_call(issue_block, wait, calls: int, blocks: int, repeats: int) -> float:
    """Seconds per call: issue_block() (a block of `calls` calls, not waited on) `blocks`
    times back-to-back, then wait(results of the blocks); the wall time over blocks * calls,
    median of `repeats` after two warm-up blocks."""
    wait([issue_block()])
    wait([issue_block()])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        wait([issue_block() for _ in range(blocks)])
        times.append(time.perf_counter() - start)
    return statistics.median(times) / (blocks * calls)
