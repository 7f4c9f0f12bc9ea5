"""Trace-time checks of the public API's arguments.

Every message names the argument, what was expected and what was given, so a user can fix
the call without reading this file. Shapes and dtypes are known at trace time, so these run
under `jax.jit` before anything is compiled. The command line's integer options are checked
here too, in the same words, through argparse.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import jax.numpy as jnp

from . import fp8_cache
from ._constants import METADATA_INTS

SUPPORTED_HEAD_DIMS = (576, 512)
SUPPORTED_HEAD_DIM_V = 512
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
# Sparse decode serves DeepSeek-V3.2: bfloat16 queries over 576-wide latents, as FlashMLA's.
SPARSE_DTYPE = jnp.bfloat16
SPARSE_HEAD_DIM = fp8_cache.LATENT_DIM


def _dtype_name(x) -> str:
    return np.dtype(x.dtype).name


def described(x) -> str:
    if hasattr(x, "dtype") and hasattr(x, "shape"):
        return f"{_dtype_name(x)} of shape {tuple(x.shape)}"
    return type(x).__name__


def check_rank(name: str, x, rank: int, layout: str) -> None:
    if np.ndim(x) != rank:
        raise ValueError(f"{name}: expected rank {rank} {layout}, got shape {tuple(np.shape(x))}")


def check_int32(name: str, x) -> None:
    if not hasattr(x, "dtype") or np.dtype(x.dtype) != np.int32:
        got = _dtype_name(x) if hasattr(x, "dtype") else type(x).__name__
        raise TypeError(f"{name}: expected dtype int32, got {got}")


def check_cache_seqlens(cache_seqlens) -> None:
    check_int32("cache_seqlens", cache_seqlens)
    check_rank("cache_seqlens", cache_seqlens, 1, "[batch]")


def check_bool(name: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a Python bool, got {type(value).__name__}")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive Python int, got {value!r}")


def check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v, metadata,
                      softmax_scale, causal, is_fp8_kvcache=False) -> None:
    """Dense decode; with is_fp8_kvcache the cache holds DeepSeek-V3.2's 656-byte FP8 tokens,
    read by bfloat16 queries of 576 columns through one KV head."""
    check_bool("is_fp8_kvcache", is_fp8_kvcache)
    check_rank("q", q, 4, "[batch, seqlen_q, num_heads_q, head_dim]")
    check_rank("k_cache", k_cache, 4, "[num_blocks, page_block_size, num_heads_k, head_dim]")
    if np.dtype(q.dtype) not in [np.dtype(d) for d in SUPPORTED_DTYPES]:
        raise TypeError(f"q: expected dtype bfloat16 or float16, got {_dtype_name(q)}")
    batch, _, num_heads_q, head_dim = q.shape
    _, page_block_size, num_heads_k, cache_head_dim = k_cache.shape
    if is_fp8_kvcache:
        check_fp8_cache(q, k_cache, "decode")
    else:
        check_cache_dtype_is_qs(q, k_cache)
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"q: expected head_dim 576 or 512 (last axis), got {head_dim}")
        if cache_head_dim != head_dim:
            raise ValueError(
                f"k_cache: expected head_dim {head_dim} (as q), got {cache_head_dim}")
    if isinstance(head_dim_v, bool) or head_dim_v != SUPPORTED_HEAD_DIM_V:
        raise ValueError(f"head_dim_v: expected {SUPPORTED_HEAD_DIM_V}, got {head_dim_v!r}")
    if page_block_size < 1:
        raise ValueError(f"k_cache: expected page_block_size >= 1 (axis 1), got {page_block_size}")
    if num_heads_k < 1 or num_heads_q % num_heads_k:
        raise ValueError(
            f"k_cache: expected num_heads_k dividing num_heads_q={num_heads_q}, got {num_heads_k}")
    check_int32("block_table", block_table)
    check_rank("block_table", block_table, 2, "[batch, max_blocks_per_seq]")
    if block_table.shape[0] != batch:
        raise ValueError(
            f"block_table: expected batch {batch} (q.shape[0]) on axis 0, got shape "
            f"{tuple(block_table.shape)}")
    check_cache_seqlens(cache_seqlens)
    if cache_seqlens.shape[0] != batch:
        raise ValueError(
            f"cache_seqlens: expected shape ({batch},) (q.shape[0]), got "
            f"{tuple(cache_seqlens.shape)}")
    if metadata is not None:
        check_metadata(metadata, batch)
    check_softmax_scale(softmax_scale)
    check_bool("causal", causal)


def check_cache_dtype_is_qs(q, k_cache) -> None:
    """Without is_fp8_kvcache the cache holds q's dtype; an FP8 one is pointed at the flag."""
    if np.dtype(k_cache.dtype) != np.dtype(q.dtype):
        hint = (" (an FP8 cache needs is_fp8_kvcache=True)"
                if np.dtype(k_cache.dtype) in fp8_cache.PACKED_DTYPES else "")
        raise TypeError(f"k_cache: expected dtype {_dtype_name(q)} (the dtype of q) with "
                        f"is_fp8_kvcache=False, got {_dtype_name(k_cache)}{hint}")


