"""The benchmark's machinery on a tiny row (CPU): it runs, times both implementations and
counts bytes and FLOPs by the documented formulas. Timings are reported, never asserted."""

import argparse

import jax
import numpy as np
import pytest

from jax_flash_mla import benchmark, device_timing


def test_traffic_formulas():
    lengths = np.array([4096, 4096])
    nbytes, flops = benchmark.traffic(lengths, b=2, h_q=16, s_q=1)
    assert nbytes == 2 * (4096 * 576 * 2 + 16 * (576 + 512) * 2)
    assert flops == 2 * 2 * 16 * 4096 * (576 + 512)


def test_page_sweep_compares_page_16_with_64_on_every_kernel():
    """The issue's bar (page 16 within 10% of page 64 at s_k >= 4096) is checked on each
    kernel family: h_q = 16 (narrow), 64 (64-row), 128 (paired seesaw), all at b=64."""
    rows = benchmark.page_sweep_rows()
    assert len(rows) == len(set(rows))
    for h_q in (16, 64, 128):
        for page in (16, 64):
            assert ((64, h_q, 4096, 1, False, False), page) in rows
    assert {page for (row, page) in rows if row[1] == 16} == set(benchmark.PAGE_SWEEP)


def test_one_row_runs_with_the_reference(rng):
    args = argparse.Namespace(calls=2, repeats=1)
    row = benchmark.measure(rng, (2, 16, 64, 1, False, False), 16, args, l2_bytes=1 << 20,
                            with_reference=True)
    assert row["us"] > 0 and row["ref_us"] > 0 and row["gbps"] > 0 and row["tflops"] > 0


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (the 8 host devices of CI)")
def test_one_row_split_on_heads_over_devices(rng):
    """The tensor-parallel row (bench --tp): q split on heads over 8 host devices, the
    schedule sized for one shard; it runs and reports the device count."""
    args = argparse.Namespace(calls=2, repeats=1)
    row = benchmark.measure(rng, (2, 16, 64, 1, False, False), 16, args, l2_bytes=1 << 20,
                            with_reference=False, head_shards=8)
    assert row["devices"] == 8 and row["us"] > 0


def _trace(stream_events, other_line_events=()):
    """A profiler trace of the first GPU: kernels (name, start_ns, duration_ns) on one stream
    line, annotations on an "XLA Ops" line, and a host plane."""
    names = sorted({e[0] for e in list(stream_events) + list(other_line_events)})
    ids = {n: i + 1 for i, n in enumerate(names)}
    def line(line_id, name, events):
        body = "".join(f"events {{ metadata_id: {ids[n]} offset_ps: {int(t * 1000)} "
                       f"duration_ps: {int(d * 1000)} }}\n" for n, t, d in events)
        return f'lines {{ id: {line_id} name: "{name}" timestamp_ns: 0\n{body}}}\n'
    metadata = "".join(f'event_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}\n'
                       for n, i in ids.items())
    text = (f'planes {{ id: 1 name: "/device:GPU:0"\n'
            f'{line(1, "Stream #14(compute)", stream_events)}'
            f'{line(2, "XLA Ops", other_line_events)}{metadata}}}\n'
            'planes { id: 2 name: "/host:CPU" }\n')
    return jax.profiler.ProfileData.from_text_proto(text)


def test_device_time_reads_kernels_of_the_first_gpu_only():
    data = _trace([("combine", 9000, 1000), ("split_kv", 1000, 5000)],
                  other_line_events=[("split_kv", 1000, 5000)])
    assert device_timing.kernel_events(data) == [("split_kv", 1000, 6000), ("combine", 9000, 10000)]


def test_device_time_is_each_runs_span_over_its_calls():
    # Two runs of 2 calls (split + combine each), the second run 1 us slower, host gaps between.
    run = [("split", 0, 4000), ("combine", 4500, 1000), ("split", 6000, 4000),
           ("combine", 10500, 1000)]
    events = [(n, t, t + d) for n, t, d in run] + [(n, t + 50000, t + d + 51000) for n, t, d in run]
    spans = device_timing.spans_per_call(events, runs=2, calls=2)
    assert spans == pytest.approx([5.75e-6, 6.25e-6])
    with pytest.raises(RuntimeError, match="7 GPU kernels for 2 runs"):
        device_timing.spans_per_call(events[:7], runs=2, calls=2)
