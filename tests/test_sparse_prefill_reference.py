"""The sparse prefill reference (FlashMLA's flash_mla_sparse_fwd: DeepSeek-V3.2) against an
independent float64 NumPy implementation of its contract, written for clarity: one query token
at a time, over the kv rows its counted slots name.

Every kv row that no counted slot names is NaN, rows past the last one any index points at
included, and so are most rows that a slot past topk_length names: a result that reads one of
them is NaN and fails.

Tolerances (comparisons.py argues them): out is float32 math rounded once to bfloat16, so it
is held to REFERENCE_OUT_ROUNDINGS = 2 bfloat16 roundings relative to max(1, max|ref out|) (a
convex combination of V rows: one rounding of out, plus float32 noise). lse is float32 from the
exact bfloat16 inputs (a few float32 ulps of scores below ~30): REFERENCE_LSE_ATOL = 3e-5. The
max_logits are one of those float32 scores, so the same bound holds them.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from comparisons import REFERENCE_LSE_ATOL, REFERENCE_OUT_ROUNDINGS, assert_attention_close
from test_errors import assert_names, call_traced
from test_sparse_prefill import BAD_INPUTS, FP8_POOL_INPUTS, VALID

from jax_flash_mla import reference

D, DV = 576, 512
INT32_MIN, INT32_MAX = int(np.iinfo(np.int32).min), int(np.iinfo(np.int32).max)


def numpy_sparse_prefill(q, kv, indices, topk_length, attn_sink, sm_scale):
    """q [s_q, h_q, 576]; kv [s_kv, 576] float64 (NaN where no counted slot names a row).
    Returns float64 out [s_q, h_q, 512], max_logits and lse [s_q, h_q]."""
    s_q, h_q, _ = q.shape
    topk = indices.shape[2]
    out = np.zeros((s_q, h_q, DV))
    max_logits = np.full((s_q, h_q), -np.inf)
    lse = np.full((s_q, h_q), np.inf)
    for i in range(s_q):
        counted = topk if topk_length is None else min(max(int(topk_length[i]), 0), topk)
        picked = [t for t in indices[i, 0, :counted] if 0 <= t < len(kv)]
        if not picked:
            continue
        keys = kv[picked]
        scores = q[i].astype(np.float64) @ keys.T * sm_scale  # [h_q, n]
        top = scores.max(axis=1)
        weights = np.exp(scores - top[:, None])
        total = weights.sum(axis=1)
        max_logits[i] = top
        lse[i] = top + np.log(total)
        out[i] = weights @ keys[:, :DV] / total[:, None]
        if attn_sink is not None:
            with np.errstate(over="ignore"):
                out[i] /= (1 + np.exp(attn_sink.astype(np.float64) - lse[i]))[:, None]
    return out, max_logits, lse


@dataclasses.dataclass(frozen=True)
class PrefillCase:
    s_q: int = 3
    h_q: int = 16
    s_kv: int = 200
    unused: int = 8  # rows at the end of kv that no index points at
    topk: int = 64
    invalid: float = 0.2  # fraction of slots with an invalid index
    topk_length: tuple[int, ...] | None = None  # None: no topk_length argument
    sink: str = "none"  # "none", "random", "infinite" (+-inf and finite heads)
    sm_scale: float = D ** -0.5

    def __str__(self):
        fields = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                  if f.name in ("s_q", "h_q", "s_kv", "topk")
                  or getattr(self, f.name) != f.default]
        return "-".join(fields).replace(" ", "")


def invalid_indices(s_kv):
    """Negative ones, and ones at or past the end of kv, up to the int32 extremes."""
    return np.array([-1, -2, -1000, INT32_MIN, s_kv, s_kv + 7, INT32_MAX])


def counted_slots(indices, topk_length):
    """bool [s_q, 1, topk]: the slots within each token's topk_length (clamped)."""
    if topk_length is None:
        return np.ones(indices.shape, bool)
    return np.arange(indices.shape[2])[None, None, :] < topk_length[:, None, None]


def poison_unnamed_rows(latents, indices, topk_length):
    """NaN into every row of latents (bfloat16 [s_kv, 576], in place) that no counted slot
    names; returns the rows as float64."""
    s_kv = len(latents)
    in_kv = counted_slots(indices, topk_length) & (indices >= 0) & (indices < s_kv)
    named = np.zeros(s_kv, bool)
    named[indices[in_kv]] = True
    latents[~named] = np.nan
    rows = latents.astype(np.float64)
    assert not np.isnan(rows[named]).any()
    return rows


