"""The sparse prefill op (FlashMLA's flash_mla_sparse_fwd: DeepSeek-V3.2) against the pure-jnp
reference (itself checked against float64 NumPy in test_sparse_prefill_reference.py), on bf16
kv and on FP8 paged pools (pages of 1, 16 and 64 tokens), the latter compared with the
reference run on the pool's dequantized latents (exact in bfloat16 for the power-of-two scales
quantize_fp8_kvcache writes).

Every kv row that no counted slot names is poisoned (NaN in bf16 kv; all 656 bytes 0xFF in an
FP8 pool: e4m3 codes, scales and RoPE columns), and so is every row a slot past topk_length
names: an op that reads an invalid index, a slot past topk_length or an unused row returns NaN
and fails. Long top-k lists (300 to 600 slots) make the schedule split query tokens over
pieces, so that the combine merges out, lse and max_logits.

The grid runs on the C++ CPU path and, marked gpu, on the CUDA kernels (the kernels' bounds of
tests/comparisons.py).

Also: FlashMLA's corner cases (no counted slot, infinite sinks, a row named in every slot, NaN
in a counted row), jax.jit with a traced topk_length, vmap, jax.export (the CPU round trip and
the CUDA module), sharding over 8 CPU devices, the argument checks, and the refusal of autodiff.
"""

import dataclasses
import functools
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import comparisons
import jax_flash_mla
from jax_flash_mla import api, reference, testing

from test_errors import call_traced, shape_or_number
from test_sharding import COLLECTIVES, DEVICES, cpu_mesh

D, DV, BYTES = 576, 512, 656
INT32_MIN, INT32_MAX = int(np.iinfo(np.int32).min), int(np.iinfo(np.int32).max)
TARGET = "jax_flash_mla_sparse_prefill"
METADATA_TARGET = "jax_flash_mla_get_mla_metadata"

# The op (CPU) and the reference both compute in float32 from the same keys (an FP8 pool
# dequantizes exactly: e4m3 values times power-of-two scales) and round out to bf16 once; only
# their float32 summation orders (and the op's split-KV combine) differ. Two float32 values
# within delta of each other round to bf16 values at most one bf16 ulp apart plus delta, and
# one ulp of a bf16 value r is at most 2^-7 |r| (8 significant bits): hence rtol 2^-7. delta
# matters only where out is near 0 (a cancelling average of V rows): out is a convex
# combination of V values (|v| < 6 here), and a dozen float32 roundings of such sums (2^-24
# relative each) stay under 2^-18. A dropped or doubled key of weight w moves out by about
# w |v - out|, 1e-3 and more at topk <= 600, far outside this bound.
OUT_RTOL = 2.0 ** -7
OUT_ATOL = 2.0 ** -18
# lse and max_logits are float32 in both, from the same keys: the scores' float32 dot products
# (576 terms) and the combine's log-sum-exp of the splits err by a few float32 ulps of |lse|
# (2e-6 at |lse| < 32; sm_scale 0.3 below makes |lse| ~ 23). max_logits is one such score,
# merged by max (exact). 1e-5 still sees any key of weight >= 1e-5 dropped or counted twice in
# lse, and any max taken from the wrong split, which the out bound may not.
LSE_ATOL = 1e-5


# --- inputs --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    s_q: int = 3
    h_q: int = 16
    s_kv: int = 200  # tokens of kv (of the FP8 pool: num_blocks * page)
    unused: int = 8  # rows at the end of kv that only slots past topk_length name
    topk: int = 64
    invalid: float = 0.2  # fraction of slots with an invalid index
    topk_length: tuple[int, ...] | None = None  # None: no topk_length argument
    sink: str = "none"  # "none", "random", "infinite" (+-inf and finite heads)
    page: int | None = None  # None: bf16 kv [s_kv, 1, 576]; else the FP8 pool's page size
    float8_view: bool = False  # the FP8 pool as float8_e4m3fn instead of uint8
    sm_scale: float = D ** -0.5

    def __str__(self):
        def shown(name):
            value = getattr(self, name)
            if name == "topk_length" and value is not None and len(value) > 5:
                return f"{len(value)}_lengths"
            return value
        fields = [f"{f.name}={shown(f.name)}" for f in dataclasses.fields(self)
                  if f.name in ("s_q", "h_q", "s_kv", "topk")
                  or getattr(self, f.name) != f.default]
        return "-".join(fields).replace(" ", "")


class Inputs(NamedTuple):
    q: np.ndarray  # bf16 [s_q, h_q, 576]
    kv: np.ndarray  # bf16 [s_kv, 1, 576] or the FP8 pool [num_blocks, page, 1, 656]
    indices: np.ndarray  # int32 [s_q, 1, topk]
    attn_sink: np.ndarray | None  # float32 [h_q]
    topk_length: np.ndarray | None  # int32 [s_q]
    kv_ref: np.ndarray  # bf16 [s_kv, 1, 576]: what the reference reads (kv dequantized)


def invalid_indices(s_kv):
    """Negative ones, and ones at or past the end of kv, up to the int32 extremes."""
    return np.array([-1, -2, -1000, INT32_MIN, s_kv, s_kv + 7, INT32_MAX])


def counted_slots(shape, topk_length):
    """bool [s_q, 1, topk]: the slots within each token's topk_length (clamped)."""
    if topk_length is None:
        return np.ones(shape, bool)
    return np.arange(shape[2])[None, None, :] < topk_length[:, None, None].astype(np.int64)


def named_rows(indices, topk_length, s_kv):
    """bool [s_kv]: the rows some counted slot names."""
    in_kv = counted_slots(indices.shape, topk_length) & (indices >= 0) & (indices < s_kv)
    named = np.zeros(s_kv, bool)
    named[indices[in_kv]] = True
    return named


