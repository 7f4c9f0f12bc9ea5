"""Sparse prefill (DeepSeek-V3.2): each prompt token attends over the top-k tokens of the prompt
its indices name, FlashMLA's `flash_mla_sparse_fwd` contract.

It is sparse decode seen once more (params.h): prompt token i is a request of one query token,
kv [s_kv, 1, 576] a pool of s_kv one-token pages, indices [s_q, 1, topk] already the decode's
[b, s_q = 1, topk]. The one addition is max_logits, each row's largest scaled score, which the
split-KV step writes beside lse and the combine merges like it.

`mla_sparse_prefill_p`: (q [s_q, 1, h_q, 576], kv pool, indices, lengths [s_q, 1], attn_sink,
tile_scheduler_metadata, num_splits) -> (out, lse, max_logits), with a vmap rule (instances fold
into prompt tokens; indices into per-instance kv move to their slice of the folded one) and a
sharding rule (sequence- and head-parallel, kv never moved) as sharding.py's for decode.
`mla_sparse_prefill_local_p` is its one-device form with the split scratch, lowered to the
target of either platform (the CUDA kernels write max_logits beside lse, the combine merges it).
"""

from __future__ import annotations

import functools
from functools import partial

import numpy as np
import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import ad, batching, mlir, xla
from jax.sharding import NamedSharding, PartitionSpec as P

from . import api, fp8_cache, sharding, validation
from .batching import fold, fold_indices
from ._constants import max_split_slots
from ._registration import SPARSE_PREFILL_TARGET
from .primitives import mla_metadata_p

mla_sparse_prefill_p = Primitive("jax_flash_mla_sparse_prefill")
mla_sparse_prefill_p.multiple_results = True
mla_sparse_prefill_p.def_impl(partial(xla.apply_primitive, mla_sparse_prefill_p))

mla_sparse_prefill_local_p = Primitive("jax_flash_mla_sparse_prefill_local")
mla_sparse_prefill_local_p.multiple_results = True
mla_sparse_prefill_local_p.def_impl(partial(xla.apply_primitive, mla_sparse_prefill_local_p))


def _rows(q):
    tokens, _, num_heads_q, _ = q.shape
    return jax.core.ShapedArray((tokens, 1, num_heads_q), jnp.float32)


@mla_sparse_prefill_p.def_abstract_eval
def _abstract_eval(q, *operands, softmax_scale, is_fp8_kvcache, head_dim_v):
    """(out [s_q, 1, h_q, dv], lse [s_q, 1, h_q], max_logits [s_q, 1, h_q])."""
    del operands, softmax_scale, is_fp8_kvcache
    tokens, _, num_heads_q, _ = q.shape
    return (jax.core.ShapedArray((tokens, 1, num_heads_q, head_dim_v), q.dtype), _rows(q),
            _rows(q))


@mla_sparse_prefill_local_p.def_abstract_eval
def _local_abstract_eval(q, kv, indices, lengths, attn_sink, tile_scheduler_metadata,
                         num_splits, *initial_outputs, softmax_scale, is_fp8_kvcache,
                         head_dim_v):
    """The global results, then the split scratch: o_accum, lse_accum, max_accum."""
    del kv, indices, lengths, attn_sink, num_splits, initial_outputs
    slots = max_split_slots(q.shape[0], tile_scheduler_metadata.shape[0])
    scratch = jax.core.ShapedArray((slots, 1, q.shape[2]), jnp.float32)
    return _abstract_eval(q, softmax_scale=softmax_scale, is_fp8_kvcache=is_fp8_kvcache,
                          head_dim_v=head_dim_v) + (
        jax.core.ShapedArray((slots, 1, q.shape[2], head_dim_v), jnp.float32), scratch, scratch)


def prefill_on_one_device(*operands, **params):
    """(out, lse, max_logits) of one local sparse prefill: the split scratch stays inside."""
    return tuple(mla_sparse_prefill_local_p.bind(*operands, **params)[:3])


FIRST_INITIAL_OUTPUT = 7  # operand index of initial_out; initial_lse, initial_max_logits follow


def _lowering(ctx, *operands, softmax_scale, is_fp8_kvcache, head_dim_v):
    aliases = None
    if len(operands) > FIRST_INITIAL_OUTPUT:
        aliases = {FIRST_INITIAL_OUTPUT + i: i for i in range(3)}
    return jax.ffi.ffi_lowering(SPARSE_PREFILL_TARGET, operand_output_aliases=aliases)(
        ctx, *operands, softmax_scale=np.float32(softmax_scale),
        is_fp8_kvcache=bool(is_fp8_kvcache), head_dim_v=np.int32(head_dim_v))


