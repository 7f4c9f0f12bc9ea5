"""The sparse (DeepSeek-V3.2, top-k) path of the pure-jnp reference against an independent
float64 NumPy implementation of FlashMLA's contract (DESIGN.md; FlashMLA's tests/ref.py),
written for clarity: one request and one query token at a time, its own FP8 decoder.

Every pool token that no counted slot selects is NaN (every byte 0xFF in an FP8 pool), unused
pages included, and so is every token that a slot past topk_length points at: a result that
reads one of them is NaN and fails."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from comparisons import REFERENCE_LSE_ATOL, REFERENCE_OUT_ROUNDINGS, assert_attention_close
from test_errors import assert_names, call_traced, shape_or_number
from test_fp8_cache import numpy_dequantize, numpy_quantize

from jax_flash_mla import reference

D, DV, BYTES = 576, 512, 656
INT32_MIN, INT32_MAX = int(np.iinfo(np.int32).min), int(np.iinfo(np.int32).max)


def numpy_sparse_decode(q, pool, indices, topk_length, attn_sink, softmax_scale):
    """q [b, s_q, h_q, 576]; pool [pool_tokens, 576] float64 latents (NaN where unselected)."""
    b, s_q, h_q, d = q.shape
    topk = indices.shape[2]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    out = np.zeros((b, s_q, h_q, DV))
    lse = np.full((b, h_q, s_q), np.inf)
    for i in range(b):
        counted = topk if topk_length is None else min(max(int(topk_length[i]), 0), topk)
        for j in range(s_q):
            picked = [t for t in indices[i, j, :counted] if 0 <= t < len(pool)]
            if not picked:
                continue
            keys = pool[picked]
            scores = q[i, j].astype(np.float64) @ keys.T * scale  # [h_q, n]
            top = scores.max(axis=1, keepdims=True)
            weights = np.exp(scores - top)
            total = weights.sum(axis=1, keepdims=True)
            head_lse = (top + np.log(total))[:, 0]
            head_out = weights @ keys[:, :DV] / total
            if attn_sink is not None:
                with np.errstate(over="ignore"):
                    head_out /= (1 + np.exp(attn_sink.astype(np.float64) - head_lse))[:, None]
            out[i, j] = head_out
            lse[i, :, j] = head_lse
    return out, lse


@dataclasses.dataclass(frozen=True)
class SparseCase:
    b: int = 2
    s_q: int = 1
    h_q: int = 16
    page: int = 64
    num_blocks: int = 4
    unused_blocks: int = 1  # pages at the end of the pool that no index points into
    topk: int = 64
    fp8: bool = True
    float8_view: bool = False  # pass the FP8 cache as float8_e4m3fn instead of uint8
    invalid: float = 0.2  # fraction of slots with an invalid index
    topk_length: tuple[int, ...] | None = None  # None: no topk_length argument
    sink: str = "none"  # "none", "random", "infinite" (+-inf and finite heads)
    softmax_scale: float | None = None

    def __str__(self):
        fields = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                  if f.name in ("b", "s_q", "h_q", "page", "topk", "fp8")
                  or getattr(self, f.name) != f.default]
        return "-".join(fields).replace(" ", "")


def invalid_indices(pool_tokens):
    """Negative ones, and ones at or past the pool's end, up to the int32 extremes."""
    return np.array([-1, -2, -1000, INT32_MIN, pool_tokens, pool_tokens + 7, INT32_MAX])


