"""The sparse (DeepSeek-V3.2, top-k) decode of the kernels against the pure-jnp reference (itself
checked against float64 NumPy in test_sparse_reference.py), on that file's inputs: FP8 and bf16
pools whose every token that no counted slot selects is NaN (all bytes 0xFF in an FP8 pool:
e4m3 codes, scales and RoPE columns), so a kernel that reads an invalid index, a slot past
topk_length or an unused page returns NaN and fails. The kernel's outputs start as NaN
(testing.sparse_decode_poisoned), so an element it does not write fails too.

Also: FlashMLA's corner cases (no counted slot, infinite sinks, NaN in a counted token), the
split schedule and its combine at long topk, metadata computed inside and outside jax.jit and
reused, softmax_scale, and the argument checks of the decode and of get_mla_metadata.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import comparisons
import jax_flash_mla
from jax_flash_mla import reference, testing

from test_errors import call_traced
from test_sparse_reference import (BAD_INPUTS, BYTES, DV, INT32_MAX, INT32_MIN, VALID,
                                   SparseCase, make_inputs, zeros)

# The kernel (CPU) and the reference both compute in float32 from the same dequantized keys and
# round out to bf16 once; only their float32 summation orders differ. Two float32 values within
# delta of each other round to bf16 values at most one bf16 ulp apart plus delta, and one ulp of
# a bf16 value r is at most 2^-7 |r| (8 significant bits): hence rtol 2^-7. delta matters only
# where out is near 0 (a cancelling average of V rows): out is a convex combination of V
# values (|v| < 6 here), and a dozen float32 roundings of such sums (2^-24 relative each) stay
# under 2^-18 (measured: 2e-7). A dropped or doubled key of weight w moves out by about
# w |v - out|, 1e-3 and more at topk <= 1000, far outside this bound.
OUT_RTOL = 2.0 ** -7
OUT_ATOL = 2.0 ** -18
# lse is float32 in both, from the same keys: the scores' float32 dot products (576 terms)
# and the combine's log-sum-exp of the splits err by a few float32 ulps of |lse| (2e-6 at
# |lse| < 32). Measured: <= 1e-6 at the default scale (|lse| < 8), 4e-6 where softmax_scale
# 0.3 makes |lse| ~ 23. 1e-5 still sees any key of weight >= 1e-5 dropped or counted twice,
# which the out bound may not.
LSE_ATOL = 1e-5


@dataclasses.dataclass(frozen=True)
class KernelCase(SparseCase):
    num_sm_parts: int | None = None  # None: no metadata argument (the wrapper computes one)


def assert_matches(out, lse, ref_out, ref_lse):
    """out bf16 [b, s_q, h_q, 512], lse float32 [b, h_q, s_q] against a reference (or another
    schedule's result). Nothing may be NaN; a query that sees no key (ref_lse +inf) must have
    lse +inf and out exactly 0; every other element within the tolerances above."""
    assert out.dtype == jnp.bfloat16 and lse.dtype == np.float32, (out.dtype, lse.dtype)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    out, lse = np.asarray(out, np.float64), np.asarray(lse, np.float64)
    ref_out, ref_lse = np.asarray(ref_out, np.float64), np.asarray(ref_lse, np.float64)
    assert not np.isnan(ref_out).any() and not np.isnan(ref_lse).any(), "NaN in the reference"
    assert not np.isnan(out).any(), f"NaN in out at {np.argwhere(np.isnan(out))[:5].tolist()}"
    assert not np.isnan(lse).any(), f"NaN in lse at {np.argwhere(np.isnan(lse))[:5].tolist()}"
    sees_no_key = np.isposinf(ref_lse)
    np.testing.assert_array_equal(np.isposinf(lse), sees_no_key, "lse == +inf rows differ")
    assert (out[sees_no_key.transpose(0, 2, 1)] == 0).all(), "out not 0 where no key is seen"
    np.testing.assert_allclose(out, ref_out, rtol=OUT_RTOL, atol=OUT_ATOL, err_msg="out")
    np.testing.assert_allclose(lse[~sees_no_key], ref_lse[~sees_no_key], rtol=0, atol=LSE_ATOL,
                               err_msg="lse")


def sparse_metadata(q, indices, topk_length, is_fp8_kvcache, num_sm_parts):
    batch, seqlen_q, num_heads_q, _ = q.shape
    # With topk only the batch of cache_seqlens is read: 7 tokens a request would schedule a
    # single tile, and the keys past it would be missed if the lengths were read.
    seqlens = jnp.full((batch,), 7, jnp.int32) if topk_length is None else None
    return jax_flash_mla.get_mla_metadata(seqlens, seqlen_q * num_heads_q, 1, num_heads_q,
                                          is_fp8_kvcache, indices.shape[2],
                                          topk_length=topk_length, num_sm_parts=num_sm_parts)


@functools.partial(jax.jit, static_argnames=("fp8", "num_sm_parts", "softmax_scale"))
def poisoned_decode(q, k_cache, indices, topk_length, attn_sink, *, fp8, num_sm_parts=None,
                    softmax_scale=None):
    """The kernel with NaN-filled outputs; num_sm_parts None leaves the metadata to it."""
    metadata = None
    if num_sm_parts is not None:
        metadata = sparse_metadata(q, indices, topk_length, fp8, num_sm_parts)
    return testing.sparse_decode_poisoned(q, k_cache, indices, metadata=metadata,
                                          softmax_scale=softmax_scale, is_fp8_kvcache=fp8,
                                          topk_length=topk_length, attn_sink=attn_sink)


@functools.partial(jax.jit, static_argnames=("fp8", "softmax_scale"))
def reference_decode(q, k_cache, indices, topk_length, attn_sink, *, fp8, softmax_scale=None):
    """One jit for all tests: calls of the same shapes (a test's layers) compile once."""
    return reference.flash_mla_with_kvcache(q, k_cache, head_dim_v=DV,
                                            softmax_scale=softmax_scale, is_fp8_kvcache=fp8,
                                            indices=indices, topk_length=topk_length,
                                            attn_sink=attn_sink)


def run_reference(case, q, k_cache, indices, topk_length, attn_sink):
    return reference_decode(q, k_cache, indices, topk_length, attn_sink, fp8=case.fp8,
                            softmax_scale=case.softmax_scale)


def check_case(case, rng, device=None):
    """The poisoned kernel on `device` (the CPU if None) against the reference, on
    fresh inputs of `case`. The GPU kernels round P to bf16 before P V, as dense decode's do:
    there the tests' kernel bounds hold (tests/comparisons.py), with the reference on the CPU
    (its float32 matmuls exact, not TF32)."""
    inputs, _ = make_inputs(case, rng)
    if device is None:  # the C++ CPU path, whatever the default device
        inputs = jax.device_put(inputs, jax.devices("cpu")[0])
        out, lse = poisoned_decode(*inputs, fp8=case.fp8, num_sm_parts=case.num_sm_parts,
                                   softmax_scale=case.softmax_scale)
        assert_matches(out, lse, *run_reference(case, *inputs))
        return
    out, lse = poisoned_decode(*jax.device_put(inputs, device), fp8=case.fp8,
                               num_sm_parts=case.num_sm_parts, softmax_scale=case.softmax_scale)
    ref_out, ref_lse = run_reference(case, *jax.device_put(inputs, jax.devices("cpu")[0]))
    comparisons.assert_attention_close(
        out, lse, ref_out, ref_lse, dtype=jnp.bfloat16,
        out_roundings=comparisons.KERNEL_OUT_ROUNDINGS, lse_atol=comparisons.KERNEL_LSE_ATOL)


# Every value of each axis at least once, and the pairs that matter together: h_q {1, 3, 16,
# 64, 128}, s_q {1, 2, 4}, topk {1, 7, 64, 100, 300, 600, 1000}, page {1, 16, 64}, FP8 (uint8
# and float8_e4m3fn) and bf16 pools, topk_length absent or with entries 0, inside, == topk,
# past topk (up to INT32_MAX) and negative (down to INT32_MIN), sinks absent, finite or
# +-inf, and schedules of 1 piece (no split), a few and many (requests split, partials
# combined). A topk past the pool's live tokens (the pages before unused_blocks) repeats
# tokens: duplicates count twice.
GRID = [
    KernelCase(),
    KernelCase(b=1, h_q=1, page=1, num_blocks=20, topk=1, invalid=0.0),
    KernelCase(b=3, s_q=2, h_q=3, page=16, num_blocks=6, topk=7, fp8=False,
               topk_length=(7, 0, 3), sink="random"),
    KernelCase(s_q=4, h_q=64, page=16, num_blocks=10, topk=100, topk_length=(150, -4),
               sink="infinite", num_sm_parts=3),
    KernelCase(s_q=2, h_q=128, page=64, num_blocks=4, topk=300, sink="random", num_sm_parts=64),
    KernelCase(h_q=128, page=1, num_blocks=400, topk=300, fp8=False, topk_length=(299, 1),
               num_sm_parts=1),
    KernelCase(b=4, h_q=16, page=1, num_blocks=150, topk=100, fp8=False, sink="infinite",
               invalid=0.5),
    KernelCase(s_q=4, h_q=1, page=64, num_blocks=3, topk=64, float8_view=True,
               topk_length=(0, 64), num_sm_parts=16),
    KernelCase(b=1, s_q=2, h_q=3, page=16, num_blocks=30, topk=300, topk_length=(INT32_MAX,),
               sink="random", num_sm_parts=7),
    KernelCase(h_q=64, page=1, num_blocks=80, topk=7, softmax_scale=0.3),
    KernelCase(s_q=2, h_q=16, page=64, num_blocks=20, topk=1000, topk_length=(1000, 513),
               num_sm_parts=2),
    KernelCase(s_q=2, h_q=16, page=64, num_blocks=20, topk=1000, fp8=False, sink="random",
               num_sm_parts=132),
    KernelCase(b=3, s_q=1, h_q=16, page=16, num_blocks=40, topk=600, fp8=False,
               topk_length=(INT32_MIN, 600, 333), sink="random", num_sm_parts=132),
    KernelCase(b=1, s_q=4, h_q=128, page=16, num_blocks=12, topk=100, float8_view=True,
               invalid=0.5, softmax_scale=0.05, num_sm_parts=5),
]


@pytest.mark.parametrize("case", GRID, ids=str)
def test_sparse_decode_matches_reference(case, rng):
    check_case(case, rng)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GRID, ids=str)
def test_gpu_sparse_decode_matches_reference(case, rng):
    check_case(case, rng, jax.devices("gpu")[0])


# --- the split schedule and its combine ----------------------------------------------------------

LONG = KernelCase(b=2, s_q=2, h_q=16, page=64, num_blocks=12, unused_blocks=2, topk=700,
                  topk_length=(700, 450), sink="random")


@pytest.mark.parametrize("num_sm_parts", [1, 3, 64])
def test_one_metadata_serves_several_calls(num_sm_parts, rng):
    """Long topk: one piece walks every query token whole, more pieces split each token's 700
    (or 450) slots and the combine merges the partials. The metadata is computed once, outside
    jit, and serves three calls (layers: other queries and sinks, the same indices)."""
    (q, k_cache, indices, topk_length, _), _ = make_inputs(LONG, rng)
    metadata = sparse_metadata(q, indices, topk_length, True, num_sm_parts)
    splits = np.diff(np.asarray(metadata.num_splits))  # per query token
    assert splits.max() == 1 if num_sm_parts == 1 else splits.max() > 1, splits

    decode = jax.jit(lambda q, sink, metadata: testing.sparse_decode_poisoned(
        q, k_cache, indices, metadata=metadata, is_fp8_kvcache=True, topk_length=topk_length,
        attn_sink=sink))
    for _ in range(3):
        q = jnp.asarray(rng.standard_normal(q.shape), jnp.bfloat16)
        sink = jnp.asarray(rng.standard_normal(LONG.h_q) * 3, jnp.float32)
        out, lse = decode(q, sink, metadata)
        assert_matches(out, lse, *run_reference(LONG, q, k_cache, indices, topk_length, sink))


def test_a_token_selected_in_every_slot_counts_in_every_split(rng):
    """Three tokens fill 900 slots, spread over many splits: each counts as often as it is
    named, whichever split holds it."""
    case = KernelCase(b=1, s_q=2, h_q=16, page=16, num_blocks=4, topk=900, invalid=0.0,
                      num_sm_parts=32)
    (q, k_cache, indices, _, _), _ = make_inputs(case, rng)
    repeated = np.resize(indices[0, 0, :3], indices.shape).astype(np.int32)  # selected tokens
    out, lse = poisoned_decode(q, k_cache, repeated, None, None, fp8=True, num_sm_parts=32)
    assert_matches(out, lse, *run_reference(case, q, k_cache, repeated, None, None))


# --- FlashMLA's corner cases -------------------------------------------------------------------

@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
@pytest.mark.parametrize("how", ["invalid_indices", "topk_length_0"])
def test_no_counted_slot_gives_zero_out_and_infinite_lse(how, fp8, rng):
    """Every slot invalid (negative or past the pool), or none within topk_length, over a
    schedule that splits each query token: every pool token is NaN, and out is exactly 0 and
    lse +inf (FlashMLA's ref.py), also with a sink (which must not turn 0 / 0 into NaN). The
    grid has such queries among others, with and without sinks."""
    case = KernelCase(s_q=2, h_q=16, page=16, num_blocks=4, topk=300, fp8=fp8, sink="random",
                      invalid=1.0 if how == "invalid_indices" else 0.0,
                      topk_length=(0, 0) if how == "topk_length_0" else None, num_sm_parts=16)
    inputs, _ = make_inputs(case, rng)
    out, lse = poisoned_decode(*inputs, fp8=fp8, num_sm_parts=16)
    assert (np.asarray(out, np.float32) == 0).all() and np.isposinf(np.asarray(lse)).all()
    assert_matches(out, lse, *run_reference(case, *inputs))


def test_infinite_sinks(rng):
    """A sink of +inf makes out exactly 0, one of -inf changes nothing (bit for bit), and a
    sink never changes lse; both where a query token is one split (batch row 1: 20 slots, one
    tile) and where its partials are combined (batch row 0: 300 slots over 16 pieces)."""
    case = KernelCase(s_q=2, h_q=16, page=64, num_blocks=6, topk=300, topk_length=(300, 20),
                      num_sm_parts=16)
    (q, k_cache, indices, topk_length, _), _ = make_inputs(case, rng)
    splits = np.diff(np.asarray(sparse_metadata(q, indices, topk_length, True, 16).num_splits))
    assert splits[:2].max() > 1 and (splits[2:] == 1).all(), splits  # per (b, s), b-major
    sink = (rng.standard_normal(16) * 3).astype(np.float32)
    sink[0], sink[1] = np.inf, -np.inf
    plain_out, plain_lse = poisoned_decode(q, k_cache, indices, topk_length, None, fp8=True,
                                           num_sm_parts=16)
    out, lse = poisoned_decode(q, k_cache, indices, topk_length, sink, fp8=True,
                               num_sm_parts=16)
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(plain_lse))
    assert (np.asarray(out[:, :, 0], np.float32) == 0).all()
    np.testing.assert_array_equal(np.asarray(out[:, :, 1], np.float32),
                                  np.asarray(plain_out[:, :, 1], np.float32))
    assert_matches(out, lse, *run_reference(case, q, k_cache, indices, topk_length, sink))


