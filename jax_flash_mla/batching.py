"""vmap for the two primitives: extra leading axes fold into the request batch.

A vmapped decode becomes one decode over batch * V requests, so the kernels see one larger,
better balanced problem instead of V small ones:
- q, block_table and cache_seqlens fold their vmapped axis into the batch axis;
- a vmapped k_cache (one page pool per instance) folds into one pool of V * num_blocks pages,
  and each instance's block-table entries move to its slice of it; entries that were invalid
  stay invalid (-1), so no instance can reach another's pages;
- the schedule is recomputed for the folded batch (any vmapped metadata was computed for the
  unfolded one), with the same number of SM parts;
- the static params (softmax_scale, causal, head_dim_v, the split-KV kernel) pass unchanged.
get_mla_metadata under vmap computes one schedule per instance (lax.map).

The sparse decode folds the same way: indices, like block tables, move to their instance's slice
of a folded pool (invalid ones stay invalid), lengths fold with q, and the schedule is
recomputed. A vmapped attn_sink (one per instance) has no folded form: those instances run one
after another (lax.map).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.interpreters import batching

from .primitives import mla_decode_p, mla_metadata_p, mla_sparse_decode_p

NOT_MAPPED = None  # batching's marker for an unbatched operand or result


def _axis_size(args, dims):
    for x, d in zip(args, dims):
        if d is not NOT_MAPPED:
            return x.shape[d]
    raise ValueError("batching rule called with no batched argument")


def _to_front(x, dim, size):
    """x with its vmapped axis first, broadcast to `size` when it has none."""
    if dim is NOT_MAPPED:
        return jnp.broadcast_to(x, (size,) + x.shape)
    return jnp.moveaxis(x, dim, 0)


def fold(x):
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _metadata_batching_rule(args, dims, *, num_sm_parts):
    (cache_seqlens,), (dim,) = args, dims
    seqlens = jnp.moveaxis(cache_seqlens, dim, 0)
    tsm, num_splits = jax.lax.map(
        lambda s: tuple(mla_metadata_p.bind(s, num_sm_parts=num_sm_parts)), seqlens)
    return (tsm, num_splits), (0, 0)


def _fold_block_tables(block_table, num_blocks):
    """[V, b, m] tables of V pools -> [V * b, m] tables of their concatenation."""
    instance = jnp.arange(block_table.shape[0], dtype=jnp.int32)[:, None, None]
    valid = (block_table >= 0) & (block_table < num_blocks)
    return fold(jnp.where(valid, block_table + instance * num_blocks, -1))


def _decode_batching_rule(args, dims, **params):
    q, k_cache, block_table, cache_seqlens, tsm, _, *initial_outputs = args
    q_dim, k_dim, table_dim, seqlens_dim = dims[:4]
    size = _axis_size(args, dims)
    q = fold(_to_front(q, q_dim, size))
    batch = q.shape[0] // size
    seqlens = fold(_to_front(cache_seqlens, seqlens_dim, size))
    tables = _to_front(block_table, table_dim, size)
    if k_dim is NOT_MAPPED:  # one pool shared by every instance: ids are already global
        pool, tables = k_cache, fold(tables)
    else:
        per_instance = jnp.moveaxis(k_cache, k_dim, 0)
        tables = _fold_block_tables(tables, per_instance.shape[1])
        pool = fold(per_instance)
    num_sm_parts = tsm.shape[-2]
    folded_tsm, folded_splits = mla_metadata_p.bind(seqlens, num_sm_parts=num_sm_parts)
    initial = [fold(_to_front(x, d, size)) for x, d in zip(initial_outputs, dims[6:])]
    out, lse = mla_decode_p.bind(q, pool, tables, seqlens, folded_tsm, folded_splits, *initial,
                                 **params)
    unfold = lambda x: x.reshape((size, batch) + x.shape[1:])
    return (unfold(out), unfold(lse)), (0, 0)


def fold_indices(indices, pool_tokens, name="k_cache"):
    """[V, b, s, t] token indices into V pools -> [V * b, s, t] indices into their
    concatenation (sparse decode's, and sparse prefill's with b the prompt tokens); `name`: the
    argument the pools came as."""
    total = indices.shape[0] * pool_tokens
    if total > jnp.iinfo(jnp.int32).max:
        raise ValueError(f"{name}: expected at most 2**31 - 1 tokens in the pool vmap folds "
                         f"its {indices.shape[0]} pools of {pool_tokens} tokens into (indices "
                         f"are int32), got {total}")
    instance = jnp.arange(indices.shape[0], dtype=jnp.int32)[:, None, None, None]
    valid = (indices >= 0) & (indices < pool_tokens)
    return fold(jnp.where(valid, indices + instance * pool_tokens, -1))


def _sparse_decode_batching_rule(args, dims, **params):
    size = _axis_size(args, dims)
    if dims[4] is not NOT_MAPPED:  # one attn_sink per instance: no folded form
        fronted = [_to_front(x, d, size) for x, d in zip(args, dims)]
        outs = jax.lax.map(lambda xs: tuple(mla_sparse_decode_p.bind(*xs, **params)), fronted)
        return outs, (0, 0)
    q, k_cache, indices, lengths, attn_sink, tsm, _, *initial_outputs = args
    q = fold(_to_front(q, dims[0], size))
    batch = q.shape[0] // size
    indices = _to_front(indices, dims[2], size)
    if dims[1] is NOT_MAPPED:  # one pool shared by every instance: indices are already global
        pool, indices = k_cache, fold(indices)
    else:
        per_instance = jnp.moveaxis(k_cache, dims[1], 0)
        indices = fold_indices(indices, per_instance.shape[1] * per_instance.shape[2])
        pool = fold(per_instance)
    lengths = fold(_to_front(lengths, dims[3], size))
    folded_tsm, folded_splits = mla_metadata_p.bind(lengths.reshape(-1),
                                                    num_sm_parts=tsm.shape[-2])
    initial = [fold(_to_front(x, d, size)) for x, d in zip(initial_outputs, dims[7:])]
    out, lse = mla_sparse_decode_p.bind(q, pool, indices, lengths, attn_sink, folded_tsm,
                                        folded_splits, *initial, **params)
    unfold = lambda x: x.reshape((size, batch) + x.shape[1:])
    return (unfold(out), unfold(lse)), (0, 0)


batching.primitive_batchers[mla_metadata_p] = _metadata_batching_rule
batching.primitive_batchers[mla_decode_p] = _decode_batching_rule
batching.primitive_batchers[mla_sparse_decode_p] = _sparse_decode_batching_rule