def make_inputs(case, rng):
    """(q, kv, indices, attn_sink, topk_length) and the float64 kv rows the oracle reads."""
    latents = rng.standard_normal((case.s_kv, D)).astype(ml_dtypes.bfloat16)
    indices = rng.integers(0, case.s_kv - case.unused, (case.s_q, 1, case.topk))
    invalid = rng.random(indices.shape) < case.invalid
    indices[invalid] = rng.choice(invalid_indices(case.s_kv), invalid.sum())
    indices = indices.astype(np.int32)
    topk_length = None if case.topk_length is None else np.array(case.topk_length, np.int32)

    rows = poison_unnamed_rows(latents, indices, topk_length)
    assert np.isnan(rows[case.s_kv - case.unused:]).all()

    q = rng.standard_normal((case.s_q, case.h_q, D)).astype(ml_dtypes.bfloat16)
    attn_sink = None
    if case.sink != "none":
        attn_sink = (rng.standard_normal(case.h_q) * 3).astype(np.float32)
        if case.sink == "infinite":
            attn_sink[::3] = np.inf
            attn_sink[1::3] = -np.inf
    return (q, latents.reshape(case.s_kv, 1, D), indices, attn_sink, topk_length), rows


def run_reference(sm_scale, q, kv, indices, attn_sink=None, topk_length=None, jit=True):
    fwd = functools.partial(reference.flash_mla_sparse_fwd, sm_scale=sm_scale)
    fwd = jax.jit(fwd) if jit else fwd
    return fwd(q, kv, indices, attn_sink=attn_sink, topk_length=topk_length)


def assert_prefill_close(results, want):
    """out, lse through comparisons.assert_attention_close (as a batch of one: out [1, s_q,
    h_q, dv], lse [1, h_q, s_q]); max_logits held as lse is, -inf exactly where no slot counts,
    and never above lse."""
    out, max_logits, lse = results
    want_out, want_max, want_lse = want
    s_q, h_q = want_lse.shape
    assert out.shape == (s_q, h_q, DV) and max_logits.shape == lse.shape == (s_q, h_q)
    assert max_logits.dtype == np.float32
    assert_attention_close(out[None], lse.T[None], want_out[None], want_lse.T[None],
                           dtype=jnp.bfloat16, out_roundings=REFERENCE_OUT_ROUNDINGS,
                           lse_atol=REFERENCE_LSE_ATOL)
    max_logits, lse = np.asarray(max_logits, np.float64), np.asarray(lse, np.float64)
    assert not np.isnan(max_logits).any()
    saw_key = np.isfinite(want_max)
    np.testing.assert_array_equal(np.isneginf(max_logits), ~saw_key, "max_logits == -inf")
    np.testing.assert_allclose(max_logits[saw_key], want_max[saw_key], rtol=0,
                               atol=REFERENCE_LSE_ATOL, err_msg="max_logits")
    # lse = max + log(sum of weights), the largest weight exactly 1: no rounding breaks this.
    assert (max_logits[saw_key] <= lse[saw_key]).all()


def check_against_numpy(case, rng, jit=True):
    inputs, rows = make_inputs(case, rng)
    results = run_reference(case.sm_scale, *inputs, jit=jit)
    q, _, indices, attn_sink, topk_length = inputs
    want = numpy_sparse_prefill(q, rows, indices, topk_length, attn_sink, case.sm_scale)
    assert_prefill_close(results, want)
    return results, want


