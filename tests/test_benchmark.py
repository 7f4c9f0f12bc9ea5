"""The benchmark's machinery on a tiny row (CPU): it runs, times both implementations and
counts bytes and FLOPs by the documented formulas. Timings are reported, never asserted."""

import argparse

import jax
import numpy as np
import pytest

from jax_flash_mla import benchmark


def test_traffic_formulas():
    lengths = np.array([4096, 4096])
    nbytes, flops = benchmark.traffic(lengths, b=2, h_q=16, s_q=1)
    assert nbytes == 2 * (4096 * 576 * 2 + 16 * (576 + 512) * 2)
    assert flops == 2 * 2 * 16 * 4096 * (576 + 512)


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
