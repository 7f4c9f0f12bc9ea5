"""How the decode partitions under jax.jit with NamedSharding (custom_partitioning).

Two layouts run without moving the cache:
- head-parallel (tensor parallel): q, out and lse split on heads; k_cache, block_table,
  cache_seqlens and the metadata replicated. Each device runs the decode for its heads over
  the whole cache. With num_heads_k > 1, k_cache must be split on its head axis the same way.
- batch-parallel (data parallel): q, block_table, cache_seqlens, out and lse split on the
  batch, and k_cache split on its block axis over the same mesh axes: each device owns a page
  pool, and its block-table entries are ids in that local pool. Each device recomputes the
  schedule of its own requests (the given metadata describes the global batch).
Batch and heads can be split at once (over different mesh axes). A k_cache split on its block
axis over other mesh axes than the batch, or a split of any other axis of an operand (d, the
page, the table's columns), is not a layout of its own: those operands are replicated first.

The rule (Shardy) names the factors; the partition callback fixes the operand shardings and
returns the per-device computation: one local decode (decode_on_one_device).

The sparse decode (mla_sparse_decode_p) partitions the same two ways: head-parallel (q, attn_sink,
out and lse split on heads; the FP8 or bf16 pool and the indices replicated) and batch-parallel
(q, indices, lengths, out and lse split on the batch; k_cache split on its block axis over the
same mesh axes, each device's indices pointing into its local pool).

This module registers the lowering of mla_decode_p and mla_sparse_decode_p (as batching.py registers its vmap rule):
through the rule where jit gives the devices, else one local decode.
"""

from __future__ import annotations

import functools

from jax._src import dispatch
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec as P

from .primitives import (FIRST_INITIAL_OUTPUT, SPARSE_FIRST_INITIAL_OUTPUT,
                         decode_on_one_device, mla_decode_p, mla_metadata_p,
                         mla_sparse_decode_p, sparse_decode_on_one_device)

# q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits -> out, lse.
# b: requests, h: query heads, n: pool pages; every other factor stays whole.
SHARDING_RULE = "b s h d, n p k d, b m, b, t e, c -> b s h v, b h s"
REPLICATED_FACTORS = ("s", "d", "p", "k", "m", "t", "e", "c", "v")
# q, k_cache, indices, lengths, attn_sink, tile_scheduler_metadata, num_splits -> out, lse.
SPARSE_SHARDING_RULE = "b s h d, n p k w, b s i, b s, h, t e, c -> b s h v, b h s"
SPARSE_REPLICATED_FACTORS = ("s", "d", "p", "k", "w", "i", "t", "e", "c", "v")


def _spec_axis(sharding, dim):
    spec = getattr(sharding, "spec", None)
    if spec is None or dim >= len(spec):
        return None
    return spec[dim]


class _Layout:
    """What a decode partition reads off its operands' shardings: the mesh axes q is split over
    on its batch and head axes, and the pool's block split where it is the batch's (each batch
    shard owns its pages; any other pool split is replicated away). `shard(*spec)` makes a
    NamedSharding on the mesh; `results` are out's and lse's."""

    def __init__(self, mesh, arg_shapes):
        self.batch = _spec_axis(arg_shapes[0].sharding, 0)
        self.heads = _spec_axis(arg_shapes[0].sharding, 2)
        pool = _spec_axis(arg_shapes[1].sharding, 0)
        self.pool = pool if pool is not None and pool == self.batch else None
        self.shard = lambda *spec: NamedSharding(mesh, P(*spec))
        self.results = (self.shard(self.batch, None, self.heads, None),
                        self.shard(self.batch, self.heads, None))