def pack_kv(latents, named, page, float8_view):
    """(kv, kv_ref) of latents bf16 [s_kv, 576]: the rows not `named` poisoned."""
    if page is None:
        latents = latents.copy()
        latents[~named] = np.nan
        kv = latents.reshape(-1, 1, D)
        return kv, kv
    pool = np.array(jax_flash_mla.quantize_fp8_kvcache(latents.reshape(-1, page, 1, D)))
    pool.reshape(-1, BYTES)[~named] = 0xFF
    kv_ref = np.asarray(jax_flash_mla.dequantize_fp8_kvcache(pool)).reshape(-1, 1, D)
    assert np.isnan(kv_ref[~named].astype(np.float32)).all()
    return (pool.view(ml_dtypes.float8_e4m3fn) if float8_view else pool), kv_ref


def make_inputs(case, rng):
    """Fresh inputs of `case`: counted slots name the first s_kv - unused rows (duplicates
    wherever topk is large against them), slots past topk_length the last `unused` ones (all
    of them then NaN), and a fraction `invalid` of the slots an invalid index."""
    shape = (case.s_q, 1, case.topk)
    live = case.s_kv - case.unused
    topk_length = None if case.topk_length is None else np.array(case.topk_length, np.int32)
    past = rng.integers(live, case.s_kv, shape) if case.unused else rng.integers(0, live, shape)
    indices = np.where(counted_slots(shape, topk_length), rng.integers(0, live, shape), past)
    invalid = rng.random(shape) < case.invalid
    indices[invalid] = rng.choice(invalid_indices(case.s_kv), invalid.sum())
    indices = indices.astype(np.int32)

    named = named_rows(indices, topk_length, case.s_kv)
    assert not named[live:].any()
    latents = rng.standard_normal((case.s_kv, D)).astype(ml_dtypes.bfloat16)
    kv, kv_ref = pack_kv(latents, named, case.page, case.float8_view)

    q = rng.standard_normal((case.s_q, case.h_q, D)).astype(ml_dtypes.bfloat16)
    attn_sink = None
    if case.sink != "none":
        attn_sink = (rng.standard_normal(case.h_q) * 3).astype(np.float32)
        if case.sink == "infinite":
            attn_sink[::3] = np.inf
            attn_sink[1::3] = -np.inf
    return Inputs(q, kv, indices, attn_sink, topk_length, kv_ref)


# --- the op, the reference, and the comparison ---------------------------------------------------

@functools.partial(jax.jit, static_argnames="sm_scale")
def prefill(q, kv, indices, attn_sink, topk_length, *, sm_scale):
    """The op with NaN-filled outputs aliased in: an element it forgets to write stays NaN."""
    return testing.sparse_prefill_poisoned(q, kv, indices, sm_scale, attn_sink=attn_sink,
                                           topk_length=topk_length)


@functools.partial(jax.jit, static_argnames="sm_scale")
def reference_prefill(q, kv, indices, attn_sink, topk_length, *, sm_scale):
    return reference.flash_mla_sparse_fwd(q, kv, indices, sm_scale, attn_sink=attn_sink,
                                          topk_length=topk_length)


def run_op(inputs, sm_scale=D ** -0.5, **changes):
    x = inputs._replace(**changes)
    return prefill(x.q, x.kv, x.indices, x.attn_sink, x.topk_length, sm_scale=sm_scale)


def run_reference(inputs, sm_scale=D ** -0.5, **changes):
    x = inputs._replace(**changes)
    return reference_prefill(x.q, x.kv_ref, x.indices, x.attn_sink, x.topk_length,
                             sm_scale=sm_scale)


def assert_matches(got, want):
    """(out bf16 [s_q, h_q, 512], max_logits, lse float32 [s_q, h_q]) against the reference's
    (or another run's). Nothing may be NaN; a token that sees no key (want lse +inf) must have
    out exactly 0, lse +inf and max_logits -inf; every other element within the tolerances
    above, and max_logits <= lse (lse = max + log of a sum whose largest term is exactly 1)."""
    (out, max_logits, lse), (want_out, want_max, want_lse) = got, want
    assert out.dtype == jnp.bfloat16, out.dtype
    assert max_logits.dtype == lse.dtype == np.float32, (max_logits.dtype, lse.dtype)
    assert out.shape == want_out.shape and lse.shape == max_logits.shape == want_lse.shape
    out, max_logits, lse, want_out, want_max, want_lse = (
        np.asarray(x, np.float64) for x in (out, max_logits, lse, want_out, want_max, want_lse))
    for name, x in (("reference out", want_out), ("reference lse", want_lse),
                    ("reference max_logits", want_max), ("out", out), ("lse", lse),
                    ("max_logits", max_logits)):
        assert not np.isnan(x).any(), f"NaN in {name} at {np.argwhere(np.isnan(x))[:5].tolist()}"
    sees_no_key = np.isposinf(want_lse)
    np.testing.assert_array_equal(np.isneginf(want_max), sees_no_key, "reference max_logits")
    np.testing.assert_array_equal(np.isposinf(lse), sees_no_key, "lse == +inf rows differ")
    np.testing.assert_array_equal(np.isneginf(max_logits), sees_no_key,
                                  "max_logits == -inf rows differ")
    assert (out[sees_no_key] == 0).all(), "out not 0 where no key is seen"
    np.testing.assert_allclose(out, want_out, rtol=OUT_RTOL, atol=OUT_ATOL, err_msg="out")
    saw = ~sees_no_key
    np.testing.assert_allclose(lse[saw], want_lse[saw], rtol=0, atol=LSE_ATOL, err_msg="lse")
    np.testing.assert_allclose(max_logits[saw], want_max[saw], rtol=0, atol=LSE_ATOL,
                               err_msg="max_logits")
    assert (max_logits[saw] <= lse[saw]).all(), "max_logits > lse"


