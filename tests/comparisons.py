"""Comparing an attention result (out, lse) with a more precise one, and why the tolerances are
what they are.

Tolerances are in units of u, the unit roundoff of the output dtype (2^-8 for bfloat16,
2^-11 for float16), scaled by max(1, max|ref_out|): out is a convex combination of V rows,
so its error is bounded relative to the V values, and the floor of 1 covers the flat softmax
case where out averages to small numbers while its rounding errors do not shrink as much.

- The reference (float32 math, out rounded once to the dtype) vs the float64 NumPy oracle:
  one rounding of out (u) plus float32 noise: REFERENCE_OUT_ROUNDINGS = 2.
- A kernel vs the reference: the kernel rounds P = exp(S - max) to the dtype before the P @ V
  matmul (<= u relative per weight, in the numerator and in the normalizer when it is summed
  from the rounded P), then rounds out (u); the reference rounds its own out (u):
  KERNEL_OUT_ROUNDINGS = 4.
- lse is float32 in both and is computed from the exact dtype inputs with float32
  accumulation, so it is not affected by the rounding of P: errors are a few float32 ulps of
  the scores (|lse| < 30 here, ulp <= 2e-6) plus exp2 approximations on the GPU and the split
  combine; measured <= 1e-5 on the CPU. The kernel bound 1e-4 leaves room for those and still
  sees a key of weight >= 1e-4 dropped or counted twice, which the out bound cannot. The
  reference is held to 3e-5 (measured <= 7e-6 against float64, with scores up to ~30).
"""

import jax.numpy as jnp
import numpy as np

REFERENCE_OUT_ROUNDINGS = 2
REFERENCE_LSE_ATOL = 3e-5
KERNEL_OUT_ROUNDINGS = 4
KERNEL_LSE_ATOL = 1e-4


def unit_roundoff(dtype):
    return 2.0 ** -(jnp.finfo(dtype).nmant + 1)


def assert_attention_close(out, lse, ref_out, ref_lse, *, dtype, out_roundings, lse_atol):
    """out [b, s_q, h_q, dv] in `dtype`, lse float32 [b, h_q, s_q]; ref_* in any float dtype.

    Beyond closeness: nothing may be NaN, and a row that sees no key (ref_lse == +inf) must
    have lse == +inf and out == 0 exactly, while every other row must have a finite lse.
    """
    assert out.dtype == dtype and lse.dtype == np.float32, (out.dtype, lse.dtype)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    out, lse = np.asarray(out, np.float64), np.asarray(lse, np.float64)
    ref_out, ref_lse = np.asarray(ref_out, np.float64), np.asarray(ref_lse, np.float64)
    assert not np.isnan(ref_out).any() and not np.isnan(ref_lse).any(), "NaN in the reference"
    assert not np.isnan(out).any(), f"NaN in out at {np.argwhere(np.isnan(out))[:5].tolist()}"
    assert not np.isnan(lse).any(), f"NaN in lse at {np.argwhere(np.isnan(lse))[:5].tolist()}"

    sees_no_key = np.isposinf(ref_lse)  # [b, h_q, s_q]
    np.testing.assert_array_equal(np.isposinf(lse), sees_no_key, "lse == +inf rows differ")
    empty_out = out[sees_no_key.transpose(0, 2, 1)]
    assert (empty_out == 0).all(), "out is not 0 on a row that sees no key"

    atol = out_roundings * unit_roundoff(dtype) * max(1.0, np.abs(ref_out).max(initial=0))
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=atol, err_msg="out")
    np.testing.assert_allclose(lse[~sees_no_key], ref_lse[~sees_no_key], rtol=0, atol=lse_atol,
                               err_msg="lse")