@pytest.mark.parametrize("fp8, num_sm_parts", [(True, 1), (False, 16)],
                         ids=["fp8-one_piece", "bf16-16_pieces"])
def test_nan_in_a_counted_token_reaches_its_query_only(fp8, num_sm_parts, rng):
    """A counted token is attended to as it is: NaN in one of its columns makes its query's out
    and lse NaN on every head, whichever split holds it, as in the reference; the queries that
    do not select it are untouched."""
    case = KernelCase(s_q=2, h_q=16, page=16, num_blocks=20, topk=300, fp8=fp8, invalid=0.0,
                      num_sm_parts=num_sm_parts)
    (q, k_cache, indices, _, _), _ = make_inputs(case, rng)
    token = indices[0, 0, 150]
    others = np.ones(indices.shape[:2], bool)
    others[0, 0] = False
    indices[others[..., None] & (indices == token)] = -1  # only query (0, 0) selects it
    k_cache = np.array(k_cache)
    if fp8:
        k_cache.reshape(-1, BYTES)[token, 3] = 0x7F  # an e4m3 NaN in column 3
    else:
        k_cache.reshape(-1, k_cache.shape[-1])[token, 3] = np.nan
    out, lse = poisoned_decode(q, k_cache, indices, None, None, fp8=fp8,
                               num_sm_parts=num_sm_parts)
    ref_out, ref_lse = run_reference(case, q, k_cache, indices, None, None)
    for got, want in ((out, ref_out), (lse, ref_lse)):
        want = np.isnan(np.asarray(want, np.float32))
        np.testing.assert_array_equal(np.isnan(np.asarray(got, np.float32)), want)
    assert np.isnan(np.asarray(out, np.float32)[0, 0]).all()
    assert np.isnan(np.asarray(lse)[0, :, 0]).all()
    assert_matches(out[:, 1:], lse[:, :, 1:], ref_out[:, 1:], ref_lse[:, :, 1:])
    assert_matches(out[1:], lse[1:], ref_out[1:], ref_lse[1:])