def assert_matches_gpu(got, want):
    """The GPU kernels' results against the reference's: out and lse within the kernels' bounds
    (tests/comparisons.py: P rounded to bf16 before P V, as dense decode's kernels do; the
    scores' float32 sums in another order), max_logits within lse's (it is one of those scores,
    taken through the kernels' log2-domain running max and back: two more float32 roundings),
    -inf exactly where no key is seen, and never above lse."""
    (out, max_logits, lse), (want_out, want_max, want_lse) = got, want
    comparisons.assert_attention_close(
        jnp.asarray(out)[None], jnp.asarray(lse).T[None], jnp.asarray(want_out)[None],
        jnp.asarray(want_lse).T[None], dtype=jnp.bfloat16,
        out_roundings=comparisons.KERNEL_OUT_ROUNDINGS, lse_atol=comparisons.KERNEL_LSE_ATOL)
    max_logits, lse = np.asarray(max_logits, np.float64), np.asarray(lse, np.float64)
    want_max = np.asarray(want_max, np.float64)
    assert not np.isnan(max_logits).any(), "NaN in max_logits"
    sees_no_key = np.isposinf(np.asarray(want_lse))
    np.testing.assert_array_equal(np.isneginf(max_logits), sees_no_key,
                                  "max_logits == -inf rows differ")
    saw = ~sees_no_key
    np.testing.assert_allclose(max_logits[saw], want_max[saw], rtol=0,
                               atol=comparisons.KERNEL_LSE_ATOL, err_msg="max_logits")
    assert (max_logits[saw] <= lse[saw]).all(), "max_logits > lse"


def check_case(case, rng, device=None):
    """The poisoned op on `device` (the C++ CPU path if None) against the reference on the CPU
    (its float32 matmuls exact), on fresh inputs of `case`."""
    inputs = make_inputs(case, rng)
    cpu_inputs = jax.device_put(inputs, jax.devices("cpu")[0])
    want = run_reference(cpu_inputs, case.sm_scale)
    if device is None:
        got = run_op(cpu_inputs, case.sm_scale)
        assert_matches(got, want)
    else:
        got = run_op(jax.device_put(inputs, device), case.sm_scale)
        assert_matches_gpu(got, want)
    return inputs, got


def splits_per_token(h_q, topk, topk_length=None, s_q=None):
    """The pieces the op's own schedule cuts each query token's slots into."""
    s_q = len(topk_length) if s_q is None else s_q
    lengths = api.sparse_lengths(topk_length, s_q, 1, topk)
    return np.diff(np.asarray(api.sparse_metadata_for_lengths(lengths, h_q).num_splits))


# --- against the reference ---------------------------------------------------------------------

LENGTHS_40 = (300, 0, 1, 299, 150, -1, INT32_MAX, INT32_MIN, 64, 65) * 4
LENGTHS_16 = (600, 599, 0, 1, 64, 65, 300, -7, 1000, INT32_MAX, 128, 2, 450, 33, 600, 200)