@functools.lru_cache(maxsize=None)
def partitioned_decode(*, softmax_scale: float, causal: bool, head_dim_v: int, kernel: int):
    """The decode as a custom_partitioning function, one per set of static parameters."""
    params = dict(softmax_scale=softmax_scale, causal=causal, head_dim_v=head_dim_v,
                  kernel=kernel)

    @custom_partitioning
    def decode(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits):
        return decode_on_one_device(q, k_cache, block_table, cache_seqlens,
                                    tile_scheduler_metadata, num_splits, **params)

    def partition(mesh, arg_shapes, result_shape):
        del result_shape
        layout = _Layout(mesh, arg_shapes)
        shard = layout.shard
        kv_head_axes = layout.heads if arg_shapes[1].shape[2] > 1 else None  # num_heads_k
        arg_shardings = (
            shard(layout.batch, None, layout.heads, None),
            shard(layout.pool, None, kv_head_axes, None),
            shard(layout.batch, None),
            shard(layout.batch),
            shard(),
            shard(),
        )

        def local_decode(q, k_cache, block_table, cache_seqlens, tsm, num_splits):
            if layout.batch is not None:  # the given schedule covers the global batch
                tsm, num_splits = mla_metadata_p.bind(cache_seqlens, num_sm_parts=tsm.shape[0])
            return decode_on_one_device(q, k_cache, block_table, cache_seqlens, tsm, num_splits,
                                        **params)

        return mesh, local_decode, layout.results, arg_shardings

    decode.def_partition(partition=partition, sharding_rule=SHARDING_RULE,
                         need_replication_factors=REPLICATED_FACTORS)
    return decode


@functools.lru_cache(maxsize=None)
def partitioned_sparse_decode(*, softmax_scale: float, is_fp8_kvcache: bool, head_dim_v: int):
    """The sparse decode as a custom_partitioning function, one per set of static parameters."""
    params = dict(softmax_scale=softmax_scale, is_fp8_kvcache=is_fp8_kvcache,
                  head_dim_v=head_dim_v)

    @custom_partitioning
    def decode(q, k_cache, indices, lengths, attn_sink, tile_scheduler_metadata, num_splits):
        return sparse_decode_on_one_device(q, k_cache, indices, lengths, attn_sink,
                                           tile_scheduler_metadata, num_splits, **params)

    def partition(mesh, arg_shapes, result_shape):
        del result_shape
        layout = _Layout(mesh, arg_shapes)
        shard = layout.shard
        arg_shardings = (
            shard(layout.batch, None, layout.heads, None),
            shard(layout.pool, None, None, None),
            shard(layout.batch, None, None),
            shard(layout.batch, None),
            shard(layout.heads),
            shard(),
            shard(),
        )

        def local_decode(q, k_cache, indices, lengths, attn_sink, tsm, num_splits):
            if layout.batch is not None:  # the given schedule covers the global batch
                tsm, num_splits = mla_metadata_p.bind(lengths.reshape(-1),
                                                      num_sm_parts=tsm.shape[0])
            return sparse_decode_on_one_device(q, k_cache, indices, lengths, attn_sink, tsm,
                                               num_splits, **params)

        return mesh, local_decode, layout.results, arg_shardings

    decode.def_partition(partition=partition, sharding_rule=SPARSE_SHARDING_RULE,
                         need_replication_factors=SPARSE_REPLICATED_FACTORS)
    return decode


def register_partitioned_lowering(primitive, on_one_device, partitioned, first_initial_output):
    """Lowers `primitive` through its sharding rule (`partitioned(**params)`, a
    custom_partitioning function) where jit gives the devices, else as one local call
    (`on_one_device`). jax.export lowers with no device assignment, which custom_partitioning
    cannot take: the exported module holds the one-device op. Poisoned outputs (tests: operands
    from `first_initial_output` on) are one-device too."""

    def lowering(ctx, *operands, **params):
        no_devices = getattr(ctx.module_context.axis_context, "device_assignment", ()) is None
        if no_devices or len(operands) > first_initial_output:
            fun = functools.partial(on_one_device, **params)
        else:
            fun = partitioned(**params)
        return mlir.lower_fun(fun, multiple_results=True)(ctx, *operands)

    # The sharding rule needs the device assignment while lowering; jit provides it only to
    # primitives that declare the need (JAX has no public API for this yet: custom_partitioning's
    # own primitive is declared the same way), and only outside the lowering cache.
    dispatch.prim_requires_devices_during_lowering.add(primitive)
    mlir.register_lowering(primitive, lowering, cacheable=False)


register_partitioned_lowering(mla_decode_p, decode_on_one_device, partitioned_decode,
                              FIRST_INITIAL_OUTPUT)
register_partitioned_lowering(mla_sparse_decode_p, sparse_decode_on_one_device,
                              partitioned_sparse_decode, SPARSE_FIRST_INITIAL_OUTPUT)
