"""The pure-jnp reference (the oracle of the kernel tests) against an independent float64 NumPy
implementation of DESIGN.md, written for clarity: one request and one query token at a time."""

import jax
import numpy as np
import pytest

from comparisons import REFERENCE_LSE_ATOL, REFERENCE_OUT_ROUNDINGS, assert_attention_close
from decode_grid import CORNER_CASES, HEAD_DIM_V, Case, reference_decode


def numpy_mla_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale=None,
                     causal=False):
    b, s_q, h_q, d = q.shape
    num_blocks, page, h_kv, _ = k_cache.shape
    heads_per_kv = h_q // h_kv
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    out = np.zeros((b, s_q, h_q, head_dim_v))
    lse = np.full((b, h_q, s_q), np.inf)
    for i in range(b):
        length = int(np.clip(cache_seqlens[i], 0, block_table.shape[1] * page))
        tokens = np.arange(length)
        pages = block_table[i, tokens // page]
        on_valid_page = (pages >= 0) & (pages < num_blocks)
        for j in range(s_q):
            limit = length - s_q + j + 1 if causal else length
            seen = tokens[on_valid_page & (tokens < limit)]
            if seen.size == 0:
                continue
            keys = k_cache[block_table[i, seen // page], seen % page].astype(np.float64)
            for kv in range(h_kv):
                heads = slice(kv * heads_per_kv, (kv + 1) * heads_per_kv)
                scores = q[i, j, heads].astype(np.float64) @ keys[:, kv].T * scale
                top = scores.max(axis=-1, keepdims=True)
                weights = np.exp(scores - top)
                total = weights.sum(axis=-1, keepdims=True)
                out[i, j, heads] = weights @ keys[:, kv, :head_dim_v] / total
                lse[i, heads, j] = (top + np.log(total))[:, 0]
    return out, lse


def run_reference(case, inputs):
    args = jax.device_put(tuple(inputs), jax.devices("cpu")[0])
    return reference_decode(*args, softmax_scale=case.softmax_scale, causal=case.causal)


CASES = [
    Case(b=3, s_k=100, page=16, lengths="varlen+zeros"),
    Case(b=2, s_q=4, s_k=70, h_q=4, page=7, causal=True, lengths="varlen"),
    Case(b=2, s_q=2, s_k=30, h_q=6, h_kv=2, page=1, d=512, dtype="float16"),
    Case(b=1, s_k=1, h_q=1, page=256),
    Case(b=4, s_q=3, s_k=65, h_q=3, page=32, causal=True, lengths="fixed+zeros"),
] + CORNER_CASES


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_float64_numpy(case, rng):
    inputs = case.make_inputs(rng)
    out, lse = run_reference(case, inputs)
    want_out, want_lse = numpy_mla_decode(*inputs, HEAD_DIM_V, softmax_scale=case.softmax_scale,
                                          causal=case.causal)
    assert_attention_close(out, lse, want_out, want_lse, dtype=inputs.q.dtype,
                           out_roundings=REFERENCE_OUT_ROUNDINGS, lse_atol=REFERENCE_LSE_ATOL)


def test_causal_rows_without_keys(rng):
    """Query j of s_q sees keys [0, L - s_q + j]: it sees none when L - s_q + j < 0."""
    case = Case(seqlens=(0, 1, 2, 3, 4, 70), s_q=4, h_q=2, page=16, causal=True)
    lengths = np.array(case.seqlens)[:, None, None]
    query = np.arange(case.s_q)[None, None, :]
    _, lse = run_reference(case, case.make_inputs(rng))
    expected = np.broadcast_to(lengths - case.s_q + query < 0, lse.shape)
    np.testing.assert_array_equal(np.isposinf(np.asarray(lse)), expected)