def _jvp(primals, tangents, **params):
    del primals, tangents, params
    raise NotImplementedError(
        "jax_flash_mla.flash_mla_sparse_fwd is not differentiable: it is an inference-only "
        "kernel. Differentiate jax_flash_mla.reference.flash_mla_sparse_fwd instead.")


def _batching_rule(args, dims, **params):
    """Instances fold into prompt tokens; a vmapped sink (one per instance) runs the instances
    one after another (lax.map)."""
    size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
    fronted = [jnp.broadcast_to(x, (size,) + x.shape) if d is None else jnp.moveaxis(x, d, 0)
               for x, d in zip(args, dims)]
    if dims[4] is not None:
        outs = jax.lax.map(lambda xs: tuple(mla_sparse_prefill_p.bind(*xs, **params)), fronted)
        return outs, (0, 0, 0)
    q, kv, indices, lengths, _, tsm, _ = fronted
    tokens = q.shape[1]
    if dims[1] is None:
        pool, indices = args[1], fold(indices)
    else:
        indices = fold_indices(indices, kv.shape[1] * kv.shape[2], "kv")
        pool = fold(kv)
    lengths = fold(lengths)
    folded_tsm, folded_splits = mla_metadata_p.bind(lengths.reshape(-1),
                                                    num_sm_parts=tsm.shape[-2])
    outs = mla_sparse_prefill_p.bind(fold(q), pool, indices, lengths, args[4], folded_tsm,
                                     folded_splits, **params)
    return tuple(x.reshape((size, tokens) + x.shape[1:]) for x in outs), (0, 0, 0)


# q, kv, indices, lengths, attn_sink, tile_scheduler_metadata, num_splits -> out, lse,
# max_logits. t: prompt tokens, h: query heads; kv (n p k w) is read by every token.
SHARDING_RULE = "t o h d, n p k w, t o i, t o, h, x e, c -> t o h v, t o h, t o h"
REPLICATED_FACTORS = ("o", "d", "n", "p", "k", "w", "i", "x", "e", "c", "v")


@functools.lru_cache(maxsize=None)
def partitioned_prefill(*, softmax_scale: float, is_fp8_kvcache: bool, head_dim_v: int):
    """Sequence-parallel (prompt tokens split, each device rescheduling its own) and
    head-parallel (heads and the sink split) without moving kv."""
    params = dict(softmax_scale=softmax_scale, is_fp8_kvcache=is_fp8_kvcache,
                  head_dim_v=head_dim_v)

    @custom_partitioning
    def prefill(q, kv, indices, lengths, attn_sink, tile_scheduler_metadata, num_splits):
        return prefill_on_one_device(q, kv, indices, lengths, attn_sink, tile_scheduler_metadata,
                                     num_splits, **params)

    def partition(mesh, arg_shapes, result_shape):
        del result_shape
        spec = getattr(arg_shapes[0].sharding, "spec", ())
        token_axes = spec[0] if len(spec) > 0 else None
        head_axes = spec[2] if len(spec) > 2 else None
        shard = lambda *axes: NamedSharding(mesh, P(*axes))
        arg_shardings = (shard(token_axes, None, head_axes, None), shard(),
                         shard(token_axes, None, None), shard(token_axes, None),
                         shard(head_axes), shard(), shard())
        rows = shard(token_axes, None, head_axes)
        result_shardings = (shard(token_axes, None, head_axes, None), rows, rows)

        def local_prefill(q, kv, indices, lengths, attn_sink, tsm, num_splits):
            if token_axes is not None:  # the given schedule covers every token
                tsm, num_splits = mla_metadata_p.bind(lengths.reshape(-1),
                                                      num_sm_parts=tsm.shape[0])
            return prefill_on_one_device(q, kv, indices, lengths, attn_sink, tsm, num_splits,
                                         **params)

        return mesh, local_prefill, result_shardings, arg_shardings

    prefill.def_partition(partition=partition, sharding_rule=SHARDING_RULE,
                          need_replication_factors=REPLICATED_FACTORS)
    return prefill


ad.primitive_jvps[mla_sparse_prefill_p] = _jvp
batching.primitive_batchers[mla_sparse_prefill_p] = _batching_rule
sharding.register_partitioned_lowering(mla_sparse_prefill_p, prefill_on_one_device,
                                       partitioned_prefill, FIRST_INITIAL_OUTPUT)