def test_slots_past_topk_length_are_never_read(rng):
    """Every slot past topk_length names a valid token of a NaN page: topk_length, not the
    indices, bounds what is read."""
    case = KernelCase(b=2, s_q=2, h_q=16, page=64, num_blocks=2, topk=200, fp8=False,
                      num_sm_parts=8)
    topk_length = np.array([37, 130], np.int32)
    latents = rng.standard_normal((128, 576)).astype(ml_dtypes.bfloat16)
    latents[64:] = np.nan  # the second page
    past = np.arange(200)[None, None, :] >= topk_length[:, None, None]
    indices = np.where(past, rng.integers(64, 128, (2, 2, 200)),
                       rng.integers(0, 64, (2, 2, 200))).astype(np.int32)
    q = rng.standard_normal((2, 2, 16, 576)).astype(ml_dtypes.bfloat16)
    k_cache = latents.reshape(2, 64, 1, 576)
    out, lse = poisoned_decode(q, k_cache, indices, topk_length, None, fp8=False,
                               num_sm_parts=8)
    assert_matches(out, lse, *run_reference(case, q, k_cache, indices, topk_length, None))


# --- softmax_scale and jax.jit -----------------------------------------------------------------

def test_default_softmax_scale_is_576_to_the_minus_half(rng):
    """softmax_scale None is 576 ** -0.5 bit for bit; another scale is applied, not ignored."""
    case = KernelCase(s_q=2, topk=100, sink="random")
    inputs, _ = make_inputs(case, rng)
    default = poisoned_decode(*inputs, fp8=True)
    explicit = poisoned_decode(*inputs, fp8=True, softmax_scale=576 ** -0.5)
    other = poisoned_decode(*inputs, fp8=True, softmax_scale=0.1)
    for a, b, c in zip(default, explicit, other):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert not np.array_equal(np.asarray(a), np.asarray(c))
    scaled = dataclasses.replace(case, softmax_scale=0.1)
    assert_matches(*other, *run_reference(scaled, *inputs))