def check_fp8_cache(q, k_cache, what: str) -> None:
    """An FP8 cache (is_fp8_kvcache=True) of `what` (decode, sparse decode): 656-byte tokens
    of one KV head, read by bfloat16 queries of 576 columns."""
    if np.dtype(q.dtype) != np.dtype(SPARSE_DTYPE):
        raise TypeError(f"q: expected dtype bfloat16 with is_fp8_kvcache=True, got "
                        f"{_dtype_name(q)}")
    if q.shape[3] != SPARSE_HEAD_DIM:
        raise ValueError(f"q: expected head_dim {SPARSE_HEAD_DIM} (last axis; the FP8 cache holds "
                         f"DeepSeek-V3.2's latents), got {q.shape[3]}")
    if np.dtype(k_cache.dtype) not in fp8_cache.PACKED_DTYPES:
        raise TypeError(f"k_cache: expected dtype uint8 or float8_e4m3fn with "
                        f"is_fp8_kvcache=True, got {_dtype_name(k_cache)}")
    if k_cache.shape[2] != 1:
        raise ValueError(f"k_cache: expected num_heads_k 1 (axis 2; the FP8 cache holds one "
                         f"latent per token) for {what}, got {k_cache.shape[2]}")
    if k_cache.shape[3] != fp8_cache.FP8_BYTES_PER_TOKEN:
        raise ValueError(f"k_cache: expected {fp8_cache.FP8_BYTES_PER_TOKEN} bytes per token "
                         f"(last axis, the FP8 layout) with is_fp8_kvcache=True, got "
                         f"{k_cache.shape[3]}")
    check_sparse_pool(k_cache)


