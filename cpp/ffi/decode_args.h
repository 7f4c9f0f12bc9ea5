// Turns the FFI buffers of one decode call into DecodeParams, re-checking everything the
// Python wrapper checks: anyone can call the custom-call target directly, and a bad shape
// must come back as an ffi::Error, never as an out-of-bounds access.
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include "../common/params.h"
#include "../common/tile_scheduler.h"
#include "../sm90/heuristics.h"
#include "xla/ffi/api/ffi.h"

namespace jax_flash_mla {

namespace ffi = xla::ffi;

inline std::string dims_to_string(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + "]";
}

inline ffi::Error rank_error(const char* name, size_t expected, ffi::AnyBuffer::Dimensions dims) {
  return ffi::Error::InvalidArgument(std::string(name) + ": expected rank " +
                                     std::to_string(expected) + ", got shape " +
                                     dims_to_string(dims));
}

inline ffi::Error shape_error(const char* name, const std::string& expected,
                              ffi::AnyBuffer::Dimensions dims) {
  return ffi::Error::InvalidArgument(std::string(name) + ": expected shape " + expected +
                                     ", got " + dims_to_string(dims));
}

// The shape [batch, num_heads_q, seqlen_q]-style string used in messages.
inline std::string shape_string(std::initializer_list<int64_t> dims) {
  std::string s = "[";
  bool first = true;
  for (int64_t d : dims) {
    if (!first) s += ", ";
    s += std::to_string(d);
    first = false;
  }
  return s + "]";
}

inline bool has_shape(ffi::AnyBuffer::Dimensions dims, std::initializer_list<int64_t> expected) {
  if (dims.size() != expected.size()) return false;
  size_t i = 0;
  for (int64_t d : expected) {
    if (dims[i++] != d) return false;
  }
  return true;
}

inline ffi::Error decode_params(ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                                ffi::AnyBuffer block_table, ffi::AnyBuffer cache_seqlens,
                                ffi::AnyBuffer tile_scheduler_metadata,
                                ffi::AnyBuffer num_splits, float softmax_scale, bool causal,
                                int32_t head_dim_v, ffi::Result<ffi::AnyBuffer>& out,
                                ffi::Result<ffi::AnyBuffer>& lse,
                                ffi::Result<ffi::AnyBuffer>& o_accum,
                                ffi::Result<ffi::AnyBuffer>& lse_accum, DecodeParams* p) {
  if (q.dimensions().size() != 4) return rank_error("q", 4, q.dimensions());
  if (k_cache.dimensions().size() != 4) return rank_error("k_cache", 4, k_cache.dimensions());
  if (block_table.dimensions().size() != 2)
    return rank_error("block_table", 2, block_table.dimensions());
  if (cache_seqlens.dimensions().size() != 1)
    return rank_error("cache_seqlens", 1, cache_seqlens.dimensions());
  if (tile_scheduler_metadata.dimensions().size() != 2)
    return rank_error("tile_scheduler_metadata", 2, tile_scheduler_metadata.dimensions());

  const auto dtype = q.element_type();
  if (dtype != ffi::DataType::BF16 && dtype != ffi::DataType::F16)
    return ffi::Error::InvalidArgument("q: expected dtype bfloat16 or float16");
  // The cache's dtype says its layout: q's dtype, or DeepSeek-V3.2's 656-byte FP8 tokens
  // (uint8 or float8_e4m3fn; bf16 queries of 576 columns, one KV head, checked below).
  const bool fp8_keys = k_cache.element_type() == ffi::DataType::U8 ||
                        k_cache.element_type() == ffi::DataType::F8E4M3FN;
  if (k_cache.element_type() != dtype && !fp8_keys)
    return ffi::Error::InvalidArgument(
        "k_cache: expected the dtype of q, or uint8 or float8_e4m3fn (the FP8 layout)");
  for (auto [name, buf] : {std::pair<const char*, ffi::AnyBuffer*>{"block_table", &block_table},
                           {"cache_seqlens", &cache_seqlens},
                           {"tile_scheduler_metadata", &tile_scheduler_metadata},
                           {"num_splits", &num_splits}}) {
    if (buf->element_type() != ffi::DataType::S32)
      return ffi::Error::InvalidArgument(std::string(name) + ": expected dtype int32");
  }

  const auto qd = q.dimensions();
  const auto kd = k_cache.dimensions();
  const int64_t batch = qd[0], seqlen_q = qd[1], heads_q = qd[2], head_dim = qd[3];
  const int64_t num_blocks = kd[0], page = kd[1], heads_k = kd[2];
  if (head_dim != 576 && head_dim != 512)
    return ffi::Error::InvalidArgument("q: expected head dim 576 or 512, got " +
                                       std::to_string(head_dim));
  if (fp8_keys) {
    if (dtype != ffi::DataType::BF16 || head_dim != kSparseHeadDim)
      return ffi::Error::InvalidArgument(
          "q: expected bfloat16 with head dim 576 for an FP8 k_cache, got head dim " +
          std::to_string(head_dim));
    if (kd[3] != kFp8BytesPerToken || heads_k != 1)
      return shape_error("k_cache", shape_string({num_blocks, page, 1, kFp8BytesPerToken}), kd);
    // Pool tokens are addressed as int32 (pool_token_of).
    if (num_blocks * page > INT32_MAX)
      return ffi::Error::InvalidArgument("k_cache: expected at most 2^31 - 1 tokens, got " +
                                         std::to_string(num_blocks * page));
  } else if (kd[3] != head_dim) {
    return ffi::Error::InvalidArgument("k_cache: expected head dim " + std::to_string(head_dim) +
                                       " (as q), got " + std::to_string(kd[3]));
  }
  if (head_dim_v != 512)
    return ffi::Error::InvalidArgument("head_dim_v: expected 512, got " +
                                       std::to_string(head_dim_v));
  if (heads_k <= 0 || heads_q % heads_k != 0)
    return ffi::Error::InvalidArgument("k_cache: num_heads_k " + std::to_string(heads_k) +
                                       " must divide num_heads_q " + std::to_string(heads_q));
  if (page <= 0) return ffi::Error::InvalidArgument("k_cache: page_block_size must be > 0");
  const int64_t max_blocks = block_table.dimensions()[1];
  if (block_table.dimensions()[0] != batch)
    return shape_error("block_table", shape_string({batch, max_blocks}),
                       block_table.dimensions());
  if (!has_shape(cache_seqlens.dimensions(), {batch}))
    return shape_error("cache_seqlens", shape_string({batch}), cache_seqlens.dimensions());
  const int64_t parts = tile_scheduler_metadata.dimensions()[0];
  if (parts <= 0 || tile_scheduler_metadata.dimensions()[1] != kMetadataInts)
    return shape_error("tile_scheduler_metadata", shape_string({parts, kMetadataInts}),
                       tile_scheduler_metadata.dimensions());
  if (!has_shape(num_splits.dimensions(), {batch + 1}))
    return shape_error("num_splits", shape_string({batch + 1}), num_splits.dimensions());

  const int64_t rows = seqlen_q * (heads_q / heads_k);
  const int64_t slots = max_split_slots(batch, parts);
  const auto out_type = out->element_type();
  if (out_type != dtype || !has_shape(out->dimensions(), {batch, seqlen_q, heads_q, head_dim_v}))
    return shape_error("out", shape_string({batch, seqlen_q, heads_q, head_dim_v}),
                       out->dimensions());
  if (lse->element_type() != ffi::DataType::F32 ||
      !has_shape(lse->dimensions(), {batch, heads_q, seqlen_q}))
    return shape_error("lse", shape_string({batch, heads_q, seqlen_q}), lse->dimensions());
  if (o_accum->element_type() != ffi::DataType::F32 ||
      !has_shape(o_accum->dimensions(), {slots, heads_k, rows, head_dim_v}))
    return shape_error("o_accum", shape_string({slots, heads_k, rows, head_dim_v}),
                       o_accum->dimensions());
  if (lse_accum->element_type() != ffi::DataType::F32 ||
      !has_shape(lse_accum->dimensions(), {slots, heads_k, rows}))
    return shape_error("lse_accum", shape_string({slots, heads_k, rows}),
                       lse_accum->dimensions());

  p->batch = static_cast<int>(batch);
  p->seqlen_q = static_cast<int>(seqlen_q);
  p->num_heads_q = static_cast<int>(heads_q);
  p->num_heads_k = static_cast<int>(heads_k);
  p->heads_per_kv = static_cast<int>(heads_q / heads_k);
  p->rows_per_kv = static_cast<int>(rows);
  p->head_dim = static_cast<int>(head_dim);
  p->head_dim_v = head_dim_v;
  p->num_blocks = static_cast<int>(num_blocks);
  p->page_block_size = static_cast<int>(page);
  p->max_blocks_per_seq = static_cast<int>(max_blocks);
  p->num_sm_parts = static_cast<int>(parts);
  p->num_split_slots = static_cast<int>(slots);
  p->dtype = dtype == ffi::DataType::BF16 ? ElementType::kBF16 : ElementType::kFP16;
  p->softmax_scale = softmax_scale;
  p->causal = causal;
  p->key_format = fp8_keys ? KeyFormat::kFp8Packed : KeyFormat::kSameAsQuery;
  p->attn_sink = nullptr;
  p->q = q.untyped_data();
  p->k_cache = k_cache.untyped_data();
  p->block_table = static_cast<const int32_t*>(block_table.untyped_data());
  p->cache_seqlens = static_cast<const int32_t*>(cache_seqlens.untyped_data());
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

// Checks shared by the CPU and CUDA metadata handlers.
inline ffi::Error check_metadata_args(ffi::AnyBuffer cache_seqlens,
                                      ffi::Result<ffi::AnyBuffer>& tile_scheduler_metadata,
                                      ffi::Result<ffi::AnyBuffer>& num_splits) {
  if (cache_seqlens.element_type() != ffi::DataType::S32 ||
      cache_seqlens.dimensions().size() != 1)
    return ffi::Error::InvalidArgument("cache_seqlens: expected a rank-1 int32 array, got " +
                                       dims_to_string(cache_seqlens.dimensions()));
  if (tile_scheduler_metadata->element_type() != ffi::DataType::S32 ||
      num_splits->element_type() != ffi::DataType::S32)
    return ffi::Error::InvalidArgument(
        "tile_scheduler_metadata, num_splits: expected dtype int32 outputs");
  const int64_t batch = cache_seqlens.dimensions()[0];
  const auto md = tile_scheduler_metadata->dimensions();
  if (md.size() != 2 || md[0] <= 0 || md[1] != kMetadataInts)
    return shape_error("tile_scheduler_metadata",
                       "[num_sm_parts, " + std::to_string(kMetadataInts) + "]", md);
  if (!has_shape(num_splits->dimensions(), {batch + 1}))
    return shape_error("num_splits", shape_string({batch + 1}), num_splits->dimensions());
  return ffi::Error::Success();
}

// The decode target's `kernel` attribute, checked by both platforms' handlers: kDispatch (what
// the public API passes) or the SplitKvKernel a test forces. The CPU path has one
// implementation and ignores a valid value; the CUDA dispatch trusts it once checked here.
inline ffi::Error check_kernel_attr(int32_t kernel) {
  constexpr int32_t first = static_cast<int32_t>(SplitKvKernel::kDispatch);
  constexpr int32_t last = static_cast<int32_t>(SplitKvKernel::kSeesawPaired);
  if (kernel < first || kernel > last)
    return ffi::Error::InvalidArgument("kernel: expected a SplitKvKernel in [" +
                                       std::to_string(first) + ", " + std::to_string(last) +
                                       "], got " + std::to_string(kernel));
  return ffi::Error::Success();
}

// The operands of the two targets, in the order both platforms' handlers take them (the CUDA
// handlers bind their stream first): one list, so the CPU and CUDA targets cannot drift apart.
template <typename Binding>
auto bind_metadata_operands(Binding binding) {
  return std::move(binding).template Arg<ffi::AnyBuffer>()  // cache_seqlens [batch] int32
      .template Ret<ffi::AnyBuffer>()            // tile_scheduler_metadata
      .template Ret<ffi::AnyBuffer>();           // num_splits [batch + 1]
}

// Initial out and lse are aliased to out and lse when given (tests poison them; the kernels
// write every element); o_accum and lse_accum are the split scratch, owned by XLA.
template <typename Binding>
auto bind_decode_operands(Binding binding) {
  return std::move(binding).template Arg<ffi::AnyBuffer>()  // q
      .template Arg<ffi::AnyBuffer>()            // k_cache
      .template Arg<ffi::AnyBuffer>()            // block_table
      .template Arg<ffi::AnyBuffer>()            // cache_seqlens
      .template Arg<ffi::AnyBuffer>()            // tile_scheduler_metadata
      .template Arg<ffi::AnyBuffer>()            // num_splits
      .template OptionalArg<ffi::AnyBuffer>()    // initial_out
      .template OptionalArg<ffi::AnyBuffer>()    // initial_lse
      .template Attr<float>("softmax_scale")
      .template Attr<bool>("causal")
      .template Attr<int32_t>("head_dim_v")
      .template Attr<int32_t>("kernel")  // a SplitKvKernel (heuristics.h); 0 lets dispatch pick
      .template Ret<ffi::AnyBuffer>()   // out
      .template Ret<ffi::AnyBuffer>()   // lse
      .template Ret<ffi::AnyBuffer>()   // o_accum
      .template Ret<ffi::AnyBuffer>();  // lse_accum
}

}  // namespace jax_flash_mla