LAYERS = 3


def test_under_jit_with_metadata_computed_inside(rng):
    """One decode step under jit: the schedule computed once from the traced topk_length, on
    the device, then one sparse decode per layer; each layer matches the reference."""
    case = KernelCase(b=3, s_q=2, h_q=16, page=16, num_blocks=30, topk=400,
                      topk_length=(400, 17, 0), sink="random")
    (q, k_cache, indices, topk_length, sink), _ = make_inputs(case, rng)
    qs = [jnp.asarray(rng.standard_normal(q.shape), jnp.bfloat16) for _ in range(LAYERS)]

    @jax.jit
    def step(qs, k_cache, indices, topk_length, sink):
        metadata = sparse_metadata(qs[0], indices, topk_length, True, None)
        return [testing.sparse_decode_poisoned(q, k_cache, indices, metadata=metadata,
                                               is_fp8_kvcache=True, topk_length=topk_length,
                                               attn_sink=sink) for q in qs]

    args = (qs, k_cache, indices, topk_length, sink)
    hlo = step.lower(*args).compile().as_text()
    assert hlo.count('custom_call_target="jax_flash_mla_get_mla_metadata"') == 1
    assert hlo.count('custom_call_target="jax_flash_mla_sparse_decode"') == LAYERS
    for q, (out, lse) in zip(qs, step(*args)):
        assert_matches(out, lse, *run_reference(case, q, k_cache, indices, topk_length, sink))


