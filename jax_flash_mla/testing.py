"""Test helpers: the decode with its outputs poisoned before the kernel runs.

out and lse start as NaN and are aliased into the custom call, so any element the kernels
forget to write stays NaN instead of silently holding whatever the allocator gave.
"""

from __future__ import annotations

import jax.numpy as jnp

from . import validation
from .api import _decode


def flash_mla_with_kvcache_poisoned(q, k_cache, block_table, cache_seqlens, head_dim_v=512,
                                    metadata=None, softmax_scale=None, causal=False):
    validation.check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v, metadata,
                                 softmax_scale, causal)
    batch, seqlen_q, num_heads_q, _ = q.shape
    initial_out = jnp.full((batch, seqlen_q, num_heads_q, head_dim_v), jnp.nan, q.dtype)
    initial_lse = jnp.full((batch, num_heads_q, seqlen_q), jnp.nan, jnp.float32)
    return _decode(q, k_cache, block_table, cache_seqlens, head_dim_v, metadata, softmax_scale,
                   causal, initial_outputs=(initial_out, initial_lse))
