"""The CUDA kernels against the reference computed on the GPU: the CPU grid, then an all-pairs
covering set of FlashMLA's own test grid (see decode_grid.py)."""

import jax
import pytest

from decode_grid import CPU_GRID, FLASHMLA_GRID, check_case

pytestmark = pytest.mark.gpu


def gpu():
    return jax.devices("gpu")[0]


@pytest.mark.parametrize("case", CPU_GRID, ids=str)
def test_gpu_decode_cpu_grid(case, rng):
    check_case(case, rng, gpu())


@pytest.mark.parametrize("case", FLASHMLA_GRID, ids=str)
def test_gpu_decode_flashmla_grid(case, rng):
    check_case(case, rng, gpu())