def test_default_metadata_equals_explicit_metadata(rng):
    """The wrapper's own schedule is get_mla_metadata's with the default num_sm_parts: the
    results are bit-equal."""
    case = KernelCase(b=2, s_q=2, h_q=16, page=16, num_blocks=30, topk=400,
                      topk_length=(400, 250))
    inputs, _ = make_inputs(case, rng)

    @jax.jit
    def both(q, k_cache, indices, topk_length, sink):
        decode = functools.partial(jax_flash_mla.flash_mla_with_kvcache, q, k_cache,
                                   is_fp8_kvcache=True, indices=indices,
                                   topk_length=topk_length, attn_sink=sink)
        metadata = jax_flash_mla.get_mla_metadata(None, q.shape[1] * q.shape[2], 1, q.shape[2],
                                                  True, indices.shape[2],
                                                  topk_length=topk_length)
        return decode(metadata=metadata), decode()

    explicit, implicit = both(*inputs)
    for a, b in zip(explicit, implicit):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert_matches(*implicit, *run_reference(case, *inputs))


# --- argument checks ---------------------------------------------------------------------------

def message(argument, given):
    """The message names the argument, says what was expected, then what was given."""
    return rf"^{re.escape(argument)}: expected\b.*(?:{given})"


def dense_metadata():
    """A dense schedule of b=2, s_q=2, h_q=16: num_splits [3], where the sparse one has
    b * s_q + 1 = 5."""
    return jax_flash_mla.get_mla_metadata(jnp.full((2,), 64, jnp.int32), 2 * 16, 1)