def make_inputs(case, rng):
    """(q, k_cache, indices, topk_length, attn_sink) and the float64 pool the oracle reads."""
    pool_tokens = case.num_blocks * case.page
    latents = rng.standard_normal((pool_tokens, D)).astype(ml_dtypes.bfloat16)
    used_tokens = (case.num_blocks - case.unused_blocks) * case.page
    indices = rng.integers(0, used_tokens, (case.b, case.s_q, case.topk))
    invalid = rng.random(indices.shape) < case.invalid
    indices[invalid] = rng.choice(invalid_indices(pool_tokens), invalid.sum())
    indices = indices.astype(np.int32)
    topk_length = None if case.topk_length is None else np.array(case.topk_length, np.int32)

    counted = np.ones(indices.shape, bool)
    if topk_length is not None:
        counted = np.arange(case.topk)[None, None, :] < topk_length[:, None, None]
    selected = np.zeros(pool_tokens, bool)
    in_pool = counted & (indices >= 0) & (indices < pool_tokens)
    selected[indices[in_pool]] = True

    if case.fp8:
        rows = numpy_quantize(latents)
        rows[~selected] = 0xFF
        pool = numpy_dequantize(rows)
        k_cache = rows.reshape(case.num_blocks, case.page, 1, BYTES)
        if case.float8_view:
            k_cache = k_cache.view(ml_dtypes.float8_e4m3fn)
    else:
        latents[~selected] = np.nan
        pool = latents.astype(np.float64)
        k_cache = latents.reshape(case.num_blocks, case.page, 1, D)
    assert np.isnan(pool[~selected]).all() and not np.isnan(pool[selected]).any()
    assert np.isnan(pool[used_tokens:]).all()

    q = rng.standard_normal((case.b, case.s_q, case.h_q, D)).astype(ml_dtypes.bfloat16)
    attn_sink = None
    if case.sink != "none":
        attn_sink = (rng.standard_normal(case.h_q) * 3).astype(np.float32)
        if case.sink == "infinite":
            attn_sink[::3] = np.inf
            attn_sink[1::3] = -np.inf
    return (q, k_cache, indices, topk_length, attn_sink), pool


def run_reference(case, q, k_cache, indices, topk_length, attn_sink):
    decode = functools.partial(reference.flash_mla_with_kvcache, head_dim_v=DV,
                               softmax_scale=case.softmax_scale, is_fp8_kvcache=case.fp8)
    return jax.jit(lambda q, k, i, t, s: decode(q, k, None, None, indices=i, topk_length=t,
                                                attn_sink=s))(
        q, k_cache, indices, topk_length, attn_sink)


def check_against_numpy(case, rng):
    inputs, pool = make_inputs(case, rng)
    out, lse = run_reference(case, *inputs)
    q, _, indices, topk_length, attn_sink = inputs
    want_out, want_lse = numpy_sparse_decode(q, pool, indices, topk_length, attn_sink,
                                             case.softmax_scale)
    assert_attention_close(out, lse, want_out, want_lse, dtype=jnp.bfloat16,
                           out_roundings=REFERENCE_OUT_ROUNDINGS, lse_atol=REFERENCE_LSE_ATOL)
    return out, lse