def check_dense_decode_only(block_table, cache_seqlens, topk_length, attn_sink) -> None:
    """Without indices the decode is dense: it reads pages through block_table, and the
    arguments of sparse decode must be left unset rather than silently ignored."""
    for name, value in (("topk_length", topk_length), ("attn_sink", attn_sink)):
        if value is not None:
            raise ValueError(f"{name}: expected None without indices (it belongs to sparse "
                             f"decode), got {described(value)}")
    for name, value in (("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        if value is None:
            raise TypeError(f"{name}: expected an int32 array (dense decode reads pages through "
                            f"it; pass indices for sparse decode), got None")


def check_sparse_decode_args(q, k_cache, head_dim_v, softmax_scale, causal, is_fp8_kvcache,
                             indices, topk_length, attn_sink) -> None:
    """Sparse (top-k) decode, DeepSeek-V3.2: FlashMLA's contract (DESIGN.md) without its limits
    on num_heads_q and topk."""
    check_bool("is_fp8_kvcache", is_fp8_kvcache)
    check_bool("causal", causal)
    if causal:
        raise ValueError("causal: expected False with indices (sparse decode has no mask: the "
                         "indices say which tokens each query sees), got True")
    check_rank("q", q, 4, f"[batch, seqlen_q, num_heads_q, {SPARSE_HEAD_DIM}]")
    check_rank("k_cache", k_cache, 4, "[num_blocks, page_block_size, 1, bytes or head_dim]")
    if np.dtype(q.dtype) != np.dtype(SPARSE_DTYPE):
        raise TypeError(f"q: expected dtype bfloat16 (sparse decode), got {_dtype_name(q)}")
    batch, seqlen_q, num_heads_q, head_dim = q.shape
    if head_dim != SPARSE_HEAD_DIM:
        raise ValueError(f"q: expected head_dim {SPARSE_HEAD_DIM} (last axis; sparse decode "
                         f"takes DeepSeek-V3.2's latents), got {head_dim}")
    num_blocks, page_block_size, num_heads_k, token_width = k_cache.shape
    if num_heads_k != 1:
        raise ValueError(f"k_cache: expected num_heads_k 1 (axis 2; sparse decode attends to "
                         f"one latent per token), got {num_heads_k}")
    if num_blocks < 1 or page_block_size < 1:
        raise ValueError(f"k_cache: expected num_blocks >= 1 and page_block_size >= 1 (axes 0 "
                         f"and 1), got shape {tuple(k_cache.shape)}")
    if is_fp8_kvcache:
        check_fp8_cache(q, k_cache, "sparse decode")
    else:
        check_cache_dtype_is_qs(q, k_cache)
        if token_width != head_dim:
            raise ValueError(f"k_cache: expected head_dim {head_dim} (as q) with "
                             f"is_fp8_kvcache=False, got {token_width}")
    if isinstance(head_dim_v, bool) or head_dim_v != SUPPORTED_HEAD_DIM_V:
        raise ValueError(f"head_dim_v: expected {SUPPORTED_HEAD_DIM_V}, got {head_dim_v!r}")
    check_int32("indices", indices)
    check_rank("indices", indices, 3, "[batch, seqlen_q, topk]")
    if tuple(indices.shape[:2]) != (batch, seqlen_q) or indices.shape[2] < 1:
        raise ValueError(f"indices: expected shape ({batch}, {seqlen_q}, topk) with topk >= 1 "
                         f"(batch and seqlen_q of q), got {tuple(indices.shape)}")
    if topk_length is not None:
        check_int32("topk_length", topk_length)
        if tuple(np.shape(topk_length)) != (batch,):
            raise ValueError(f"topk_length: expected shape ({batch},) (q.shape[0]), got "
                             f"{tuple(np.shape(topk_length))}")
    if attn_sink is not None:
        if not hasattr(attn_sink, "dtype") or np.dtype(attn_sink.dtype) != np.float32:
            raise TypeError(f"attn_sink: expected dtype float32, got {described(attn_sink)}")
        if tuple(np.shape(attn_sink)) != (num_heads_q,):
            raise ValueError(f"attn_sink: expected shape ({num_heads_q},) (num_heads_q, "
                             f"q.shape[2]), got {tuple(np.shape(attn_sink))}")
    check_softmax_scale(softmax_scale)


def check_sparse_prefill_args(q, kv, indices, sm_scale, d_v, attn_sink, topk_length) -> None:
    """flash_mla_sparse_fwd's arguments: FlashMLA's contract without its limits on h_q and
    topk. Each message names the argument, then what was expected, then what was given."""
    latent_dim = SPARSE_HEAD_DIM
    check_rank("q", q, 3, f"[s_q, h_q, {latent_dim}]")
    if np.dtype(q.dtype) != np.dtype(SPARSE_DTYPE):
        raise TypeError(f"q: expected dtype bfloat16 (sparse prefill), got "
                        f"{np.dtype(q.dtype).name}")
    s_q, h_q, head_dim = q.shape
    if head_dim != latent_dim:
        raise ValueError(f"q: expected head_dim {latent_dim} (last axis; sparse prefill takes "
                         f"DeepSeek-V3.2's latents), got {head_dim}")
    check_rank("kv", kv, 3, f"[s_kv, 1, {latent_dim}]")
    if np.dtype(kv.dtype) != np.dtype(q.dtype):
        raise TypeError(f"kv: expected dtype bfloat16 (the dtype of q), got "
                        f"{np.dtype(kv.dtype).name}")
    s_kv, h_kv, kv_dim = kv.shape
    if h_kv != 1:
        raise ValueError(f"kv: expected h_kv 1 (axis 1; one latent per token, shared by every "
                         f"head), got {h_kv}")
    if s_kv < 1 or kv_dim != head_dim:
        raise ValueError(f"kv: expected shape (s_kv, 1, {head_dim}) with s_kv >= 1 (head_dim "
                         f"as q), got {tuple(kv.shape)}")
    check_int32("indices", indices)
    check_rank("indices", indices, 3, "[s_q, 1, topk]")
    if tuple(indices.shape[:2]) != (s_q, 1) or indices.shape[2] < 1:
        raise ValueError(f"indices: expected shape ({s_q}, 1, topk) with topk >= 1 (s_q of q, "
                         f"h_kv 1), got {tuple(indices.shape)}")
    if isinstance(d_v, bool) or d_v != SUPPORTED_HEAD_DIM_V:
        raise ValueError(f"d_v: expected {SUPPORTED_HEAD_DIM_V}, got {d_v!r}")
    _check_sm_scale(sm_scale)
    if attn_sink is not None:
        if not hasattr(attn_sink, "dtype") or np.dtype(attn_sink.dtype) != np.float32:
            raise TypeError(f"attn_sink: expected dtype float32, got "
                            f"{described(attn_sink)}")
        if tuple(np.shape(attn_sink)) != (h_q,):
            raise ValueError(f"attn_sink: expected shape ({h_q},) (h_q, q.shape[1]), got "
                             f"{tuple(np.shape(attn_sink))}")
    if topk_length is not None:
        check_int32("topk_length", topk_length)
        if tuple(np.shape(topk_length)) != (s_q,):
            raise ValueError(f"topk_length: expected shape ({s_q},) (s_q, q.shape[0]), got "
                             f"{tuple(np.shape(topk_length))}")


def _check_sm_scale(sm_scale) -> None:
    """A finite Python number, known at trace time: FlashMLA has no default, and NaN or an
    infinity would make every output NaN. Type errors are TypeError, a non-finite value
    ValueError, as check_softmax_scale's."""
    if isinstance(sm_scale, (bool, np.bool_)) or not isinstance(
            sm_scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"sm_scale: expected a finite Python float (FlashMLA has no default), "
                        f"got {type(sm_scale).__name__}")
    if not math.isfinite(sm_scale):
        raise ValueError(f"sm_scale: expected a finite float, got {sm_scale!r}")


def check_softmax_scale(softmax_scale) -> None:
    """None or a finite number: NaN or an infinity would make every output NaN."""
    if softmax_scale is None:
        return
    if isinstance(softmax_scale, (bool, np.bool_)) or not isinstance(
            softmax_scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"softmax_scale: expected a Python float or None, got "
                        f"{type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale: expected a finite float, got {softmax_scale!r}")


def check_sparse_pool(k_cache, name: str = "k_cache") -> None:
    """The sparse kernels, and every kernel over the FP8 cache, address the pool by int32 token
    index: it must fit one. `name`: the argument the pool came as."""
    pool_tokens = k_cache.shape[0] * k_cache.shape[1]
    if pool_tokens > np.iinfo(np.int32).max:
        raise ValueError(f"{name}: expected at most 2**31 - 1 tokens in the pool (num_blocks * "
                         f"page_block_size; the kernels address its tokens as int32), got "
                         f"{pool_tokens}")


def check_metadata(metadata, batch: int, sparse: bool = False) -> None:
    """`batch` is the schedule's requests: the batch, or for sparse decode batch * seqlen_q
    (one request per query token)."""
    tsm = metadata.tile_scheduler_metadata
    num_splits = metadata.num_splits
    check_int32("metadata.tile_scheduler_metadata", tsm)
    check_int32("metadata.num_splits", num_splits)
    if np.ndim(tsm) != 2 or tsm.shape[1] != METADATA_INTS or tsm.shape[0] < 1:
        raise ValueError(
            f"metadata.tile_scheduler_metadata: expected shape (num_sm_parts, {METADATA_INTS}), "
            f"got {tuple(tsm.shape)}")
    if tuple(num_splits.shape) != (batch + 1,):
        if sparse:
            raise ValueError(
                f"metadata.num_splits: expected shape ({batch + 1},) (batch * seqlen_q + 1: a "
                f"sparse schedule has one request per query token), got "
                f"{tuple(num_splits.shape)}; was the metadata computed without topk (dense), or "
                f"for another batch?")
        raise ValueError(
            f"metadata.num_splits: expected shape ({batch + 1},) (batch + 1), got "
            f"{tuple(num_splits.shape)}; was the metadata computed for another batch?")


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse `type` for the command line's counts and sizes: argparse reports a bad value
    as "argument --tokens: expected a positive integer, got '0'" and exits with status 2."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An argparse `type` for seeds (NumPy's generators take no negative seed)."""
    return _int_at_least(text, 0, "a non-negative integer")
