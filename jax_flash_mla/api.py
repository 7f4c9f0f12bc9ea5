"""The public API: FlashMLA-familiar names, JAX-traceable, metadata computed on the device."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import validation
from ._constants import DISPATCH, ROWS_PER_CTA
from .primitives import mla_decode_p, mla_metadata_p

# On the CPU there are no SMs: the schedule is cut for this many virtual ones, so that the CPU
# path (what CI runs) exercises split requests and the combine like the GPU does.
CPU_VIRTUAL_SMS = 16


class MLAMetadata(NamedTuple):
    """Split-KV schedule of one decode step: reuse it for every layer of that step."""

    tile_scheduler_metadata: jax.Array  # int32 [num_sm_parts, _constants.METADATA_INTS]
    num_splits: jax.Array  # int32 [batch + 1], prefix sum of splits per request


def default_num_sm_parts(num_q_tokens_per_head_k: int, num_heads_k: int) -> int:
    """Pieces of KV work per (KV head, row block of ROWS_PER_CTA query rows) so that the whole
    grid fills the chip once."""
    device = jax.devices()[0]
    sms = getattr(device, "core_count", None) if device.platform == "gpu" else None
    sms = sms or CPU_VIRTUAL_SMS
    row_blocks = math.ceil(num_q_tokens_per_head_k / ROWS_PER_CTA)
    return max(1, sms // num_heads_k // row_blocks)


def get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k: int, num_heads_k: int, *,
                     num_sm_parts: int | None = None) -> MLAMetadata:
    """Schedules the split-KV work of one decode step, on the device (no host sync).

    Args:
      cache_seqlens: int32 [batch], cached tokens per request.
      num_q_tokens_per_head_k: seqlen_q * num_heads_q // num_heads_k.
      num_heads_k: KV heads of the cache (1 for MLA).
      num_sm_parts: pieces the work is cut into per KV head; by default derived from the SM
        count of the default device (16 virtual SMs on the CPU). Pass it explicitly when
        exporting for another machine.
    """
    validation.check_cache_seqlens(cache_seqlens)
    validation.check_positive_int("num_q_tokens_per_head_k", num_q_tokens_per_head_k)
    validation.check_positive_int("num_heads_k", num_heads_k)
    if num_sm_parts is None:
        num_sm_parts = default_num_sm_parts(num_q_tokens_per_head_k, num_heads_k)
    validation.check_positive_int("num_sm_parts", num_sm_parts)
    tsm, num_splits = mla_metadata_p.bind(jnp.asarray(cache_seqlens),
                                          num_sm_parts=int(num_sm_parts))
    return MLAMetadata(tsm, num_splits)


def _decode(q, k_cache, block_table, cache_seqlens, head_dim_v, metadata, softmax_scale, causal,
            initial_outputs=(), kernel=DISPATCH):
    """The decode primitive's call; `kernel` (a _constants.SPLIT_KV_KERNELS value) is DISPATCH
    for every call of the public API, another only through jax_flash_mla.testing."""
    validation.check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v, metadata,
                                 softmax_scale, causal)
    _, seqlen_q, num_heads_q, head_dim = q.shape
    num_heads_k = k_cache.shape[2]
    if metadata is None:
        metadata = get_mla_metadata(cache_seqlens, seqlen_q * num_heads_q // num_heads_k,
                                    num_heads_k)
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5
    out, lse = mla_decode_p.bind(
        jnp.asarray(q), jnp.asarray(k_cache), jnp.asarray(block_table), jnp.asarray(cache_seqlens),
        metadata.tile_scheduler_metadata, metadata.num_splits, *initial_outputs,
        softmax_scale=float(softmax_scale), causal=bool(causal), head_dim_v=int(head_dim_v),
        kernel=int(kernel))
    return out, lse


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v: int = 512,
                           metadata: MLAMetadata | None = None, softmax_scale: float | None = None,
                           causal: bool = False):
    """Paged MLA decode attention.

    Args:
      q: [batch, seqlen_q, num_heads_q, head_dim], bfloat16 or float16, head_dim 576 or 512.
      k_cache: [num_blocks, page_block_size, num_heads_k, head_dim], q's dtype; V is the first
        head_dim_v columns.
      block_table: int32 [batch, max_blocks_per_seq]: page of each request's i-th block.
      cache_seqlens: int32 [batch]: cached tokens per request.
      head_dim_v: 512.
      metadata: from get_mla_metadata for these cache_seqlens; computed here when None.
      softmax_scale: a finite float; defaults to head_dim ** -0.5.
      causal: for seqlen_q > 1, query j sees keys [0, L - seqlen_q + j].

    Returns:
      out [batch, seqlen_q, num_heads_q, head_dim_v] in q's dtype, and lse float32
      [batch, num_heads_q, seqlen_q] (natural log). A query that sees no key gets out = 0 and
      lse = +inf. Lengths are clamped to [0, max_blocks_per_seq * page_block_size] and pages
      outside [0, num_blocks) are masked: no int32 input reads outside the buffers.
    """
    return _decode(q, k_cache, block_table, cache_seqlens, head_dim_v, metadata, softmax_scale,
                   causal)