# Covers h_q {1, 16, 64} x topk {1, 7, 64, 100} x s_kv small (duplicates) / large, topk_length
# None / 0 / negative / past topk, sink none / random / +-inf, and sm_scale, in pairs.
CASES = [
    PrefillCase(),
    PrefillCase(s_q=4, h_q=64, s_kv=5, unused=1, topk=100, topk_length=(100, 0, -3, 250),
                sink="random"),
    PrefillCase(s_q=5, h_q=1, s_kv=4096, topk=7, topk_length=(7, 3, 0, 9, -1), sink="random"),
    PrefillCase(s_q=2, h_q=16, s_kv=33, topk=1, invalid=0.0, sm_scale=0.3),
    PrefillCase(s_q=3, h_q=64, s_kv=4096, unused=1000, topk=64, invalid=0.5, sink="infinite"),
    PrefillCase(s_q=4, h_q=1, s_kv=300, topk=100, topk_length=(50, 101, 0, 1)),
    PrefillCase(s_q=2, h_q=16, s_kv=1, unused=0, topk=7, invalid=0.3, sink="infinite"),
    PrefillCase(s_q=6, h_q=64, s_kv=17, unused=2, topk=7, invalid=0.3, sm_scale=0.1),
    PrefillCase(s_q=3, h_q=16, s_kv=2000, topk=1, topk_length=(1, 0, 5), sink="infinite"),
    PrefillCase(s_q=2, h_q=1, s_kv=64, topk=64, invalid=0.9, sink="random", sm_scale=-0.05),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_sparse_prefill_reference_matches_float64_numpy(case, rng):
    check_against_numpy(case, rng)


def test_eager_matches_float64_numpy(rng):
    case = PrefillCase(s_q=2, topk=16, topk_length=(16, 5), sink="infinite")
    check_against_numpy(case, rng, jit=False)


def test_slots_past_topk_length_name_nan_rows(rng):
    """The poisoning reaches the slots past topk_length in the cases above that have them: the
    agreement with NumPy is not an accident of those slots naming finite rows. (Where kv is
    small, counted slots name most of its rows; the cases of a large kv carry this.)"""
    poisoned = []
    for case in CASES:
        if case.topk_length is not None and min(case.topk_length) < case.topk:
            (_, _, indices, _, topk_length), rows = make_inputs(case, rng)
            past = ~counted_slots(indices, topk_length) & (indices >= 0) & (indices < case.s_kv)
            if case.s_kv >= 1000:
                poisoned.extend(np.isnan(rows[indices[past]]).any(axis=-1))
    assert len(poisoned) >= 10 and np.mean(poisoned) > 0.9, (len(poisoned), np.mean(poisoned))


def test_nan_in_a_counted_row_reaches_only_its_tokens(rng):
    """A counted row is attended to as it is (FlashMLA's kernel does not mask it either), and
    only the tokens that count it see it: each token is its own softmax."""
    case = PrefillCase(s_q=3, s_kv=500, topk=16, invalid=0.0)
    (q, kv, indices, _, _), _ = make_inputs(case, rng)
    row = indices[0, 0, 3]
    other = indices[0, 0][indices[0, 0] != row][0]  # a finite row
    indices[1:] = np.where(indices[1:] == row, other, indices[1:])
    kv[row, 0, 7] = np.nan
    out, max_logits, lse = (np.asarray(x, np.float32)
                            for x in run_reference(case.sm_scale, q, kv, indices))
    for x in (out, max_logits, lse):
        assert np.isnan(x[0]).all() and not np.isnan(x[1:]).any()


@pytest.mark.parametrize("how, sink", [("invalid_indices", "none"), ("topk_length_0", "random"),
                                       ("topk_length_negative", "infinite"),
                                       ("invalid_indices", "infinite")])
def test_no_counted_slot_gives_zero_out_infinite_lse_and_max(rng, how, sink):
    """Every slot invalid, or none within topk_length (every row of kv then NaN): out is 0, lse
    +inf and max_logits -inf, with or without a sink."""
    topk_length = dict(topk_length_0=(0, 0, 0), topk_length_negative=(-1, INT32_MIN, -64))
    case = PrefillCase(h_q=16, s_kv=40, topk=64, sink=sink, topk_length=topk_length.get(how),
                       invalid=1.0 if how == "invalid_indices" else 0.0)
    (out, max_logits, lse), _ = check_against_numpy(case, rng)
    assert (np.asarray(out, np.float32) == 0).all()
    assert np.isposinf(np.asarray(lse)).all() and np.isneginf(np.asarray(max_logits)).all()


def test_sink_scales_out_and_leaves_lse_and_max_logits(rng):
    """out with a sink is out without one times exp(lse) / (exp(lse) + exp(sink)): -inf changes
    nothing, +inf gives 0; lse and max_logits are the same arrays either way."""
    case = PrefillCase(h_q=16, topk=64)
    (q, kv, indices, _, _), _ = make_inputs(case, rng)
    sink = (rng.standard_normal(16) * 3).astype(np.float32)
    sink[0], sink[1] = -np.inf, np.inf
    plain_out, plain_max, plain_lse = run_reference(case.sm_scale, q, kv, indices)
    out, max_logits, lse = run_reference(case.sm_scale, q, kv, indices, attn_sink=sink)
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(plain_lse))
    np.testing.assert_array_equal(np.asarray(max_logits), np.asarray(plain_max))
    factor = 1 / (1 + np.exp(sink[None, :] - np.asarray(plain_lse, np.float64)))
    want = np.asarray(plain_out, np.float64) * factor[..., None]
    out = np.asarray(out, np.float64)
    # Both outs are rounded to bfloat16 once: 2 roundings relative to each element.
    np.testing.assert_allclose(out, want, rtol=2 ** -7, atol=0)
    np.testing.assert_array_equal(out[:, 0], np.asarray(plain_out, np.float64)[:, 0])
    assert (out[:, 1] == 0).all()


