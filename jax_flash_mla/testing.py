"""Test helpers: the decode with its outputs poisoned before the kernel runs, and the route that
forces one split-KV kernel.

out and lse start as NaN and are aliased into the custom call, so any element the kernels
forget to write stays NaN instead of silently holding whatever the allocator gave.

`kernel` names the split-KV kernel the CUDA handler runs instead of the one its dispatch rules
pick (cpp/sm90/heuristics.h), so that the tests run every kernel on the same cases; where the
forced kernel cannot run the call the handler fails with an error naming `kernel`. The CPU
handler has one implementation for all of them and gives the same answer whatever the name.
The public API has no such argument: outside the tests the rules always pick.
"""

from __future__ import annotations

import jax.numpy as jnp

from . import validation
from ._constants import SPLIT_KV_KERNELS
from ._jax_flash_mla import choose_split_kv_kernel, runnable_split_kv_kernels
from .api import _decode, _sparse_decode
from .sparse_prefill import _sparse_prefill

__all__ = [
    "SPLIT_KV_KERNELS",
    "choose_split_kv_kernel",
    "flash_mla_with_kvcache_poisoned",
    "sparse_decode_poisoned",
    "sparse_prefill_poisoned",
    "runnable_split_kv_kernels",
    "split_kv_kernel_value",
]


def split_kv_kernel_value(kernel: str) -> int:
    """The `kernel` attribute's value for a kernel's name (a key of SPLIT_KV_KERNELS)."""
    if not isinstance(kernel, str) or kernel not in SPLIT_KV_KERNELS:
        raise ValueError(f"kernel: expected one of {', '.join(map(repr, SPLIT_KV_KERNELS))}, "
                         f"got {kernel!r}")
    return SPLIT_KV_KERNELS[kernel]


def flash_mla_with_kvcache_poisoned(q, k_cache, block_table, cache_seqlens, head_dim_v=512,
                                    metadata=None, softmax_scale=None, causal=False,
                                    is_fp8_kvcache=False, *, kernel: str = "dispatch"):
    """flash_mla_with_kvcache (dense) with NaN-filled outputs, run by the split-KV kernel
    `kernel`."""
    kernel_value = split_kv_kernel_value(kernel)
    validation.check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v, metadata,
                                 softmax_scale, causal, is_fp8_kvcache)
    batch, seqlen_q, num_heads_q, _ = q.shape
    initial_out = jnp.full((batch, seqlen_q, num_heads_q, head_dim_v), jnp.nan, q.dtype)
    initial_lse = jnp.full((batch, num_heads_q, seqlen_q), jnp.nan, jnp.float32)
    return _decode(q, k_cache, block_table, cache_seqlens, head_dim_v, metadata, softmax_scale,
                   causal, is_fp8_kvcache, initial_outputs=(initial_out, initial_lse),
                   kernel=kernel_value)


def sparse_decode_poisoned(q, k_cache, indices, *, head_dim_v=512, metadata=None,
                           softmax_scale=None, is_fp8_kvcache=False, topk_length=None,
                           attn_sink=None):
    """flash_mla_with_kvcache(q, k_cache, indices=indices, ...) with NaN-filled outputs."""
    batch, seqlen_q, num_heads_q, _ = q.shape
    initial_out = jnp.full((batch, seqlen_q, num_heads_q, head_dim_v), jnp.nan, jnp.bfloat16)
    initial_lse = jnp.full((batch, seqlen_q, num_heads_q), jnp.nan, jnp.float32)  # query-major
    return _sparse_decode(q, k_cache, head_dim_v, metadata, softmax_scale, False,
                          is_fp8_kvcache, indices, topk_length, attn_sink,
                          initial_outputs=(initial_out, initial_lse))


def sparse_prefill_poisoned(q, kv, indices, sm_scale, d_v=512, attn_sink=None,
                            topk_length=None):
    """flash_mla_sparse_fwd with NaN-filled outputs."""
    return _sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink, topk_length, poisoned=True)
