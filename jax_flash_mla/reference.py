"""Pure-jnp paged MLA decode: the oracle the kernels are tested against.

Same signature and the same rules as `jax_flash_mla.flash_mla_with_kvcache` (lengths clamped
to the table's capacity, invalid pages masked, out = 0 and lse = +inf for a query that sees no
key), computed in float32 with full-precision matmuls. It gathers every request's pages into
a dense [batch, capacity, ...] array, so it is also the plain-JAX baseline of the benchmark.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import validation

_HIGHEST = jax.lax.Precision.HIGHEST


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v=512, metadata=None,
                           softmax_scale=None, causal=False):
    del metadata  # the reference needs no schedule
    validation.check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v, None,
                                 softmax_scale, causal)
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
    # Zero what may not be read: masked tokens may hold NaN, and 0 * NaN is NaN.
    keys = jnp.where(key_ok[:, :, None, None], keys.astype(jnp.float32), 0.0)

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