def test_a_row_named_twice_counts_twice(rng):
    """Every slot of token 0 names one row: out is its V row, max_logits its score and lse that
    score + log(topk). Token 1 names 23 rows, one four times and the others twice, and matches
    NumPy, far from what counting each row once would give."""
    s_kv, topk, h_q, scale = 100, 48, 16, D ** -0.5
    latents = rng.standard_normal((s_kv, D)).astype(ml_dtypes.bfloat16)
    indices = np.empty((2, 1, topk), np.int32)
    row = 5
    indices[0] = row
    indices[1, 0, :24] = rng.permutation(s_kv)[:24]
    indices[1, 0, 24:] = indices[1, 0, :24]
    indices[1, 0, 1] = indices[1, 0, 0]
    indices[1, 0, 25] = indices[1, 0, 0]
    rows = poison_unnamed_rows(latents, indices, None)
    q = rng.standard_normal((2, h_q, D)).astype(ml_dtypes.bfloat16)
    out, max_logits, lse = run_reference(scale, q, latents.reshape(s_kv, 1, D), indices)

    score = q[0].astype(np.float64) @ rows[row] * scale
    np.testing.assert_allclose(np.asarray(max_logits)[0], score, atol=REFERENCE_LSE_ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(lse)[0], score + np.log(topk),
                               atol=REFERENCE_LSE_ATOL, rtol=0)
    # One rounding of out to bfloat16, relative to the V row itself.
    np.testing.assert_allclose(np.asarray(out, np.float64)[0],
                               np.broadcast_to(rows[row, :DV], (h_q, DV)), rtol=2 ** -8, atol=0)
    want = numpy_sparse_prefill(q[1:], rows, indices[1:], None, None, scale)
    assert_prefill_close((out[1:], max_logits[1:], lse[1:]), want)
    once = numpy_sparse_prefill(q[1:], rows, np.unique(indices[1:], axis=-1), None, None, scale)
    assert np.abs(once[2] - want[2]).min() > 100 * REFERENCE_LSE_ATOL


# --- argument validation -------------------------------------------------------------------------

def zeros(shape, dtype=jnp.bfloat16):
    return jnp.zeros(shape, dtype)


# The op's table (test_sparse_prefill.py), less its FP8 pools, and one of the reference's own: an
# FP8 token row of rank 3 is a bf16 kv of the wrong dtype to it (the op reads it as a pool).
REFERENCE_BAD_INPUTS = {
    **{bad: case for bad, case in BAD_INPUTS.items() if bad not in FP8_POOL_INPUTS},
    "kv_fp8_bytes": (dict(kv=zeros((32, 1, 656), jnp.uint8)), TypeError, "kv", "uint8"),
}




def test_valid_arguments_pass():
    """The baseline of the cases below: each of them breaks exactly one thing."""
    for jit in (False, True):
        out, max_logits, lse = call_traced(reference.flash_mla_sparse_fwd, jit, **VALID)
        assert out.shape == (3, 16, DV) and out.dtype == jnp.bfloat16
        assert max_logits.shape == lse.shape == (3, 16) and lse.dtype == jnp.float32


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("bad", REFERENCE_BAD_INPUTS, ids=str)
def test_sparse_prefill_reference_rejects(bad, jit):
    overrides, exception, argument, given = REFERENCE_BAD_INPUTS[bad]
    with pytest.raises(exception, match=rf"^{argument}\b") as error:
        call_traced(reference.flash_mla_sparse_fwd, jit, **{**VALID, **overrides})
    assert_names(error.value, argument, given)
