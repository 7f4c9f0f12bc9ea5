// Turns the FFI buffers of one sparse-decode call (DeepSeek-V3.2, top-k indices) into the
// DecodeParams of the shared split-KV schedule (params.h says how a sparse call maps onto it),
// re-checking everything the Python wrapper checks, as decode_args.h does for dense decode.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

#include "../common/params.h"
#include "../common/tile_scheduler.h"
#include "decode_args.h"
#include "xla/ffi/api/ffi.h"

namespace jax_flash_mla {

inline ffi::Error dtype_error(const char* name, const std::string& expected) {
  return ffi::Error::InvalidArgument(std::string(name) + ": expected dtype " + expected);
}

// Operands: q [b, s_q, h_q, 576] bf16; k_cache [num_blocks, page, 1, 656] uint8/float8_e4m3fn
// (is_fp8_kvcache) or [num_blocks, page, 1, 576] bf16; indices int32 [b, s_q, topk];
// lengths int32 [b, s_q] (each query token's topk_length); attn_sink float32 [h_q];
// tile_scheduler_metadata and num_splits [b * s_q + 1] scheduled over those lengths.
// Results: out [b, s_q, h_q, 512] bf16, lse float32 [b, s_q, h_q] (query-major: the wrapper
// transposes it to FlashMLA's [b, h_q, s_q]), and the split scratch.
inline ffi::Error sparse_decode_params(
    ffi::AnyBuffer q, ffi::AnyBuffer k_cache, ffi::AnyBuffer indices, ffi::AnyBuffer lengths,
    ffi::AnyBuffer attn_sink, ffi::AnyBuffer tile_scheduler_metadata, ffi::AnyBuffer num_splits,
    float softmax_scale, bool is_fp8_kvcache, int32_t head_dim_v,
    ffi::Result<ffi::AnyBuffer>& out, ffi::Result<ffi::AnyBuffer>& lse,
    ffi::Result<ffi::AnyBuffer>& o_accum, ffi::Result<ffi::AnyBuffer>& lse_accum,
    DecodeParams* p) {
  if (q.dimensions().size() != 4) return rank_error("q", 4, q.dimensions());
  if (k_cache.dimensions().size() != 4) return rank_error("k_cache", 4, k_cache.dimensions());
  if (indices.dimensions().size() != 3) return rank_error("indices", 3, indices.dimensions());
  if (tile_scheduler_metadata.dimensions().size() != 2)
    return rank_error("tile_scheduler_metadata", 2, tile_scheduler_metadata.dimensions());
  if (q.element_type() != ffi::DataType::BF16) return dtype_error("q", "bfloat16");
  for (auto [name, buf] : {std::pair<const char*, ffi::AnyBuffer*>{"indices", &indices},
                           {"lengths", &lengths},
                           {"tile_scheduler_metadata", &tile_scheduler_metadata},
                           {"num_splits", &num_splits}}) {
    if (buf->element_type() != ffi::DataType::S32) return dtype_error(name, "int32");
  }
  if (attn_sink.element_type() != ffi::DataType::F32) return dtype_error("attn_sink", "float32");

  const auto qd = q.dimensions();
  const auto kd = k_cache.dimensions();
  const int64_t batch = qd[0], seqlen_q = qd[1], heads_q = qd[2];
  if (qd[3] != kSparseHeadDim)
    return shape_error("q", shape_string({batch, seqlen_q, heads_q, kSparseHeadDim}), qd);
  if (heads_q < 1) return shape_error("q", "with num_heads_q >= 1", qd);
  if (is_fp8_kvcache) {
    const auto type = k_cache.element_type();
    if (type != ffi::DataType::U8 && type != ffi::DataType::F8E4M3FN)
      return dtype_error("k_cache", "uint8 or float8_e4m3fn with is_fp8_kvcache");
  } else if (k_cache.element_type() != ffi::DataType::BF16) {
    return dtype_error("k_cache", "bfloat16 without is_fp8_kvcache");
  }
  const int64_t token_width = is_fp8_kvcache ? kFp8BytesPerToken : kSparseHeadDim;
  if (kd[0] < 1 || kd[1] < 1 || kd[2] != 1 || kd[3] != token_width)
    return shape_error("k_cache",
                       "[num_blocks >= 1, page_block_size >= 1, 1, " +
                           std::to_string(token_width) + "]",
                       kd);
  // Indices are int32: a pool past int32 could not be addressed whole.
  const int64_t pool_tokens = kd[0] * kd[1];
  if (pool_tokens > std::numeric_limits<int32_t>::max())
    return ffi::Error::InvalidArgument("k_cache: expected at most 2**31 - 1 tokens in the pool "
                                       "(num_blocks * page_block_size), got " +
                                       std::to_string(pool_tokens));
  const int64_t topk = indices.dimensions()[2];
  if (indices.dimensions()[0] != batch || indices.dimensions()[1] != seqlen_q || topk < 1)
    return shape_error("indices", shape_string({batch, seqlen_q, topk}) + " with topk >= 1",
                       indices.dimensions());
  const int64_t requests = batch * seqlen_q;  // one request of the schedule per query token
  if (!has_shape(lengths.dimensions(), {batch, seqlen_q}))
    return shape_error("lengths", shape_string({batch, seqlen_q}), lengths.dimensions());
  if (!has_shape(attn_sink.dimensions(), {heads_q}))
    return shape_error("attn_sink", shape_string({heads_q}), attn_sink.dimensions());
  const int64_t parts = tile_scheduler_metadata.dimensions()[0];
  if (parts <= 0 || tile_scheduler_metadata.dimensions()[1] != kMetadataInts)
    return shape_error("tile_scheduler_metadata", shape_string({parts, kMetadataInts}),
                       tile_scheduler_metadata.dimensions());
  if (!has_shape(num_splits.dimensions(), {requests + 1}))
    return shape_error("num_splits", shape_string({requests + 1}), num_splits.dimensions());
  if (head_dim_v != kSupportedHeadDimV)
    return ffi::Error::InvalidArgument("head_dim_v: expected 512, got " +
                                       std::to_string(head_dim_v));

  const int64_t slots = max_split_slots(requests, parts);
  if (out->element_type() != ffi::DataType::BF16 ||
      !has_shape(out->dimensions(), {batch, seqlen_q, heads_q, head_dim_v}))
    return shape_error("out", shape_string({batch, seqlen_q, heads_q, head_dim_v}),
                       out->dimensions());
  if (lse->element_type() != ffi::DataType::F32 ||
      !has_shape(lse->dimensions(), {batch, seqlen_q, heads_q}))
    return shape_error("lse", shape_string({batch, seqlen_q, heads_q}), lse->dimensions());
  if (o_accum->element_type() != ffi::DataType::F32 ||
      !has_shape(o_accum->dimensions(), {slots, 1, heads_q, head_dim_v}))
    return shape_error("o_accum", shape_string({slots, 1, heads_q, head_dim_v}),
                       o_accum->dimensions());
  if (lse_accum->element_type() != ffi::DataType::F32 ||
      !has_shape(lse_accum->dimensions(), {slots, 1, heads_q}))
    return shape_error("lse_accum", shape_string({slots, 1, heads_q}), lse_accum->dimensions());

  p->batch = static_cast<int>(requests);
  p->seqlen_q = 1;
  p->num_heads_q = static_cast<int>(heads_q);
  p->num_heads_k = 1;
  p->heads_per_kv = static_cast<int>(heads_q);
  p->rows_per_kv = static_cast<int>(heads_q);
  p->head_dim = static_cast<int>(kSparseHeadDim);
  p->head_dim_v = head_dim_v;
  p->num_blocks = static_cast<int>(pool_tokens);
  p->page_block_size = 1;
  p->max_blocks_per_seq = static_cast<int>(topk);
  p->num_sm_parts = static_cast<int>(parts);
  p->num_split_slots = static_cast<int>(slots);
  p->dtype = ElementType::kBF16;
  p->softmax_scale = softmax_scale;
  p->causal = false;
  p->key_format = is_fp8_kvcache ? KeyFormat::kFp8Packed : KeyFormat::kSameAsQuery;
  p->attn_sink = static_cast<const float*>(attn_sink.untyped_data());
  p->q = q.untyped_data();
  p->k_cache = k_cache.untyped_data();
  p->block_table = static_cast<const int32_t*>(indices.untyped_data());
  p->cache_seqlens = static_cast<const int32_t*>(lengths.untyped_data());
  p->tile_scheduler_metadata = static_cast<const int32_t*>(tile_scheduler_metadata.untyped_data());
  p->num_splits = static_cast<const int32_t*>(num_splits.untyped_data());
  p->out = out->untyped_data();
  p->lse = static_cast<float*>(lse->untyped_data());
  p->o_accum = static_cast<float*>(o_accum->untyped_data());
  p->lse_accum = static_cast<float*>(lse_accum->untyped_data());
  p->max_logits = nullptr;
  p->max_accum = nullptr;
  return ffi::Error::Success();
}

// Sparse prefill's extra results: max_logits [b, s_q, h_q] (query-major, as lse) and its split
// scratch max_accum [slots, 1, h_q], checked against a call whose DecodeParams are set.
inline ffi::Error sparse_prefill_max_params(ffi::Result<ffi::AnyBuffer>& max_logits,
                                            ffi::Result<ffi::AnyBuffer>& max_accum,
                                            ffi::AnyBuffer::Dimensions lse_dims,
                                            ffi::AnyBuffer::Dimensions lse_accum_dims,
                                            DecodeParams* p) {
  // float32 of exactly `dims` (lse's or lse_accum's, already checked).
  const auto float32_of = [](ffi::Result<ffi::AnyBuffer>& buf, ffi::AnyBuffer::Dimensions dims) {
    const auto got = buf->dimensions();
    return buf->element_type() == ffi::DataType::F32 &&
           std::equal(dims.begin(), dims.end(), got.begin(), got.end());
  };
  if (!float32_of(max_logits, lse_dims))
    return shape_error("max_logits", dims_to_string(lse_dims) + " float32 (as lse)",
                       max_logits->dimensions());
  if (!float32_of(max_accum, lse_accum_dims))
    return shape_error("max_accum", dims_to_string(lse_accum_dims) + " float32",
                       max_accum->dimensions());
  p->max_logits = static_cast<float*>(max_logits->untyped_data());
  p->max_accum = static_cast<float*>(max_accum->untyped_data());
  return ffi::Error::Success();
}

// The inputs sparse decode and sparse prefill share, first in both targets' operand lists:
// q, the pool (k_cache / kv), indices, lengths, attn_sink, tile_scheduler_metadata, num_splits.
template <typename Binding>
auto bind_sparse_inputs(Binding&& binding) {
  return std::move(binding).template Arg<ffi::AnyBuffer>()  // q
      .template Arg<ffi::AnyBuffer>()            // k_cache (decode) or kv (prefill)
      .template Arg<ffi::AnyBuffer>()            // indices
      .template Arg<ffi::AnyBuffer>()            // lengths
      .template Arg<ffi::AnyBuffer>()            // attn_sink
      .template Arg<ffi::AnyBuffer>()            // tile_scheduler_metadata
      .template Arg<ffi::AnyBuffer>();           // num_splits
}

// The sparse decode target's operands, in the order both platforms' handlers take them.
template <typename Binding>
auto bind_sparse_decode_operands(Binding binding) {
  return bind_sparse_inputs(std::move(binding))
      .template OptionalArg<ffi::AnyBuffer>()    // initial_out
      .template OptionalArg<ffi::AnyBuffer>()    // initial_lse
      .template Attr<float>("softmax_scale")
      .template Attr<bool>("is_fp8_kvcache")
      .template Attr<int32_t>("head_dim_v")
      .template Ret<ffi::AnyBuffer>()   // out
      .template Ret<ffi::AnyBuffer>()   // lse
      .template Ret<ffi::AnyBuffer>()   // o_accum
      .template Ret<ffi::AnyBuffer>();  // lse_accum
}

// Sparse prefill: the sparse decode's operands (q as [s_q, 1, h_q, 576], kv as a pool of
// one-token pages) and results, with max_logits and its scratch after lse and lse_accum; the
// initial outputs, when given (tests poison them), are aliased to out, lse and max_logits.
template <typename Binding>
auto bind_sparse_prefill_operands(Binding binding) {
  return bind_sparse_inputs(std::move(binding))
      .template OptionalArg<ffi::AnyBuffer>()    // initial_out
      .template OptionalArg<ffi::AnyBuffer>()    // initial_lse
      .template OptionalArg<ffi::AnyBuffer>()    // initial_max_logits
      .template Attr<float>("softmax_scale")
      .template Attr<bool>("is_fp8_kvcache")
      .template Attr<int32_t>("head_dim_v")
      .template Ret<ffi::AnyBuffer>()   // out
      .template Ret<ffi::AnyBuffer>()   // lse
      .template Ret<ffi::AnyBuffer>()   // max_logits
      .template Ret<ffi::AnyBuffer>()   // o_accum
      .template Ret<ffi::AnyBuffer>()   // lse_accum
      .template Ret<ffi::AnyBuffer>();  // max_accum
}

}  // namespace jax_flash_mla
