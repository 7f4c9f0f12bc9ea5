"""Pure-jnp paged MLA decode: the oracle the kernels are tested against.

Dense decode: the signature and the rules of `jax_flash_mla.flash_mla_with_kvcache` (lengths
clamped to the table's capacity, invalid pages masked, out = 0 and lse = +inf for a query that
sees no key), computed in float32 with full-precision matmuls; an FP8 cache (is_fp8_kvcache)
is dequantized to float32 first. It gathers every request's pages
into a dense [batch, capacity, ...] array, so it is also the plain-JAX baseline of the
benchmark.

Sparse decode (DeepSeek-V3.2, `indices` given): FlashMLA's keywords and contract (DESIGN.md),
also in float32; it gathers the selected tokens, dequantizes them and attends to them.

Sparse prefill (DeepSeek-V3.2, FlashMLA's flash_mla_sparse_fwd): the same gather and attention,
with each query token a decode request of its own and each kv row a page of one token.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from . import fp8_cache, validation

_HIGHEST = jax.lax.Precision.HIGHEST
_INT32_MAX = int(np.iinfo(np.int32).max)


def flash_mla_with_kvcache(q, k_cache, block_table=None, cache_seqlens=None, head_dim_v=512,
                           metadata=None, softmax_scale=None, causal=False, is_fp8_kvcache=False,
                           indices=None, topk_length=None, attn_sink=None):
    """Dense decode without `indices` (block_table and cache_seqlens then required), sparse
    decode with them (block_table and cache_seqlens unused, as in FlashMLA: the block table is
    folded into the indices). See sparse_decode for the sparse arguments."""
    del metadata  # the reference needs no schedule
    if indices is None:
        validation.check_dense_decode_only(block_table, cache_seqlens, topk_length, attn_sink)
        return _dense_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale,
                             causal, is_fp8_kvcache)
    validation.check_sparse_decode_args(q, k_cache, head_dim_v, softmax_scale, causal,
                                        is_fp8_kvcache, indices, topk_length, attn_sink)
    return sparse_decode(q, k_cache, head_dim_v, softmax_scale, is_fp8_kvcache, indices,
                          topk_length, attn_sink)


def _dense_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                  is_fp8_kvcache=False):
    validation.check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v, None,
                                 softmax_scale, causal, is_fp8_kvcache)
    batch, seqlen_q, num_heads_q, head_dim = q.shape
    num_blocks, page_block_size, num_heads_k, _ = k_cache.shape
    heads_per_kv = num_heads_q // num_heads_k
    capacity = block_table.shape[1] * page_block_size
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5

    seqlens = jnp.clip(cache_seqlens, 0, capacity)
    token = jnp.arange(capacity)
    pages = block_table[:, token // page_block_size]  # [batch, capacity]
    page_ok = (pages >= 0) & (pages < num_blocks)
    key_ok = page_ok & (token[None, :] < seqlens[:, None])
    keys = k_cache[jnp.where(page_ok, pages, 0), token % page_block_size]  # [b, t, h_kv, d]
    keys = (fp8_cache.dequantize_fp8_kvcache(keys, jnp.float32) if is_fp8_kvcache
            else keys.astype(jnp.float32))
    # Zero what may not be read: masked tokens may hold NaN, and 0 * NaN is NaN.
    keys = jnp.where(key_ok[:, :, None, None], keys, 0.0)

    qf = q.astype(jnp.float32).reshape(batch, seqlen_q, num_heads_k, heads_per_kv, head_dim)
    scores = jnp.einsum("bqhgd,bthd->bhgqt", qf, keys, precision=_HIGHEST) * softmax_scale
    visible = key_ok[:, None, None, None, :]
    if causal:
        query = jnp.arange(seqlen_q)
        limit = seqlens[:, None] - seqlen_q + query[None, :] + 1  # [b, s_q]
        visible = visible & (token[None, None, :] < limit[:, :, None])[:, None, None, :, :]
    scores = jnp.where(visible, scores, -jnp.inf)

    row_max = jnp.max(scores, axis=-1, keepdims=True)
    saw_key = row_max > -jnp.inf
    weights = jnp.where(visible, jnp.exp(scores - jnp.where(saw_key, row_max, 0.0)), 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    values = keys[..., :head_dim_v]
    out = jnp.einsum("bhgqt,bthv->bhgqv", weights, values, precision=_HIGHEST)
    out = jnp.where(saw_key, out / jnp.where(saw_key, total, 1.0), 0.0)
    lse = jnp.where(saw_key, row_max + jnp.log(jnp.where(saw_key, total, 1.0)), jnp.inf)[..., 0]

    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, seqlen_q, num_heads_q, head_dim_v)
    lse = lse.reshape(batch, num_heads_q, seqlen_q)
    return out.astype(q.dtype), lse


def _selected_slots(indices, topk_length, pool_tokens: int):
    """bool [b, s_q, topk]: the slots that count. An index counts when it is in
    [0, pool_tokens) and its slot is among the request's first topk_length[b] (or, for a
    topk_length [b, s_q], its query token's first topk_length[b, s])."""
    selected = indices >= 0
    if pool_tokens <= _INT32_MAX:  # otherwise every non-negative int32 is inside the pool
        selected &= indices < pool_tokens
    if topk_length is not None:
        slot = jnp.arange(indices.shape[2], dtype=jnp.int32)
        limit = topk_length[:, None, None] if topk_length.ndim == 1 else topk_length[..., None]
        selected &= slot[None, None, :] < limit
    return selected