CASES = [
    SparseCase(),
    SparseCase(b=3, s_q=2, h_q=128, page=17, num_blocks=20, topk=100, topk_length=(100, 37, 0),
               sink="random"),
    SparseCase(s_q=2, h_q=1, page=1, num_blocks=300, topk=50, topk_length=(7, 80),
               sink="infinite"),
    SparseCase(h_q=16, page=17, num_blocks=5, topk=1, invalid=0.0, softmax_scale=0.3),
    SparseCase(b=1, s_q=2, h_q=128, page=64, num_blocks=3, topk=192, float8_view=True,
               sink="random", invalid=0.5),
    SparseCase(b=3, h_q=16, page=64, num_blocks=4, topk=33, fp8=False, topk_length=(33, 5, 40),
               sink="random"),
    SparseCase(s_q=2, h_q=128, page=1, num_blocks=150, topk=64, fp8=False, sink="infinite"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_sparse_reference_matches_float64_numpy(case, rng):
    check_against_numpy(case, rng)


def test_slots_past_topk_length_point_at_nan_tokens(rng):
    """The poisoning reaches the slots past topk_length in the cases above that have them: the
    agreement with NumPy is not an accident of those slots holding finite tokens."""
    for case in CASES:
        if case.topk_length is None or min(case.topk_length) >= case.topk:
            continue
        (_, _, indices, topk_length, _), pool = make_inputs(case, rng)
        past = np.arange(case.topk)[None, None, :] >= topk_length[:, None, None]
        pointed = indices[past & (indices >= 0) & (indices < len(pool))]
        assert np.isnan(pool[pointed]).any(axis=-1).mean() > 0.5, case


def test_nan_in_a_counted_token_reaches_the_result(rng):
    """A counted token is attended to as it is: NaN in it is not masked away (FlashMLA's kernel
    does not mask it either), so that corrupted pages show."""
    case = SparseCase(b=1, h_q=16, topk=64, invalid=0.0)
    (q, k_cache, indices, _, _), _ = make_inputs(case, rng)
    k_cache = np.array(k_cache)
    k_cache.reshape(-1, BYTES)[indices[0, 0, 5], 3] = 0x7F  # an e4m3 NaN in column 3
    out, lse = run_reference(case, q, k_cache, indices, None, None)
    assert np.isnan(np.asarray(out, np.float32)).all() and np.isnan(np.asarray(lse)).all()


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
@pytest.mark.parametrize("sink", ["none", "random"])
@pytest.mark.parametrize("how", ["invalid_indices", "topk_length_0"])
def test_no_counted_slot_gives_zero_out_and_infinite_lse(rng, fp8, sink, how):
    """Every slot invalid (negative or past the pool), or none within topk_length: every token
    of the pool is NaN, and out is 0, lse +inf (FlashMLA's ref.py), with or without a sink."""
    case = SparseCase(h_q=16, page=17, num_blocks=3, topk=40, fp8=fp8, sink=sink,
                      invalid=1.0 if how == "invalid_indices" else 0.0,
                      topk_length=(0, 0) if how == "topk_length_0" else None)
    out, lse = check_against_numpy(case, rng)
    assert (np.asarray(out, np.float32) == 0).all() and np.isposinf(np.asarray(lse)).all()


def test_sink_scales_out_and_leaves_lse(rng):
    """out with a sink is out without one times exp(lse) / (exp(lse) + exp(sink)): -inf changes
    nothing, +inf gives 0; lse is the same array either way."""
    case = SparseCase(h_q=16, topk=64)
    (q, k_cache, indices, _, _), _ = make_inputs(case, rng)
    sink = (rng.standard_normal(16) * 3).astype(np.float32)
    sink[0], sink[1] = -np.inf, np.inf
    plain_out, plain_lse = run_reference(case, q, k_cache, indices, None, None)
    out, lse = run_reference(case, q, k_cache, indices, None, sink)
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(plain_lse))
    factor = 1 / (1 + np.exp(sink[None, :, None] - np.asarray(plain_lse, np.float64)))
    want = np.asarray(plain_out, np.float64) * factor.transpose(0, 2, 1)[..., None]
    out = np.asarray(out, np.float64)
    np.testing.assert_allclose(out, want, rtol=2 ** -7, atol=0)
    np.testing.assert_array_equal(out[:, :, 0], np.asarray(plain_out, np.float64)[:, :, 0])
    assert (out[:, :, 1] == 0).all()


def test_a_token_selected_twice_counts_twice(rng):
    """Every slot holds the same token: out is its V row, lse its score + log(topk)."""
    case = SparseCase(b=1, h_q=16, topk=48, invalid=0.0)
    (q, k_cache, indices, _, _), pool = make_inputs(case, rng)
    token = indices[0, 0, 0]  # a selected token (the others are NaN)
    indices = np.full((1, 1, 48), token, np.int32)
    out, lse = run_reference(case, q, k_cache, indices, None, None)
    score = q[0, 0].astype(np.float64) @ pool[token] * D ** -0.5
    np.testing.assert_allclose(np.asarray(lse)[0, :, 0], score + np.log(48), atol=3e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out, np.float64)[0, 0],
                               np.broadcast_to(pool[token, :DV], (16, DV)), rtol=2 ** -8, atol=0)


# --- argument validation -------------------------------------------------------------------------

def zeros(shape, dtype=jnp.bfloat16):
    return jnp.zeros(shape, dtype)


# b=2, s_q=1, h_q=16, an FP8 pool of 4 pages of 16 tokens, topk 64.
VALID = dict(
    q=zeros((2, 1, 16, D)),
    k_cache=zeros((4, 16, 1, BYTES), jnp.uint8),
    is_fp8_kvcache=True,
    indices=zeros((2, 1, 64), jnp.int32),
    topk_length=zeros((2,), jnp.int32),
    attn_sink=zeros((16,), jnp.float32),
)

