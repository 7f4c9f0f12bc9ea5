"""The suite's processes share one GPU: none of them preallocates most of its memory.

By default JAX reserves 75% of the GPU when its client starts, so a second pytest-xdist worker
on the same GPU fails every case with RESOURCE_EXHAUSTED; conftest.py turns preallocation off
before JAX starts, in every worker, unless the caller chose otherwise.
"""

import os

import jax
import pytest


@pytest.mark.gpu
def test_the_allocator_reserves_on_demand():
    if os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").lower() not in ("false", "0"):
        pytest.skip("the caller set XLA_PYTHON_CLIENT_PREALLOCATE to preallocate")
    stats = jax.devices()[0].memory_stats()
    assert stats is not None, "the GPU client reports no memory statistics"
    reserved = stats.get("pool_bytes", stats.get("bytes_reserved"))
    assert reserved is not None, f"no reserved-bytes figure among {sorted(stats)}"
    # Preallocated, the pool is the whole limit from the first array on; on demand it holds
    # what this worker's tests have needed so far, a small part of the GPU.
    assert reserved < 0.5 * stats["bytes_limit"], stats
