"""The CPU handler (the path CI exercises) against the reference, over an all-pairs covering
set of the decode axes plus the corner cases (see decode_grid.py)."""

import jax
import pytest

from decode_grid import CPU_GRID, FP8_CPU_GRID, Case, check_case, poisoned_decode


@pytest.mark.parametrize("case", CPU_GRID, ids=str)
def test_cpu_decode_matches_reference(case, rng):
    check_case(case, rng, jax.devices("cpu")[0])


@pytest.mark.parametrize("case", FP8_CPU_GRID, ids=str)
def test_cpu_fp8_decode_matches_reference(case, rng):
    """Dense decode over the FP8 cache, against the reference over the dequantized cache (the
    kernels' dequantization is exact for quantize_fp8_kvcache's power-of-two scales, so the
    bf16 tolerances hold)."""
    check_case(case, rng, jax.devices("cpu")[0])


def test_poisoned_outputs_reach_the_kernel(rng):
    """The NaN-filled out and lse must be the kernel's own output buffers (aliased), or an
    element it forgets to write would not show."""
    inputs = Case(b=2, s_k=100).make_inputs(rng)
    hlo = poisoned_decode.lower(*inputs, num_sm_parts=3, softmax_scale=None,
                                causal=False).compile().as_text()
    (decode,) = [line for line in hlo.splitlines()
                 if 'custom_call_target="jax_flash_mla_decode"' in line]
    assert "output_to_operand_aliasing={{0}: (6, {}), {1}: (7, {})}" in decode
