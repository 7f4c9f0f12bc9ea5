// XLA FFI handlers of the CPU platform: the same argument decoding as the CUDA handlers, then
// the CPU schedule, split-KV step and combine.
#include <cstdint>

#include "../common/tile_scheduler.h"
#include "../cpu/decode_cpu.h"
#include "decode_args.h"
#include "sparse_decode_args.h"
#include "xla/ffi/api/ffi.h"

namespace jax_flash_mla {
namespace {

ffi::Error GetMlaMetadataCpuImpl(ffi::AnyBuffer cache_seqlens,
                                 ffi::Result<ffi::AnyBuffer> tile_scheduler_metadata,
                                 ffi::Result<ffi::AnyBuffer> num_splits) {
  if (ffi::Error error = check_metadata_args(cache_seqlens, tile_scheduler_metadata, num_splits);
      error.failure())
    return error;
  build_tile_schedule(static_cast<const int32_t*>(cache_seqlens.untyped_data()),
                      static_cast<int>(cache_seqlens.dimensions()[0]),
                      static_cast<int>(tile_scheduler_metadata->dimensions()[0]),
                      static_cast<int32_t*>(tile_scheduler_metadata->untyped_data()),
                      static_cast<int32_t*>(num_splits->untyped_data()));
  return ffi::Error::Success();
}

ffi::Error FlashMlaDecodeCpuImpl(ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                                 ffi::AnyBuffer block_table, ffi::AnyBuffer cache_seqlens,
                                 ffi::AnyBuffer tile_scheduler_metadata, ffi::AnyBuffer num_splits,
                                 std::optional<ffi::AnyBuffer> /*initial_out*/,
                                 std::optional<ffi::AnyBuffer> /*initial_lse*/, float softmax_scale,
                                 bool causal, int32_t head_dim_v, int32_t kernel,
                                 ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                                 ffi::Result<ffi::AnyBuffer> o_accum,
                                 ffi::Result<ffi::AnyBuffer> lse_accum) {
  DecodeParams params;
  if (ffi::Error error = decode_params(q, k_cache, block_table, cache_seqlens,
                                       tile_scheduler_metadata, num_splits, softmax_scale, causal,
                                       head_dim_v, out, lse, o_accum, lse_accum, &params);
      error.failure())
    return error;
  // One CPU implementation runs every split-KV kernel's calls: a forced kernel only has to be
  // one that exists, so that a bad value fails here as it would on the GPU.
  if (ffi::Error error = check_kernel_attr(kernel); error.failure()) return error;
  split_kv_decode_cpu(params);
  combine_cpu(params);
  return ffi::Error::Success();
}

// Sparse decode: the same schedule walk and combine over one request per query token, whose
// keys are the tokens its indices name (params.h).
ffi::Error FlashMlaSparseDecodeCpuImpl(
    ffi::AnyBuffer q, ffi::AnyBuffer k_cache, ffi::AnyBuffer indices, ffi::AnyBuffer lengths,
    ffi::AnyBuffer attn_sink, ffi::AnyBuffer tile_scheduler_metadata, ffi::AnyBuffer num_splits,
    std::optional<ffi::AnyBuffer> /*initial_out*/, std::optional<ffi::AnyBuffer> /*initial_lse*/,
    float softmax_scale, bool is_fp8_kvcache, int32_t head_dim_v, ffi::Result<ffi::AnyBuffer> out,
    ffi::Result<ffi::AnyBuffer> lse, ffi::Result<ffi::AnyBuffer> o_accum,
    ffi::Result<ffi::AnyBuffer> lse_accum) {
  DecodeParams params;
  if (ffi::Error error = sparse_decode_params(
          q, k_cache, indices, lengths, attn_sink, tile_scheduler_metadata, num_splits,
          softmax_scale, is_fp8_kvcache, head_dim_v, out, lse, o_accum, lse_accum, &params);
      error.failure())
    return error;
  split_kv_decode_cpu(params);
  combine_cpu(params);
  return ffi::Error::Success();
}

// Sparse prefill (flash_mla_sparse_fwd): sparse decode with each prompt token a request, plus
// every row's largest scaled score.
ffi::Error FlashMlaSparsePrefillCpuImpl(
    ffi::AnyBuffer q, ffi::AnyBuffer kv, ffi::AnyBuffer indices, ffi::AnyBuffer lengths,
    ffi::AnyBuffer attn_sink, ffi::AnyBuffer tile_scheduler_metadata, ffi::AnyBuffer num_splits,
    std::optional<ffi::AnyBuffer> /*initial_out*/, std::optional<ffi::AnyBuffer> /*initial_lse*/,
    std::optional<ffi::AnyBuffer> /*initial_max_logits*/, float softmax_scale,
    bool is_fp8_kvcache, int32_t head_dim_v, ffi::Result<ffi::AnyBuffer> out,
    ffi::Result<ffi::AnyBuffer> lse, ffi::Result<ffi::AnyBuffer> max_logits, ffi::Result<ffi::AnyBuffer> o_accum,
    ffi::Result<ffi::AnyBuffer> lse_accum, ffi::Result<ffi::AnyBuffer> max_accum) {
  DecodeParams params;
  if (ffi::Error error = sparse_decode_params(
          q, kv, indices, lengths, attn_sink, tile_scheduler_metadata, num_splits,
          softmax_scale, is_fp8_kvcache, head_dim_v, out, lse, o_accum, lse_accum, &params);
      error.failure())
    return error;
  if (ffi::Error error = sparse_prefill_max_params(max_logits, max_accum, lse->dimensions(),
                                                   lse_accum->dimensions(), &params);
      error.failure())
    return error;
  split_kv_decode_cpu(params);
  combine_cpu(params);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_flash_mla

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_flash_mla_get_mla_metadata_cpu,
                              jax_flash_mla::GetMlaMetadataCpuImpl,
                              jax_flash_mla::bind_metadata_operands(xla::ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_flash_mla_decode_cpu, jax_flash_mla::FlashMlaDecodeCpuImpl,
                              jax_flash_mla::bind_decode_operands(xla::ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_flash_mla_sparse_decode_cpu,
                              jax_flash_mla::FlashMlaSparseDecodeCpuImpl,
                              jax_flash_mla::bind_sparse_decode_operands(xla::ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_flash_mla_sparse_prefill_cpu,
                              jax_flash_mla::FlashMlaSparsePrefillCpuImpl,
                              jax_flash_mla::bind_sparse_prefill_operands(xla::ffi::Ffi::Bind()));