# Every value of each axis at least once, and the pairs that matter together: h_q {1, 3, 16,
# 64, 128}, s_q 1..40, topk {1, 7, 64, 100, 300, 600}, s_kv from 1 (every valid index one
# row) and 6 (each row named ~100 times) to 4096, bf16 kv and FP8 pools (page 1, 16, 64;
# uint8 and float8_e4m3fn), topk_length absent or with entries 0, inside, == topk, past topk
# (up to INT32_MAX) and negative (down to INT32_MIN), sinks absent, finite or +-inf, and
# sm_scale large (|lse| ~ 23) and negative.
GRID = [
    Case(),
    Case(s_q=1, h_q=1, s_kv=20, unused=0, topk=1, invalid=0.0),
    Case(s_q=5, h_q=3, s_kv=6, unused=1, topk=7, topk_length=(7, 0, 3, -1, 100), sink="random"),
    Case(s_q=4, h_q=64, s_kv=160, page=16, topk=100, topk_length=(150, -4, INT32_MIN, 100),
         sink="infinite"),
    Case(s_q=2, h_q=128, s_kv=512, unused=64, page=64, topk=600, sink="random"),
    Case(s_q=40, h_q=16, s_kv=1000, unused=100, topk=300, topk_length=LENGTHS_40,
         sink="random"),
    Case(s_q=6, h_q=128, s_kv=50, unused=5, topk=600, invalid=0.5),
    Case(s_q=3, h_q=16, s_kv=700, unused=50, page=1, float8_view=True, topk=600,
         topk_length=(600, 333, 1)),
    Case(s_q=2, h_q=3, s_kv=480, page=16, topk=300, topk_length=(INT32_MAX, 299),
         sink="random", sm_scale=0.3),
    Case(s_q=8, h_q=64, s_kv=4096, unused=1000, topk=7, sink="infinite"),
    Case(s_q=16, h_q=1, s_kv=256, unused=64, page=64, topk=600, topk_length=LENGTHS_16,
         sink="infinite"),
    Case(s_q=3, h_q=16, s_kv=1, unused=0, topk=100, invalid=0.3, sm_scale=-0.05),
    Case(s_q=12, h_q=64, s_kv=3000, unused=500, topk=64, invalid=0.5, sink="random"),
    Case(s_q=9, h_q=128, s_kv=96, unused=16, page=16, topk=600, invalid=0.1, sink="infinite",
         topk_length=(600, 1, 0, 599, 300, INT32_MAX, -1, 7, 64)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GRID, ids=str)
def test_gpu_sparse_prefill_matches_reference(case, rng):
    check_case(case, rng, jax.devices("gpu")[0])


@pytest.mark.parametrize("case", GRID, ids=str)
def test_sparse_prefill_matches_reference(case, rng):
    inputs, _ = check_case(case, rng)
    # The poisoning is what it claims: every row a slot past topk_length names is NaN.
    poisoned = np.isnan(inputs.kv_ref.astype(np.float32)[:, 0]).any(axis=-1)
    past = ~counted_slots(inputs.indices.shape, inputs.topk_length)
    past &= (inputs.indices >= 0) & (inputs.indices < case.s_kv)
    assert poisoned[inputs.indices[past]].all()
    assert poisoned.any() or case.unused == 0


def test_the_grid_splits_some_tokens_and_not_others():
    """Some grid cases split query tokens over several pieces of the op's schedule (so the
    combine runs), others keep every token whole."""
    lengths = lambda c: None if c.topk_length is None else np.array(c.topk_length, np.int32)
    most = [splits_per_token(c.h_q, c.topk, lengths(c), c.s_q).max() for c in GRID]
    assert max(most) > 1 and min(most) == 1, most


# --- the split schedule and its combine ----------------------------------------------------------

def test_the_combine_takes_max_logits_and_lse_from_every_split(rng):
    """Each query token has one 'hot' row, a far larger score than the rest on every head,
    named in one slot: the last of 600, the first, the middle, the last within topk_length. The
    schedule splits every token, so max_logits comes from whichever split holds the hot row
    (e^6 of lse's ~e^7): an op that keeps one split's max, or drops a split, fails."""
    case = Case(s_q=4, h_q=16, s_kv=2000, unused=0, topk=600, invalid=0.1,
                topk_length=(600, 600, 600, 450))
    inputs = make_inputs(case, rng)
    assert (splits_per_token(16, 600, inputs.topk_length) > 1).all()
    q = inputs.q.astype(np.float64)
    # Row hot_i = c * sum of token i's queries over heads: q_h . hot_i ~ c (576 +- 93) > 0.
    hot_rows = (q.sum(axis=1) * 0.25).astype(ml_dtypes.bfloat16)  # scores ~ 6, others ~ N(0, 1)
    kv = inputs.kv.copy()
    kv[:4, 0] = hot_rows
    indices = inputs.indices.copy()
    spare = np.flatnonzero(named_rows(indices, inputs.topk_length, case.s_kv))[-1]  # not NaN
    indices[(indices >= 0) & (indices < 4)] = spare  # no other slot names a hot row
    for token, slot in enumerate((599, 0, 300, 449)):
        indices[token, 0, slot] = token
    got = run_op(inputs, kv=kv, indices=indices)
    assert_matches(got, run_reference(inputs, kv_ref=kv, indices=indices))
    hot_scores = np.einsum("thd,td->th", q, hot_rows.astype(np.float64)) * case.sm_scale
    assert hot_scores.min() > 3, hot_scores.min()
    np.testing.assert_allclose(np.asarray(got[1]), hot_scores, rtol=0, atol=LSE_ATOL)


def test_a_row_named_in_every_slot_counts_in_every_split(rng):
    """Token 0 names one row in all 600 slots, over several splits: out is that row's V,
    max_logits its score, lse that score + log(600)."""
    case = Case(s_q=2, h_q=16, s_kv=100, unused=0, topk=600, invalid=0.0)
    inputs = make_inputs(case, rng)
    assert splits_per_token(16, 600, s_q=2).max() > 1
    indices = inputs.indices.copy()
    indices[0] = 17
    out, max_logits, lse = run_op(inputs, indices=indices)
    assert_matches((out, max_logits, lse), run_reference(inputs, indices=indices))
    row = inputs.kv[17, 0].astype(np.float64)
    score = inputs.q[0].astype(np.float64) @ row * case.sm_scale
    np.testing.assert_allclose(np.asarray(max_logits)[0], score, rtol=0, atol=LSE_ATOL)
    np.testing.assert_allclose(np.asarray(lse)[0], score + np.log(600), rtol=0, atol=LSE_ATOL)
    # One rounding of out to bf16, relative to the V row itself.
    np.testing.assert_allclose(np.asarray(out, np.float64)[0],
                               np.broadcast_to(row[:DV], (16, DV)), rtol=2 ** -8, atol=0)


# --- FlashMLA's corner cases -------------------------------------------------------------------

@pytest.mark.parametrize("sink", ["none", "random", "infinite"])
@pytest.mark.parametrize("page", [None, 16], ids=["bf16", "fp8"])
@pytest.mark.parametrize("how", ["invalid_indices", "topk_length_0", "topk_length_negative"])
def test_no_counted_slot_gives_zero_out_infinite_lse_and_max(how, page, sink, rng):
    """Every slot invalid, or none within topk_length, over 600 slots: every row of kv is
    poisoned, and out is exactly 0, lse +inf and max_logits -inf, with or without a sink
    (which must not turn 0 / 0 into NaN)."""
    topk_length = dict(topk_length_0=(0, 0, 0),
                       topk_length_negative=(-1, INT32_MIN, -600)).get(how)
    case = Case(s_q=3, h_q=16, s_kv=64, unused=0, topk=600, page=page, sink=sink,
                topk_length=topk_length, invalid=1.0 if how == "invalid_indices" else 0.0)
    inputs, (out, max_logits, lse) = check_case(case, rng)
    assert np.isnan(inputs.kv_ref.astype(np.float32)).all()
    assert (np.asarray(out, np.float32) == 0).all()
    assert np.isposinf(np.asarray(lse)).all() and np.isneginf(np.asarray(max_logits)).all()


def test_infinite_sinks(rng):
    """A sink of +inf makes out exactly 0, one of -inf changes nothing (bit for bit), and a
    sink never changes lse or max_logits (bit for bit); on a token split over pieces (600
    slots) and on one that is not (5 slots)."""
    case = Case(s_q=2, h_q=16, s_kv=1000, topk=600, page=1, topk_length=(600, 5))
    inputs = make_inputs(case, rng)
    splits = splits_per_token(16, 600, inputs.topk_length)
    assert splits[0] > 1 and splits[1] == 1, splits
    sink = (rng.standard_normal(16) * 3).astype(np.float32)
    sink[0], sink[1] = np.inf, -np.inf
    plain_out, plain_max, plain_lse = run_op(inputs)
    out, max_logits, lse = got = run_op(inputs, attn_sink=sink)
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(plain_lse))
    np.testing.assert_array_equal(np.asarray(max_logits), np.asarray(plain_max))
    assert (np.asarray(out[:, 0], np.float32) == 0).all()
    np.testing.assert_array_equal(np.asarray(out[:, 1], np.float32),
                                  np.asarray(plain_out[:, 1], np.float32))
    assert not np.array_equal(np.asarray(out[:, 2:], np.float32),
                              np.asarray(plain_out[:, 2:], np.float32))
    assert_matches(got, run_reference(inputs, attn_sink=sink))


