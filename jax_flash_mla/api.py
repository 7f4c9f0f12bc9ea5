"""The public API: FlashMLA-familiar names, JAX-traceable, metadata computed on the device."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import validation
from ._constants import DISPATCH, ROWS_PER_CTA
from .primitives import mla_decode_p, mla_metadata_p, mla_sparse_decode_p

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


def get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k: int, num_heads_k: int,
                     num_heads_q: int | None = None, is_fp8_kvcache: bool = False,
                     topk: int | None = None, *, topk_length=None,
                     num_sm_parts: int | None = None) -> MLAMetadata:
    """Schedules the split-KV work of one decode step, on the device (no host sync).

    Args:
      cache_seqlens: int32 [batch], cached tokens per request. With topk, only its shape is
        read (and it may be None when topk_length is given).
      num_q_tokens_per_head_k: seqlen_q * num_heads_q // num_heads_k.
      num_heads_k: KV heads of the cache (1 for MLA).
      num_heads_q, is_fp8_kvcache, topk: FlashMLA's arguments of a sparse-decode schedule
        (DeepSeek-V3.2): with topk (indices.shape[-1]) the schedule is the sparse decode's, one
        request per query token of topk_length[b] (or topk) tokens; num_heads_q is then
        required. is_fp8_kvcache does not change the schedule.
      topk_length: int32 [batch] or None, as passed to the sparse decode.
      num_sm_parts: pieces the work is cut into per KV head; by default derived from the SM
        count of the default device (16 virtual SMs on the CPU). Pass it explicitly when
        exporting for another machine.
    """
    validation.check_positive_int("num_q_tokens_per_head_k", num_q_tokens_per_head_k)
    validation.check_positive_int("num_heads_k", num_heads_k)
    validation.check_bool("is_fp8_kvcache", is_fp8_kvcache)
    if topk is not None:
        return _sparse_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q,
                                topk, topk_length, num_sm_parts)
    if topk_length is not None:
        raise ValueError(f"topk_length: expected None without topk (it belongs to a sparse "
                         f"schedule), got {validation.described(topk_length)}")
    validation.check_cache_seqlens(cache_seqlens)
    if num_sm_parts is None:
        num_sm_parts = default_num_sm_parts(num_q_tokens_per_head_k, num_heads_k)
    validation.check_positive_int("num_sm_parts", num_sm_parts)
    tsm, num_splits = mla_metadata_p.bind(jnp.asarray(cache_seqlens),
                                          num_sm_parts=int(num_sm_parts))
    return MLAMetadata(tsm, num_splits)


def sparse_lengths(topk_length, batch: int, seqlen_q: int, topk: int):
    """int32 [batch, seqlen_q]: the slots each query token attends over, topk_length[b] clamped
    to [0, topk] (topk without topk_length). The sparse decode's schedule and its kernels both
    take these, so the two cannot disagree."""
    if topk_length is None:
        return jnp.full((batch, seqlen_q), topk, jnp.int32)
    lengths = jnp.clip(jnp.asarray(topk_length), 0, topk).astype(jnp.int32)
    return jnp.broadcast_to(lengths[:, None], (batch, seqlen_q))


def sparse_metadata_for_lengths(lengths, num_heads_q: int, num_sm_parts: int | None = None):
    """The sparse decode's schedule for lengths [batch, seqlen_q]: one request per query token,
    whose num_heads_q rows share its keys."""
    if num_sm_parts is None:
        num_sm_parts = default_num_sm_parts(num_heads_q, 1)
    validation.check_positive_int("num_sm_parts", num_sm_parts)
    tsm, num_splits = mla_metadata_p.bind(lengths.reshape(-1), num_sm_parts=int(num_sm_parts))
    return MLAMetadata(tsm, num_splits)


def _sparse_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q, topk,
                     topk_length, num_sm_parts):
    validation.check_positive_int("topk", topk)
    if num_heads_q is None:
        raise TypeError("num_heads_q: expected a positive Python int with topk (a sparse "
                        "schedule needs the query heads), got None")
    validation.check_positive_int("num_heads_q", num_heads_q)
    if num_heads_k != 1:
        raise ValueError(f"num_heads_k: expected 1 with topk (sparse decode attends to one "
                         f"latent per token), got {num_heads_k}")
    if num_q_tokens_per_head_k % num_heads_q:
        raise ValueError(f"num_q_tokens_per_head_k: expected seqlen_q * num_heads_q, a multiple "
                         f"of num_heads_q={num_heads_q}, got {num_q_tokens_per_head_k}")
    if topk_length is not None:
        validation.check_int32("topk_length", topk_length)
        validation.check_rank("topk_length", topk_length, 1, "[batch]")
        batch = topk_length.shape[0]
    elif cache_seqlens is not None:
        validation.check_cache_seqlens(cache_seqlens)
        batch = cache_seqlens.shape[0]
    else:
        raise TypeError("cache_seqlens: expected an int32 [batch] array (or topk_length) to "
                        "give the batch of a sparse schedule, got None")
    lengths = sparse_lengths(topk_length, batch, num_q_tokens_per_head_k // num_heads_q, topk)
    return sparse_metadata_for_lengths(lengths, num_heads_q, num_sm_parts)


def _decode(q, k_cache, block_table, cache_seqlens, head_dim_v, metadata, softmax_scale, causal,
            is_fp8_kvcache=False, initial_outputs=(), kernel=DISPATCH):
    """The decode primitive's call; `kernel` (a _constants.SPLIT_KV_KERNELS value) is DISPATCH
    for every call of the public API, another only through jax_flash_mla.testing. The
    primitive needs no flag for an FP8 cache: its dtype (uint8 or float8_e4m3fn) says it."""
    validation.check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v, metadata,
                                 softmax_scale, causal, is_fp8_kvcache)
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


def _sparse_decode(q, k_cache, head_dim_v, metadata, softmax_scale, causal, is_fp8_kvcache,
                   indices, topk_length, attn_sink, initial_outputs=()):
    """The sparse-decode primitive's call (DeepSeek-V3.2's top-k attention)."""
    validation.check_sparse_decode_args(q, k_cache, head_dim_v, softmax_scale, causal,
                                        is_fp8_kvcache, indices, topk_length, attn_sink)
    validation.check_sparse_pool(k_cache)
    batch, seqlen_q, num_heads_q, head_dim = q.shape
    lengths = sparse_lengths(topk_length, batch, seqlen_q, indices.shape[2])
    if metadata is None:
        metadata = sparse_metadata_for_lengths(lengths, num_heads_q)
    else:
        validation.check_metadata(metadata, batch * seqlen_q, sparse=True)
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5
    if attn_sink is None:  # a sink of -inf scales every output by exactly 1
        attn_sink = jnp.full((num_heads_q,), -jnp.inf, jnp.float32)
    out, lse = mla_sparse_decode_p.bind(
        jnp.asarray(q), jnp.asarray(k_cache), jnp.asarray(indices), lengths,
        jnp.asarray(attn_sink), metadata.tile_scheduler_metadata, metadata.num_splits,
        *initial_outputs, softmax_scale=float(softmax_scale),
        is_fp8_kvcache=bool(is_fp8_kvcache), head_dim_v=int(head_dim_v))
    return out, lse


def flash_mla_with_kvcache(q, k_cache, block_table=None, cache_seqlens=None,
                           head_dim_v: int = 512, metadata: MLAMetadata | None = None,
                           softmax_scale: float | None = None, causal: bool = False,
                           is_fp8_kvcache: bool = False, indices=None, topk_length=None,
                           attn_sink=None):
    """Paged MLA decode attention: dense over each request's pages, or sparse (DeepSeek-V3.2)
    over the tokens `indices` names.

    Args:
      q: [batch, seqlen_q, num_heads_q, head_dim], bfloat16 or float16, head_dim 576 or 512
        (sparse: bfloat16, 576).
      k_cache: [num_blocks, page_block_size, num_heads_k, head_dim], q's dtype; V is the first
        head_dim_v columns. With is_fp8_kvcache (dense or sparse): [num_blocks,
        page_block_size, 1, 656] in the FP8 layout (uint8 or float8_e4m3fn;
        quantize_fp8_kvcache writes it), read by bfloat16 q of head_dim 576. Sparse: num_heads_k
        1.
      block_table: int32 [batch, max_blocks_per_seq]: page of each request's i-th block.
        Unused by sparse decode (the indices hold the pages).
      cache_seqlens: int32 [batch]: cached tokens per request. Unused by sparse decode.
      head_dim_v: 512.
      metadata: from get_mla_metadata for these cache_seqlens (sparse: with topk and the same
        topk_length); computed here when None.
      softmax_scale: a finite float; defaults to head_dim ** -0.5.
      causal: for seqlen_q > 1, query j sees keys [0, L - seqlen_q + j]. Dense only.
      is_fp8_kvcache: k_cache is in DeepSeek-V3.2's FP8 layout, dequantized as it is read.
      indices: int32 [batch, seqlen_q, topk], topk >= 1: sparse decode. Query token (b, s)
        attends over the tokens indices[b, s, :topk_length[b]], each page_id *
        page_block_size + offset into the pool; an index < 0 or past the pool counts nothing
        and is never read. A token named twice counts twice.
      topk_length: int32 [batch] or None: only the first topk_length[b] slots count (clamped
        to [0, topk]).
      attn_sink: float32 [num_heads_q] or None: a logit per head that joins the softmax's
        denominator only: out *= 1 / (1 + exp(attn_sink - lse)); lse is unchanged.

    Returns:
      out [batch, seqlen_q, num_heads_q, head_dim_v] in q's dtype, and lse float32
      [batch, num_heads_q, seqlen_q] (natural log). A query that sees no key gets out = 0 and
      lse = +inf. Dense: lengths are clamped to [0, max_blocks_per_seq * page_block_size] and
      pages outside [0, num_blocks) are masked: no int32 input reads outside the buffers.
    """
    if indices is not None:
        return _sparse_decode(q, k_cache, head_dim_v, metadata, softmax_scale, causal,
                              is_fp8_kvcache, indices, topk_length, attn_sink)
    validation.check_dense_decode_only(block_table, cache_seqlens, topk_length, attn_sink)
    return _decode(q, k_cache, block_table, cache_seqlens, head_dim_v, metadata, softmax_scale,
                   causal, is_fp8_kvcache)