def sparse_metadata_of_batch_3():
    return jax_flash_mla.get_mla_metadata(None, 16, 1, 16, True, 64,
                                          topk_length=zeros((3,), jnp.int32))


# The reference's bad inputs, since the same checks guard both (an FP8 cache not 656 bytes
# wide or not bytes, h_kv 2, indices, topk_length and attn_sink of other dtypes or shapes,
# causal=True, q not bfloat16, ...), and the kernel's own: a metadata that is not a sparse
# schedule of this batch (made when the test runs, not at collection).
KERNEL_BAD_INPUTS = {
    **BAD_INPUTS,
    "dense_metadata_seqlen_q_2": (
        dict(q=zeros((2, 2, 16, 576)), indices=zeros((2, 2, 64), jnp.int32),
             metadata=dense_metadata),
        ValueError, "metadata.num_splits", r"\(3,\).*without topk"),
    "sparse_metadata_of_batch_3": (dict(metadata=sparse_metadata_of_batch_3), ValueError,
                                   "metadata.num_splits", r"\(4,\)"),
}




@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("bad", KERNEL_BAD_INPUTS, ids=str)
def test_sparse_decode_rejects(bad, jit):
    overrides, exception, argument, given = KERNEL_BAD_INPUTS[bad]
    overrides = {k: v() if callable(v) else v for k, v in overrides.items()}
    with pytest.raises(exception, match=message(argument, given)):
        call_traced(jax_flash_mla.flash_mla_with_kvcache, jit, **{**VALID, **overrides})


