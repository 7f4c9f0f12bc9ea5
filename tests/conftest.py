"""Shared fixtures: a per-test random generator, and skipping `gpu` tests without a GPU.

Set before JAX starts, in every process that runs tests (each pytest-xdist worker imports this
file before any test module):
- eight host (CPU) devices for the sharding tests; every other test runs on the default device;
- GPU memory allocated on demand: by default each process's JAX preallocates 75% of the GPU, so
  a second worker on the same GPU would fail every case with RESOURCE_EXHAUSTED. A value the
  caller set is kept;
- XLA's GPU autotuning off (unless the caller names a level): every case has its own shapes, so
  each reference matmul would be autotuned once, on the host's clock, for minutes in all; the
  algorithm cuBLAS picks moves the float32 references by rounding only, far under every
  tolerance.
"""

import os
import zlib

_xla_flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
if "--xla_gpu_autotune_level" not in _xla_flags:
    _xla_flags += " --xla_gpu_autotune_level=0"
os.environ["XLA_FLAGS"] = _xla_flags.strip()
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def has_gpu():
    return jax.default_backend() == "gpu" or any(
        d.platform in ("gpu", "cuda") for d in jax.devices())


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU visible to JAX (skipped otherwise)")


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="no GPU visible to JAX")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    """Seeded by the test id: every case gets its own fresh data, and a failure reproduces."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