for _platform in ("cpu", "cuda"):
    mlir.register_lowering(mla_sparse_prefill_local_p, _lowering, platform=_platform)


def _check_fp8_pool(kv) -> None:
    """kv as the FP8 paged cache: [num_blocks, page_block_size, 1, 656] uint8 or
    float8_e4m3fn."""
    fp8_cache.check_packed("kv", kv)
    if np.ndim(kv) != 4 or kv.shape[2] != 1 or kv.shape[0] < 1 or kv.shape[1] < 1:
        raise ValueError(f"kv: expected shape [num_blocks, page_block_size, 1, "
                         f"{fp8_cache.FP8_BYTES_PER_TOKEN}] (the FP8 paged cache), got "
                         f"{tuple(np.shape(kv))}")


def flash_mla_sparse_fwd(q, kv, indices, sm_scale: float, d_v: int = 512, attn_sink=None,
                         topk_length=None):
    """Sparse prefill attention, FlashMLA's flash_mla_sparse_fwd.

    Args:
      q: bfloat16 [s_q, h_q, 576], the prompt tokens' absorbed queries (any h_q >= 1).
      kv: bfloat16 [s_kv, 1, 576], the latents they attend over (V: the first 512 columns);
        or the FP8 paged cache itself, uint8 or float8_e4m3fn [num_blocks, page_block_size, 1,
        656], whose tokens are then s_kv = num_blocks * page_block_size, indices naming them
        page_id * page_block_size + offset (as sparse decode's): no bf16 copy of the cache.
      indices: int32 [s_q, 1, topk], topk >= 1: token i attends over kv rows
        indices[i, 0, :topk_length[i]]; an index < 0 or >= s_kv counts nothing and is never
        read; a row named twice counts twice.
      sm_scale: the softmax scale, a finite float.
      d_v: 512.
      attn_sink: float32 [h_q] or None: out *= 1 / (1 + exp(attn_sink - lse)); lse and
        max_logits unchanged.
      topk_length: int32 [s_q] or None: only the first topk_length[i] slots count (clamped to
        [0, topk]).

    Returns:
      (out bfloat16 [s_q, h_q, 512], max_logits float32 [s_q, h_q], lse float32 [s_q, h_q]):
      max_logits the largest sm_scale * q . k over the counted slots, lse the natural log of the
      sum of their exp. A token with no counted slot: out 0, lse +inf, max_logits -inf.
    """
    return _sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)


def _sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink, topk_length, poisoned=False):
    """The prefill primitive's call; `poisoned` (jax_flash_mla.testing) aliases NaN-filled
    outputs in."""
    is_fp8 = hasattr(kv, "dtype") and np.dtype(kv.dtype) in fp8_cache.PACKED_DTYPES
    if is_fp8:
        _check_fp8_pool(kv)
        pool = jnp.asarray(kv)
        # The shape checks of a bf16 kv of the pool's tokens.
        kv_view = jax.ShapeDtypeStruct((kv.shape[0] * kv.shape[1], 1, fp8_cache.LATENT_DIM),
                                       jnp.bfloat16)
    else:
        kv_view = kv
    validation.check_sparse_prefill_args(q, kv_view, indices, sm_scale, d_v, attn_sink,
                                        topk_length)
    if not is_fp8:
        pool = jnp.asarray(kv)[:, None]  # s_kv pages of one token
    validation.check_sparse_pool(pool, "kv")
    tokens, num_heads_q, _ = q.shape
    lengths = api.sparse_lengths(topk_length, tokens, 1, indices.shape[2])
    metadata = api.sparse_metadata_for_lengths(lengths, num_heads_q)
    if attn_sink is None:
        attn_sink = jnp.full((num_heads_q,), -jnp.inf, jnp.float32)
    initial_outputs = ()
    if poisoned:  # NaN-filled outputs aliased in: an element never written stays NaN
        rows = (tokens, 1, num_heads_q)
        initial_outputs = (jnp.full(rows + (int(d_v),), jnp.nan, jnp.bfloat16),
                           jnp.full(rows, jnp.nan, jnp.float32),
                           jnp.full(rows, jnp.nan, jnp.float32))
    out, lse, max_logits = mla_sparse_prefill_p.bind(
        jnp.asarray(q)[:, None], pool, jnp.asarray(indices), lengths, jnp.asarray(attn_sink),
        metadata.tile_scheduler_metadata, metadata.num_splits, *initial_outputs,
        softmax_scale=float(sm_scale), is_fp8_kvcache=is_fp8, head_dim_v=int(d_v))
    return out[:, 0], max_logits[:, 0], lse[:, 0]