BAD_INPUTS = {
    # id: (overrides of VALID, exception, argument named, given value as a regex)
    "fp8_cache_of_576_columns": (dict(k_cache=zeros((4, 16, 1, D), jnp.uint8)), ValueError,
                                 "k_cache", r"\b576\b"),
    "fp8_cache_of_bfloat16": (dict(k_cache=zeros((4, 16, 1, BYTES))), TypeError, "k_cache",
                              "bfloat16"),
    "bytes_without_is_fp8_kvcache": (dict(is_fp8_kvcache=False), TypeError, "k_cache", "uint8"),
    "bf16_cache_of_656_columns": (dict(k_cache=zeros((4, 16, 1, BYTES)), is_fp8_kvcache=False),
                                  ValueError, "k_cache", r"\b656\b"),
    "h_kv_2": (dict(k_cache=zeros((4, 16, 2, BYTES), jnp.uint8)), ValueError, "k_cache",
               r"\b2\b"),
    "k_cache_rank_3": (dict(k_cache=zeros((4, 16, BYTES), jnp.uint8)), ValueError, "k_cache",
                       shape_or_number((4, 16, BYTES), 3)),
    "indices_int16": (dict(indices=zeros((2, 1, 64), jnp.int16)), TypeError, "indices", "int16"),
    "indices_uint32": (dict(indices=zeros((2, 1, 64), jnp.uint32)), TypeError, "indices",
                       "uint32"),
    "indices_float32": (dict(indices=zeros((2, 1, 64), jnp.float32)), TypeError, "indices",
                        "float32"),
    "indices_rank_2": (dict(indices=zeros((2, 64), jnp.int32)), ValueError, "indices",
                       shape_or_number((2, 64), 2)),
    "indices_batch_3": (dict(indices=zeros((3, 1, 64), jnp.int32)), ValueError, "indices",
                        shape_or_number((3, 1, 64), 3)),
    "indices_seqlen_q_2": (dict(indices=zeros((2, 2, 64), jnp.int32)), ValueError, "indices",
                           shape_or_number((2, 2, 64), 2)),
    "indices_topk_0": (dict(indices=zeros((2, 1, 0), jnp.int32)), ValueError, "indices",
                       shape_or_number((2, 1, 0), 0)),
    "topk_length_per_query": (dict(topk_length=zeros((2, 1), jnp.int32)), ValueError,
                              "topk_length", shape_or_number((2, 1), 2)),
    "topk_length_batch_3": (dict(topk_length=zeros((3,), jnp.int32)), ValueError, "topk_length",
                            shape_or_number((3,), 3)),
    "topk_length_float32": (dict(topk_length=zeros((2,), jnp.float32)), TypeError, "topk_length",
                            "float32"),
    "attn_sink_8_heads": (dict(attn_sink=zeros((8,), jnp.float32)), ValueError, "attn_sink",
                          shape_or_number((8,), 8)),
    "attn_sink_bfloat16": (dict(attn_sink=zeros((16,))), TypeError, "attn_sink", "bfloat16"),
    "causal_with_indices": (dict(causal=True), ValueError, "causal", "True"),
    "q_float16": (dict(q=zeros((2, 1, 16, D), jnp.float16)), TypeError, "q", "float16"),
    "q_head_dim_512": (dict(q=zeros((2, 1, 16, 512))), ValueError, "q", r"\b512\b"),
    "head_dim_v_576": (dict(head_dim_v=576), ValueError, "head_dim_v", r"\b576\b"),
    "is_fp8_kvcache_int": (dict(is_fp8_kvcache=1), TypeError, "is_fp8_kvcache", "int"),
    "softmax_scale_nan": (dict(softmax_scale=float("nan")), ValueError, "softmax_scale", "nan"),
}




@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("bad", BAD_INPUTS, ids=str)
def test_sparse_reference_rejects(bad, jit):
    overrides, exception, argument, given = BAD_INPUTS[bad]
    with pytest.raises(exception) as error:
        call_traced(reference.flash_mla_with_kvcache, jit, **{**VALID, **overrides})
    assert_names(error.value, argument, given)


DENSE = dict(q=zeros((2, 1, 16, D)), k_cache=zeros((4, 16, 1, D)),
             block_table=zeros((2, 2), jnp.int32), cache_seqlens=zeros((2,), jnp.int32))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("overrides, exception, argument, given", [
    (dict(is_fp8_kvcache=True), TypeError, "k_cache", "bfloat16"),
    (dict(topk_length=zeros((2,), jnp.int32)), ValueError, "topk_length", "int32"),
    (dict(attn_sink=zeros((16,), jnp.float32)), ValueError, "attn_sink", "float32"),
    (dict(block_table=None), TypeError, "block_table", "None"),
], ids=["is_fp8_kvcache", "topk_length", "attn_sink", "no_block_table"])
def test_sparse_arguments_without_indices_are_rejected(overrides, exception, argument, given,
                                                       jit):
    """Without indices the decode is dense: a sparse-only argument is an error, not ignored
    (is_fp8_kvcache is dense decode's too: a bf16 cache is then the wrong dtype)."""
    with pytest.raises(exception) as error:
        call_traced(reference.flash_mla_with_kvcache, jit, **{**DENSE, **overrides})
    assert_names(error.value, argument, given)