@pytest.mark.parametrize("page", [None, 64], ids=["bf16", "fp8"])
def test_nan_in_a_counted_row_reaches_only_its_token(page, rng):
    """A counted row is attended to as it is: NaN in one of its columns makes its token's out,
    lse and max_logits NaN on every head (as in the reference), and no other token's."""
    case = Case(s_q=3, h_q=16, s_kv=512, unused=0, topk=600, invalid=0.0, page=page)
    inputs = make_inputs(case, rng)
    row = inputs.indices[0, 0, 450]
    other = next(r for r in inputs.indices[0, 0] if r != row)  # named by token 0: not NaN
    indices = inputs.indices.copy()
    indices[1:][indices[1:] == row] = other  # only token 0 names the row
    kv = np.array(inputs.kv)
    if page is None:
        kv[row, 0, 3] = np.nan
        kv_ref = kv
    else:
        kv.reshape(-1, BYTES)[row, 3] = 0x7F  # an e4m3 NaN in column 3
        kv_ref = np.asarray(jax_flash_mla.dequantize_fp8_kvcache(kv)).reshape(-1, 1, D)
    got = run_op(inputs, kv=kv, indices=indices)
    for x in got:
        x = np.asarray(x, np.float32)
        assert np.isnan(x[0]).all() and not np.isnan(x[1:]).any()
    want = run_reference(inputs, kv_ref=kv_ref, indices=indices)
    assert_matches(tuple(x[1:] for x in got), tuple(x[1:] for x in want))


def test_eager_equals_jit(rng):
    inputs = make_inputs(Case(s_q=2, topk=300, topk_length=(300, 40), sink="random"), rng)
    eager = jax_flash_mla.flash_mla_sparse_fwd(inputs.q, inputs.kv, inputs.indices, D ** -0.5,
                                               attn_sink=inputs.attn_sink,
                                               topk_length=inputs.topk_length)
    for a, b in zip(eager, run_op(inputs)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


# --- jax.jit and vmap ----------------------------------------------------------------------------

LAYERS = 3


def test_under_jit_with_a_traced_topk_length(rng):
    """One prefill step under jit, topk_length traced (the schedule computed on the device from
    it): one sparse prefill per layer, each matching the reference."""
    case = Case(s_q=6, h_q=16, s_kv=608, page=16, topk=400,
                topk_length=(400, 17, 0, -5, INT32_MAX, 250), sink="random")
    inputs = make_inputs(case, rng)
    qs = [jnp.asarray(rng.standard_normal(inputs.q.shape), jnp.bfloat16) for _ in range(LAYERS)]

    @jax.jit
    def step(qs, kv, indices, topk_length, sink):
        return [jax_flash_mla.flash_mla_sparse_fwd(q, kv, indices, case.sm_scale, attn_sink=sink,
                                                   topk_length=topk_length) for q in qs]

    args = (qs, inputs.kv, inputs.indices, inputs.topk_length, inputs.attn_sink)
    hlo = step.lower(*args).compile().as_text()
    assert hlo.count(f'custom_call_target="{TARGET}"') == LAYERS
    assert f'custom_call_target="{METADATA_TARGET}"' in hlo
    for q, got in zip(qs, step(*args)):
        assert_matches(got, run_reference(inputs, q=q))


INSTANCES = 3


def stack(instances):
    """Per-instance Inputs -> the same, stacked on a new leading axis (None stays None)."""
    return Inputs(*(None if xs[0] is None else np.stack(xs) for xs in zip(*instances)))


def assert_instances(got, instances, sm_scale=D ** -0.5):
    """Instance v of the vmapped results against the op on instance v alone (its own
    schedule: the vmapped call folds the instances into one, so split points move, within the
    tolerance) and against the reference."""
    for v, inputs in enumerate(instances):
        mine = tuple(x[v] for x in got)
        assert_matches(mine, run_op(inputs, sm_scale))
        assert_matches(mine, run_reference(inputs, sm_scale))


def test_vmap_with_a_shared_kv(rng):
    """kv (and attn_sink) not vmapped: every instance's indices name rows of the one kv."""
    case = Case(s_q=2 * INSTANCES, h_q=16, s_kv=704, unused=50, topk=600, page=64,
                topk_length=(600, 0, 150, 599, 1000, 64), sink="random")
    whole = make_inputs(case, rng)
    per_instance = lambda x: x.reshape((INSTANCES, 2) + x.shape[1:])
    cut = lambda v: whole._replace(q=whole.q[2 * v:2 * v + 2],
                                   indices=whole.indices[2 * v:2 * v + 2],
                                   topk_length=whole.topk_length[2 * v:2 * v + 2])
    fwd = jax.jit(jax.vmap(lambda q, i, t: jax_flash_mla.flash_mla_sparse_fwd(
        q, whole.kv, i, case.sm_scale, attn_sink=whole.attn_sink, topk_length=t)))
    got = fwd(*map(per_instance, (whole.q, whole.indices, whole.topk_length)))
    assert got[0].shape == (INSTANCES, 2, 16, DV)
    assert got[1].shape == got[2].shape == (INSTANCES, 2, 16)
    assert_instances(got, [cut(v) for v in range(INSTANCES)])


@pytest.mark.parametrize("page", [None, 16], ids=["bf16", "fp8"])
def test_vmap_over_instances_with_their_own_kv(page, rng):
    """kv vmapped: the folded call concatenates the instances' kv, and an index that is invalid
    in its own kv (past its end, up to INT32_MAX) must not reach the next instance's rows."""
    case = Case(s_q=4, h_q=16, s_kv=320, topk=300, invalid=0.4, page=page,
                topk_length=(300, 7, 0, 200))
    instances = [make_inputs(case, rng) for _ in range(INSTANCES)]
    x = stack(instances)
    fwd = jax.jit(jax.vmap(lambda q, kv, i, t: jax_flash_mla.flash_mla_sparse_fwd(
        q, kv, i, case.sm_scale, topk_length=t)))
    assert_instances(fwd(x.q, x.kv, x.indices, x.topk_length), instances)


def test_vmap_with_an_attn_sink_per_instance(rng):
    """attn_sink vmapped (the instances run one after another), each instance with its own kv,
    topk_length and sink."""
    cases = [Case(s_q=2, h_q=16, s_kv=256, page=64, topk=300, topk_length=lengths,
                  sink="infinite") for lengths in ((300, 3), (0, 50), (64, 1000))]
    instances = [make_inputs(case, rng) for case in cases]
    x = stack(instances)
    fwd = jax.jit(jax.vmap(lambda q, kv, i, t, s: jax_flash_mla.flash_mla_sparse_fwd(
        q, kv, i, D ** -0.5, attn_sink=s, topk_length=t)))
    assert_instances(fwd(x.q, x.kv, x.indices, x.topk_length, x.attn_sink), instances)


def test_vmap_refuses_kv_that_folds_past_int32_indices():
    """Three kv of 2**30 tokens fold into one that int32 indices cannot address: an error at
    trace time (from the shapes alone), not indices that wrap into another instance."""
    shapes = (jax.ShapeDtypeStruct((3, 2, 16, D), jnp.bfloat16),
              jax.ShapeDtypeStruct((3, 2 ** 20, 1024, 1, BYTES), jnp.uint8),
              jax.ShapeDtypeStruct((3, 2, 1, 64), jnp.int32))
    fwd = jax.vmap(lambda q, kv, i: jax_flash_mla.flash_mla_sparse_fwd(q, kv, i, 0.1))
    with pytest.raises(ValueError, match=r"^kv: .*\b3221225472\b"):
        jax.eval_shape(fwd, *shapes)


# --- jax.export ----------------------------------------------------------------------------------

EXPORT_CASE = Case(s_q=4, h_q=16, s_kv=512, page=64, topk=400, topk_length=(400, 120, 0, 9),
                   sink="random")


def prefill_step(q, kv, indices, topk_length, attn_sink):
    return jax_flash_mla.flash_mla_sparse_fwd(q, kv, indices, EXPORT_CASE.sm_scale,
                                              attn_sink=attn_sink, topk_length=topk_length)


def export_args(inputs):
    return (inputs.q, inputs.kv, inputs.indices, inputs.topk_length, inputs.attn_sink)


def test_cpu_export_round_trips(rng):
    pytest.importorskip("flatbuffers", reason="jax.export serialization needs flatbuffers")
    inputs = make_inputs(EXPORT_CASE, rng)
    args = jax.device_put(export_args(inputs), jax.devices("cpu")[0])
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in args]
    # Only JAX's own targets carry its compatibility guarantee; ours must be allowed by name.
    allowed = [jax.export.DisabledSafetyCheck.custom_call(t) for t in (METADATA_TARGET, TARGET)]
    exported = jax.export.export(jax.jit(prefill_step), platforms=["cpu"],
                                 disabled_checks=allowed)(*shapes)
    assert TARGET in exported.mlir_module()
    got = jax.export.deserialize(exported.serialize()).call(*args)
    want = jax.jit(prefill_step)(*args)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert_matches(got, run_reference(inputs))