# Under jit, with 64-bit types off, JAX turns 64-bit NumPy arguments into 32-bit ones before
# the wrapper sees them: these are errors of an eager call only.
@pytest.mark.parametrize("argument, value, given", [
    ("indices", np.zeros((2, 1, 64), np.int64), "int64"),
    ("topk_length", np.zeros((2,), np.int64), "int64"),
    ("attn_sink", np.zeros((16,), np.float64), "float64"),
])
def test_sparse_decode_rejects_64_bit_numpy_arrays(argument, value, given):
    with pytest.raises(TypeError, match=message(argument, given)):
        jax_flash_mla.flash_mla_with_kvcache(**{**VALID, argument: value})


def test_sparse_decode_rejects_a_pool_past_int32_indices():
    """2**31 tokens (2**21 pages of 1024): an int32 index cannot name the last one. Checked
    from the shapes alone (eval_shape allocates nothing)."""
    shapes = dict(q=jax.ShapeDtypeStruct((2, 1, 16, 576), jnp.bfloat16),
                  k_cache=jax.ShapeDtypeStruct((2 ** 21, 1024, 1, BYTES), jnp.uint8),
                  indices=jax.ShapeDtypeStruct((2, 1, 64), jnp.int32))
    decode = lambda q, k_cache, indices: jax_flash_mla.flash_mla_with_kvcache(
        q, k_cache, is_fp8_kvcache=True, indices=indices)
    with pytest.raises(ValueError, match=message("k_cache", r"\b2147483648\b")):
        jax.eval_shape(decode, **shapes)


@pytest.mark.parametrize("args, kwargs, exception, argument, given", [
    ((None, 16, 1, None, False, 64), dict(topk_length=zeros((2,), jnp.int32)), TypeError,
     "num_heads_q", "None"),
    ((None, 16, 2, 16, False, 64), dict(topk_length=zeros((2,), jnp.int32)), ValueError,
     "num_heads_k", r"\b2\b"),
    ((zeros((2,), jnp.int32), 16, 1), dict(topk_length=zeros((2,), jnp.int32)), ValueError,
     "topk_length", "int32"),
    ((None, 16, 1, 16, False, 64), {}, TypeError, "cache_seqlens", "None"),
    ((None, 24, 1, 16, False, 64), dict(topk_length=zeros((2,), jnp.int32)), ValueError,
     "num_q_tokens_per_head_k", r"\b24\b"),
    ((None, 16, 1, 16, False, 0), dict(topk_length=zeros((2,), jnp.int32)), ValueError,
     "topk", r"\b0\b"),
    ((None, 16, 1, 16, False, 64), dict(topk_length=zeros((2,), jnp.float32)), TypeError,
     "topk_length", "float32"),
    ((None, 16, 1, 16, False, 64), dict(topk_length=zeros((2, 1), jnp.int32)), ValueError,
     "topk_length", r"\(2, 1\)"),
], ids=["topk_without_num_heads_q", "num_heads_k_2", "topk_length_without_topk",
        "no_batch", "rows_not_a_multiple_of_heads", "topk_0", "topk_length_float32",
        "topk_length_rank_2"])
def test_sparse_get_mla_metadata_rejects(args, kwargs, exception, argument, given):
    with pytest.raises(exception, match=message(argument, given)):
        jax_flash_mla.get_mla_metadata(*args, **kwargs)