def sparse_decode(q, k_cache, head_dim_v, softmax_scale, is_fp8_kvcache, indices, topk_length,
                   attn_sink):
    """Sparse decode of DeepSeek-V3.2, as FlashMLA's flash_mla_with_kvcache with indices.

    q: bfloat16 [b, s_q, h_q, 576]. k_cache: [num_blocks, page, 1, 656] uint8 or float8_e4m3fn
    (is_fp8_kvcache=True, the layout of fp8_cache) or bfloat16 [num_blocks, page, 1, 576].
    indices: int32 [b, s_q, topk], each page_id * page + offset into the pool. A slot counts
    when its index is in [0, num_blocks * page) and, given topk_length (int32 [b]), the slot is
    among the first topk_length[b]; every other slot contributes nothing and its token is never
    used (NaN there does not reach the result). A token selected twice counts twice; NaN in a
    counted token makes its query's out and lse NaN.
    attn_sink: float32 [h_q] or None: one more logit per head that joins the softmax's
    denominator only: out *= 1 / (1 + exp(attn_sink - lse)) = exp(lse) / (exp(lse) +
    exp(attn_sink)); lse is unchanged. -inf changes nothing, +inf makes out 0.

    Returns out [b, s_q, h_q, 512] in q's dtype and lse float32 [b, h_q, s_q], natural log of
    the sum of exp(scores) over the counted slots. A query with no counted slot gets out = 0
    and lse = +inf, with or without a sink (as FlashMLA's reference, tests/ref.py).
    """
    out, lse, _ = _sparse_attention(q, k_cache, head_dim_v, softmax_scale, is_fp8_kvcache,
                                    indices, topk_length, attn_sink)
    return out, lse


def _sparse_attention(q, k_cache, head_dim_v, softmax_scale, is_fp8_kvcache, indices,
                      topk_length, attn_sink):
    """sparse_decode's (out, lse), and max_logits float32 [b, s_q, h_q]: the largest counted
    score, -inf where no slot counts (the sink does not join it)."""
    head_dim = q.shape[3]
    num_blocks, page_block_size, _, token_width = k_cache.shape
    pool_tokens = num_blocks * page_block_size
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5

    selected = _selected_slots(indices, topk_length, pool_tokens)
    rows = k_cache.reshape(pool_tokens, token_width)
    # Unselected slots read token 0 (in bounds) and are zeroed: a masked token may hold NaN.
    gathered = rows[jnp.where(selected, indices, 0)]  # [b, s_q, topk, width]
    keys = (fp8_cache.dequantize_fp8_kvcache(gathered, jnp.float32) if is_fp8_kvcache
            else gathered.astype(jnp.float32))
    keys = jnp.where(selected[..., None], keys, 0.0)

    qf = q.astype(jnp.float32)
    scores = jnp.einsum("bqhd,bqtd->bqht", qf, keys, precision=_HIGHEST) * softmax_scale
    counted = selected[:, :, None, :]
    scores = jnp.where(counted, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    # From the selection, not from row_max: NaN in a counted token must reach the result.
    saw_key = jnp.any(counted, axis=-1, keepdims=True)
    weights = jnp.where(counted, jnp.exp(scores - jnp.where(saw_key, row_max, 0.0)), 0.0)
    total = jnp.where(saw_key, jnp.sum(weights, axis=-1, keepdims=True), 1.0)
    out = jnp.einsum("bqht,bqtv->bqhv", weights, keys[..., :head_dim_v], precision=_HIGHEST)
    out = out / total
    lse = jnp.where(saw_key, row_max + jnp.log(total), jnp.inf)  # [b, s_q, h_q, 1]
    if attn_sink is not None:
        sink = attn_sink.astype(jnp.float32)[None, None, :, None]
        out = out / (1.0 + jnp.exp(sink - jnp.where(saw_key, lse, 0.0)))
    out = jnp.where(saw_key, out, 0.0)
    return out.astype(q.dtype), lse[..., 0].transpose(0, 2, 1), row_max[..., 0]


def flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None):
    """Sparse prefill of DeepSeek-V3.2, as FlashMLA's flash_mla_sparse_fwd.

    q: bfloat16 [s_q, h_q, 576]. kv: bfloat16 [s_kv, 1, 576], V its first d_v = 512 columns.
    indices: int32 [s_q, 1, topk]: query token i attends to the kv rows
    indices[i, 0, :topk_length[i]] (all topk without topk_length, int32 [s_q]; a length below 0
    counts as 0, above topk as topk). An index outside [0, s_kv) counts for nothing and its row
    is never used; a row named twice counts twice. sm_scale: the scale of q . k, required (as in
    FlashMLA). attn_sink: float32 [h_q] or None, as in sparse_decode: out *= 1 / (1 +
    exp(attn_sink - lse)); lse and max_logits are unchanged.

    Returns out bfloat16 [s_q, h_q, 512], max_logits float32 [s_q, h_q] (the largest counted
    sm_scale * q . k) and lse float32 [s_q, h_q] (natural log of the sum of exp of those
    scores). A token with no counted slot gets out 0, max_logits -inf and lse +inf.
    """
    validation.check_sparse_prefill_args(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)
    # Query token i is decode request i of one token and kv row t is page t of one token, so
    # the indices [s_q, 1, topk] are the decode's [batch, seqlen_q = 1, topk] as they stand.
    # float(): a NumPy float64 scale would otherwise be a strongly typed operand of the scores.
    out, lse, max_logits = _sparse_attention(q[:, None], kv[:, None], d_v, float(sm_scale),
                                             False, indices, topk_length, attn_sink)
    return out[:, 0], max_logits[:, 0], lse[..., 0]