# --- sharding over 8 CPU devices -----------------------------------------------------------------

needs_8_devices = pytest.mark.skipif(len(jax.devices("cpu")) < DEVICES,
                                     reason="needs --xla_force_host_platform_device_count=8")


def run_sharded(mesh, specs, args):
    """The results of prefill_step jitted with these input shardings, and its compiled HLO."""
    shardings = tuple(NamedSharding(mesh, spec) for spec in specs)
    step = jax.jit(prefill_step, in_shardings=shardings)
    args = [jax.device_put(x, s) for x, s in zip(args, shardings)]
    return step(*args), step.lower(*args).compile().as_text()


def unsharded(args):
    """The op on one CPU device, as the sharded runs use the CPU devices."""
    return jax.jit(prefill_step)(*jax.device_put(args, jax.devices("cpu")[0]))


def assert_local_prefill_only(hlo, local_out_shape):
    """No collective, and every device's prefill computes one shard of out, not the whole."""
    found = [c for c in COLLECTIVES if c in hlo]
    assert not found, f"the sharded sparse prefill communicates: {found}"
    calls = [line for line in hlo.splitlines() if f'custom_call_target="{TARGET}"' in line]
    s_q, h_q = local_out_shape
    assert calls and all(f"= (bf16[{s_q},1,{h_q},{DV}]" in line for line in calls), calls


SHARDED_CASE = Case(s_q=16, h_q=16, s_kv=640, unused=40, page=16, topk=300, invalid=0.3,
                    topk_length=(300, 0, 77, 299, -3, INT32_MAX, 150, 1) * 2, sink="infinite")


