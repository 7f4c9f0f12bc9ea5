"""The JAX primitives, their abstract evaluation and their lowering to the FFI targets.

`mla_metadata_p`: cache_seqlens -> (tile_scheduler_metadata, num_splits).
`mla_decode_p`: (q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits
[, initial_out, initial_lse]) -> (out, lse). What the public API binds: it has the batching
rule (batching.py) and its lowering is the sharding rule's (sharding.py registers it), which
emits one `mla_decode_local_p` per shard.
`mla_decode_local_p`: the same operands on one device's shard -> (out, lse, o_accum,
lse_accum), lowered to the FFI custom call.

Both decode primitives carry the static params softmax_scale, causal, head_dim_v and kernel:
the split-KV kernel as the value of the target's `kernel` attribute (_constants.SPLIT_KV_KERNELS),
always DISPATCH from the public API, a forced kernel only from jax_flash_mla.testing.

`mla_sparse_decode_p`: (q, k_cache, indices, lengths, attn_sink, tile_scheduler_metadata,
num_splits [, initial_out, initial_lse]) -> (out, lse): DeepSeek-V3.2's sparse decode, with the
static params softmax_scale, is_fp8_kvcache and head_dim_v. lengths int32 [b, s_q] is each query
token's topk_length, and the schedule has one request per query token (b * s_q of them). Its
batching and sharding rules sit beside the dense ones; `mla_sparse_decode_local_p` is its
one-device form, whose lse comes query-major ([b, s_q, h_q], one request per query token) and
is transposed to [b, h_q, s_q] by sparse_decode_on_one_device.

o_accum / lse_accum are the float32 partials of split requests. They are results of the
custom call, not handler-side allocations, so XLA owns that scratch: the handlers allocate
nothing and stay valid inside CUDA graphs. Nothing above the local primitive sees them.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, mlir, xla

from ._constants import METADATA_INTS, max_split_slots
from ._registration import DECODE_TARGET, METADATA_TARGET, SPARSE_DECODE_TARGET

LOWERING_PLATFORMS = ("cpu", "cuda")


# --- metadata -------------------------------------------------------------------------------

mla_metadata_p = Primitive("jax_flash_mla_metadata")
mla_metadata_p.multiple_results = True
mla_metadata_p.def_impl(partial(xla.apply_primitive, mla_metadata_p))


@mla_metadata_p.def_abstract_eval
def _metadata_abstract_eval(cache_seqlens, *, num_sm_parts):
    batch = cache_seqlens.shape[0]
    return (
        jax.core.ShapedArray((num_sm_parts, METADATA_INTS), jnp.int32),
        jax.core.ShapedArray((batch + 1,), jnp.int32),
    )


def _metadata_lowering(ctx, cache_seqlens, *, num_sm_parts):
    del num_sm_parts  # carried by the result shape
    return jax.ffi.ffi_lowering(METADATA_TARGET)(ctx, cache_seqlens)


# --- decode ---------------------------------------------------------------------------------

def _decode_outputs(q, head_dim_v):
    batch, seqlen_q, num_heads_q, _ = q.shape
    return (
        jax.core.ShapedArray((batch, seqlen_q, num_heads_q, head_dim_v), q.dtype),
        jax.core.ShapedArray((batch, num_heads_q, seqlen_q), jnp.float32),
    )


mla_decode_p = Primitive("jax_flash_mla_decode")
mla_decode_p.multiple_results = True
mla_decode_p.def_impl(partial(xla.apply_primitive, mla_decode_p))


@mla_decode_p.def_abstract_eval
def _decode_abstract_eval(q, *operands, softmax_scale, causal, head_dim_v, kernel):
    del operands, softmax_scale, causal, kernel
    return _decode_outputs(q, head_dim_v)


mla_decode_local_p = Primitive("jax_flash_mla_decode_local")
mla_decode_local_p.multiple_results = True
mla_decode_local_p.def_impl(partial(xla.apply_primitive, mla_decode_local_p))


@mla_decode_local_p.def_abstract_eval
def _decode_local_abstract_eval(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata,
                                num_splits, *initial_outputs, softmax_scale, causal, head_dim_v,
                                kernel):
    del block_table, cache_seqlens, num_splits, initial_outputs, softmax_scale, causal, kernel
    batch, seqlen_q, num_heads_q, _ = q.shape
    num_heads_k = k_cache.shape[2]
    rows_per_kv = seqlen_q * (num_heads_q // num_heads_k)
    slots = max_split_slots(batch, tile_scheduler_metadata.shape[0])
    return _decode_outputs(q, head_dim_v) + (
        jax.core.ShapedArray((slots, num_heads_k, rows_per_kv, head_dim_v), jnp.float32),
        jax.core.ShapedArray((slots, num_heads_k, rows_per_kv), jnp.float32),
    )


def decode_on_one_device(*operands, **params):
    """(out, lse) of one local decode: the split scratch stays inside."""
    out, lse, _, _ = mla_decode_local_p.bind(*operands, **params)
    return out, lse


FIRST_INITIAL_OUTPUT = 6  # operand index of initial_out; initial_lse follows


def _decode_local_lowering(ctx, *operands, softmax_scale, causal, head_dim_v, kernel):
    aliases = None
    if len(operands) > FIRST_INITIAL_OUTPUT:
        aliases = {FIRST_INITIAL_OUTPUT: 0, FIRST_INITIAL_OUTPUT + 1: 1}
    lower = jax.ffi.ffi_lowering(DECODE_TARGET, operand_output_aliases=aliases)
    return lower(ctx, *operands, softmax_scale=np.float32(softmax_scale), causal=bool(causal),
                 head_dim_v=np.int32(head_dim_v), kernel=np.int32(kernel))


# --- sparse decode ----------------------------------------------------------------------------

mla_sparse_decode_p = Primitive("jax_flash_mla_sparse_decode")
mla_sparse_decode_p.multiple_results = True
mla_sparse_decode_p.def_impl(partial(xla.apply_primitive, mla_sparse_decode_p))


@mla_sparse_decode_p.def_abstract_eval
def _sparse_decode_abstract_eval(q, *operands, softmax_scale, is_fp8_kvcache, head_dim_v):
    del operands, softmax_scale, is_fp8_kvcache
    return _decode_outputs(q, head_dim_v)


mla_sparse_decode_local_p = Primitive("jax_flash_mla_sparse_decode_local")
mla_sparse_decode_local_p.multiple_results = True
mla_sparse_decode_local_p.def_impl(partial(xla.apply_primitive, mla_sparse_decode_local_p))


@mla_sparse_decode_local_p.def_abstract_eval
def _sparse_decode_local_abstract_eval(q, k_cache, indices, lengths, attn_sink,
                                       tile_scheduler_metadata, num_splits, *initial_outputs,
                                       softmax_scale, is_fp8_kvcache, head_dim_v):
    del k_cache, indices, lengths, attn_sink, num_splits, initial_outputs, softmax_scale
    del is_fp8_kvcache
    batch, seqlen_q, num_heads_q, _ = q.shape
    slots = max_split_slots(batch * seqlen_q, tile_scheduler_metadata.shape[0])
    return (
        jax.core.ShapedArray((batch, seqlen_q, num_heads_q, head_dim_v), q.dtype),
        jax.core.ShapedArray((batch, seqlen_q, num_heads_q), jnp.float32),
        jax.core.ShapedArray((slots, 1, num_heads_q, head_dim_v), jnp.float32),
        jax.core.ShapedArray((slots, 1, num_heads_q), jnp.float32),
    )


def sparse_decode_on_one_device(*operands, **params):
    """(out, lse [b, h_q, s_q]) of one local sparse decode: the split scratch stays inside."""
    out, lse, _, _ = mla_sparse_decode_local_p.bind(*operands, **params)
    return out, lse.transpose(0, 2, 1)


SPARSE_FIRST_INITIAL_OUTPUT = 7  # operand index of initial_out; initial_lse [b, s_q, h_q] follows


def _sparse_decode_local_lowering(ctx, *operands, softmax_scale, is_fp8_kvcache, head_dim_v):
    aliases = None
    if len(operands) > SPARSE_FIRST_INITIAL_OUTPUT:
        aliases = {SPARSE_FIRST_INITIAL_OUTPUT: 0, SPARSE_FIRST_INITIAL_OUTPUT + 1: 1}
    lower = jax.ffi.ffi_lowering(SPARSE_DECODE_TARGET, operand_output_aliases=aliases)
    return lower(ctx, *operands, softmax_scale=np.float32(softmax_scale),
                 is_fp8_kvcache=bool(is_fp8_kvcache), head_dim_v=np.int32(head_dim_v))


def _decode_jvp(primals, tangents, **params):
    del primals, tangents, params
    raise NotImplementedError(
        "jax_flash_mla.flash_mla_with_kvcache is not differentiable: it is an inference-only "
        "decode kernel with no backward pass. Differentiate jax_flash_mla.reference."
        "flash_mla_with_kvcache instead, or wrap the inputs in jax.lax.stop_gradient.")


ad.primitive_jvps[mla_decode_p] = _decode_jvp
ad.primitive_jvps[mla_sparse_decode_p] = _decode_jvp

for _platform in LOWERING_PLATFORMS:
    mlir.register_lowering(mla_metadata_p, _metadata_lowering, platform=_platform)
    mlir.register_lowering(mla_decode_local_p, _decode_local_lowering, platform=_platform)
    mlir.register_lowering(mla_sparse_decode_local_p, _sparse_decode_local_lowering,
                           platform=_platform)