@needs_8_devices
def test_sequence_parallel(rng):
    """q, indices, topk_length and the results split on the tokens (2 of 16 a device), kv and
    attn_sink replicated. Each device schedules its own tokens, so split points move: within
    the tolerance of the unsharded op."""
    inputs = make_inputs(SHARDED_CASE, rng)
    args = export_args(inputs)
    mesh = cpu_mesh((DEVICES,), ("sp",))
    got, hlo = run_sharded(mesh, (P("sp"), P(), P("sp"), P("sp"), P()), args)
    assert all(x.sharding.spec[0] == "sp" for x in got)
    assert_local_prefill_only(hlo, (16 // DEVICES, 16))
    assert_matches(got, unsharded(args))
    assert_matches(got, run_reference(inputs))


@needs_8_devices
def test_head_parallel(rng):
    """q (axis 1), attn_sink and the results split on heads (2 of 16 a device); kv, indices and
    topk_length replicated. Each device runs the whole op's schedule: bit-equal."""
    inputs = make_inputs(SHARDED_CASE, rng)
    args = export_args(inputs)
    mesh = cpu_mesh((DEVICES,), ("tp",))
    got, hlo = run_sharded(mesh, (P(None, "tp"), P(), P(), P(), P("tp")), args)
    assert all(x.sharding.spec[1] == "tp" for x in got)
    assert_local_prefill_only(hlo, (16, 16 // DEVICES))
    for a, b in zip(got, unsharded(args)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert_matches(got, run_reference(inputs))


@needs_8_devices
def test_sequence_and_head_parallel_together(rng):
    """A 2 x 4 mesh: tokens over 'sp', heads and attn_sink over 'tp', kv replicated."""
    inputs = make_inputs(SHARDED_CASE, rng)
    args = export_args(inputs)
    mesh = cpu_mesh((2, 4), ("sp", "tp"))
    got, hlo = run_sharded(mesh, (P("sp", "tp"), P(), P("sp"), P("sp"), P("tp")), args)
    assert all(tuple(x.sharding.spec)[:2] == ("sp", "tp") for x in got)
    assert_local_prefill_only(hlo, (16 // 2, 16 // 4))
    assert_matches(got, unsharded(args))
    assert_matches(got, run_reference(inputs))


# --- argument checks ---------------------------------------------------------------------------

def zeros(shape, dtype=jnp.bfloat16):
    return jnp.zeros(shape, dtype)




def message(argument, given):
    """The message names the argument, says what was expected, then what was given."""
    return rf"^{re.escape(argument)}: expected\b.*(?:{given})"


# s_q=3, h_q=16, s_kv=32, topk=64.
VALID = dict(q=zeros((3, 16, D)), kv=zeros((32, 1, D)), indices=zeros((3, 1, 64), jnp.int32),
             sm_scale=0.1, d_v=DV, attn_sink=zeros((16,), jnp.float32),
             topk_length=zeros((3,), jnp.int32))
FP8_POOL = zeros((2, 16, 1, BYTES), jnp.uint8)

BAD_INPUTS = {
    # id: (overrides of VALID, exception, argument named, given value as a regex)
    "q_rank_4": (dict(q=zeros((3, 1, 16, D))), ValueError, "q",
                 shape_or_number((3, 1, 16, D), 4)),
    "q_float32": (dict(q=zeros((3, 16, D), jnp.float32)), TypeError, "q", "float32"),
    "q_float16": (dict(q=zeros((3, 16, D), jnp.float16)), TypeError, "q", "float16"),
    "q_head_dim_512": (dict(q=zeros((3, 16, 512))), ValueError, "q", r"\b512\b"),
    "kv_rank_2": (dict(kv=zeros((32, D))), ValueError, "kv", shape_or_number((32, D), 2)),
    "kv_float32": (dict(kv=zeros((32, 1, D), jnp.float32)), TypeError, "kv", "float32"),
    "kv_int8": (dict(kv=zeros((32, 1, D), jnp.int8)), TypeError, "kv", "int8"),
    "kv_h_kv_2": (dict(kv=zeros((32, 2, D))), ValueError, "kv", r"\b2\b"),
    "kv_head_dim_512": (dict(kv=zeros((32, 1, 512))), ValueError, "kv",
                        shape_or_number((32, 1, 512), 512)),
    "kv_s_kv_0": (dict(kv=zeros((0, 1, D))), ValueError, "kv", shape_or_number((0, 1, D), 0)),
    "fp8_pool_576_bytes": (dict(kv=zeros((2, 16, 1, D), jnp.uint8)), ValueError, "kv",
                           shape_or_number((2, 16, 1, D), D)),
    "fp8_pool_rank_3": (dict(kv=zeros((32, 1, BYTES), jnp.uint8)), ValueError, "kv",
                        shape_or_number((32, 1, BYTES), 3)),
    "fp8_pool_float8_rank_5": (dict(kv=zeros((2, 2, 8, 1, BYTES), jnp.float8_e4m3fn)),
                               ValueError, "kv", shape_or_number((2, 2, 8, 1, BYTES), 5)),
    "fp8_pool_h_kv_2": (dict(kv=zeros((2, 16, 2, BYTES), jnp.uint8)), ValueError, "kv",
                        shape_or_number((2, 16, 2, BYTES), 2)),
    "fp8_pool_no_blocks": (dict(kv=zeros((0, 16, 1, BYTES), jnp.uint8)), ValueError, "kv",
                           shape_or_number((0, 16, 1, BYTES), 0)),
    "indices_int16": (dict(indices=zeros((3, 1, 64), jnp.int16)), TypeError, "indices",
                      "int16"),
    "indices_uint32": (dict(indices=zeros((3, 1, 64), jnp.uint32)), TypeError, "indices",
                       "uint32"),
    "indices_float32": (dict(indices=zeros((3, 1, 64), jnp.float32)), TypeError, "indices",
                        "float32"),
    "indices_rank_2": (dict(indices=zeros((3, 64), jnp.int32)), ValueError, "indices",
                       shape_or_number((3, 64), 2)),
    "indices_s_q_4": (dict(indices=zeros((4, 1, 64), jnp.int32)), ValueError, "indices",
                      shape_or_number((4, 1, 64), 4)),
    "indices_h_kv_2": (dict(indices=zeros((3, 2, 64), jnp.int32)), ValueError, "indices",
                       shape_or_number((3, 2, 64), 2)),
    "indices_topk_0": (dict(indices=zeros((3, 1, 0), jnp.int32)), ValueError, "indices",
                       shape_or_number((3, 1, 0), 0)),
    "fp8_pool_indices_s_q_2": (dict(kv=FP8_POOL, indices=zeros((2, 1, 64), jnp.int32)),
                               ValueError, "indices", shape_or_number((2, 1, 64), 2)),
    "topk_length_float32": (dict(topk_length=zeros((3,), jnp.float32)), TypeError,
                            "topk_length", "float32"),
    "topk_length_int16": (dict(topk_length=zeros((3,), jnp.int16)), TypeError, "topk_length",
                          "int16"),
    "topk_length_s_q_2": (dict(topk_length=zeros((2,), jnp.int32)), ValueError, "topk_length",
                          shape_or_number((2,), 2)),
    "topk_length_per_slot": (dict(topk_length=zeros((3, 1), jnp.int32)), ValueError,
                             "topk_length", shape_or_number((3, 1), 2)),
    "attn_sink_bfloat16": (dict(attn_sink=zeros((16,))), TypeError, "attn_sink", "bfloat16"),
    "attn_sink_8_heads": (dict(attn_sink=zeros((8,), jnp.float32)), ValueError, "attn_sink",
                          shape_or_number((8,), 8)),
    "attn_sink_per_token": (dict(attn_sink=zeros((3, 16), jnp.float32)), ValueError,
                            "attn_sink", shape_or_number((3, 16), 2)),
    "d_v_576": (dict(d_v=576), ValueError, "d_v", r"\b576\b"),
    "d_v_true": (dict(d_v=True), ValueError, "d_v", "True"),
    "sm_scale_none": (dict(sm_scale=None), TypeError, "sm_scale", "None"),
    "sm_scale_bool": (dict(sm_scale=True), TypeError, "sm_scale", "bool"),
    "sm_scale_array": (dict(sm_scale=jnp.float32(0.1)), TypeError, "sm_scale", "Array|Tracer"),
    "sm_scale_nan": (dict(sm_scale=float("nan")), ValueError, "sm_scale", "nan"),
    "sm_scale_inf": (dict(sm_scale=float("inf")), ValueError, "sm_scale", "inf"),
    "sm_scale_minus_inf": (dict(sm_scale=-float("inf")), ValueError, "sm_scale", "-inf"),
    "sm_scale_str": (dict(sm_scale="0.1"), TypeError, "sm_scale", "str"),
    "kv_float16": (dict(kv=zeros((32, 1, D), jnp.float16)), TypeError, "kv", "float16"),
    "kv_rank_4": (dict(kv=zeros((32, 1, 1, D))), ValueError, "kv",
                  shape_or_number((32, 1, 1, D), 4)),
}
# The ids above that pass the op an FP8 pool (which the bf16-only reference does not take);
# tests/test_sparse_prefill_reference.py checks the reference on all the others.
FP8_POOL_INPUTS = {bad for bad, (overrides, *_) in BAD_INPUTS.items()
                   if "kv" in overrides and overrides["kv"].dtype in (jnp.uint8, jnp.float8_e4m3fn)}




@pytest.mark.parametrize("kv", ["bf16", "fp8"])
def test_valid_arguments_pass(kv):
    """The baseline of the cases below: each of them breaks exactly one thing."""
    args = {**VALID, "kv": FP8_POOL} if kv == "fp8" else VALID
    for jit in (False, True):
        out, max_logits, lse = call_traced(jax_flash_mla.flash_mla_sparse_fwd, jit, **args)
        assert out.shape == (3, 16, DV) and out.dtype == jnp.bfloat16
        assert max_logits.shape == lse.shape == (3, 16) and lse.dtype == jnp.float32


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("bad", BAD_INPUTS, ids=str)
def test_sparse_prefill_rejects(bad, jit):
    overrides, exception, argument, given = BAD_INPUTS[bad]
    with pytest.raises(exception, match=message(argument, given)):
        call_traced(jax_flash_mla.flash_mla_sparse_fwd, jit, **{**VALID, **overrides})


@pytest.mark.parametrize("kv", [
    jax.ShapeDtypeStruct((2 ** 31, 1, D), jnp.bfloat16),
    jax.ShapeDtypeStruct((2 ** 21, 1024, 1, BYTES), jnp.uint8),
], ids=["bf16", "fp8"])
def test_sparse_prefill_rejects_kv_past_int32_indices(kv):
    """2**31 rows: an int32 index cannot name the last one. Checked from the shapes alone
    (eval_shape allocates nothing)."""
    fwd = lambda q, kv, indices: jax_flash_mla.flash_mla_sparse_fwd(q, kv, indices, 0.1)
    with pytest.raises(ValueError, match=message("kv", r"\b2147483648\b")):
        jax.eval_shape(fwd, jax.ShapeDtypeStruct((2, 16, D), jnp.bfloat16), kv,
                       jax.ShapeDtypeStruct((2, 1, 64), jnp.int32))


# --- what the op refuses to do -------------------------------------------------------------------

def test_differentiating_raises_a_clear_error(rng):
    inputs = make_inputs(Case(s_q=2, topk=64), rng)
    loss = lambda q: jnp.sum(jax_flash_mla.flash_mla_sparse_fwd(
        q, inputs.kv, inputs.indices, 0.1)[0].astype(jnp.float32))
    with pytest.raises(NotImplementedError, match="not differentiable"):
        jax.grad(loss)(jnp.asarray(inputs.q))


@pytest.mark.parametrize("page", [None, 16], ids=["bf16", "fp8"])
def test_cuda_export_names_the_target(page, rng):
    """Lowered for CUDA (here, on a machine without a GPU), the op is its CUDA target over kv as
    given: bf16, or the FP8 pool read in place (no dequantized copy of it in the module)."""
    inputs = make_inputs(Case(s_q=2, s_kv=64, topk=64, page=page, sink="random"), rng)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), export_args(inputs))
    allowed = [jax.export.DisabledSafetyCheck.custom_call(t) for t in (METADATA_TARGET, TARGET)]
    module = jax.export.export(jax.jit(prefill_step), platforms=["cuda"],
                               disabled_checks=allowed)(*shapes).mlir_module()
    calls = [line for line in module.splitlines() if f"@{TARGET}(" in line]
    assert len(calls) == 1, calls
    kv_type = "ui8" if page else "bf16"
    assert f"x{kv_type}>" in calls[0], calls[0]
