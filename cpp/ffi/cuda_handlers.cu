// XLA FFI handlers of the CUDA path: decode and check the buffers, then enqueue the sm90
// kernels on XLA's stream. Nothing here allocates or waits on the device, so both handlers can
// be captured into CUDA graphs (command buffers).
#include <cuda_runtime.h>

#include <cstdint>
#include <optional>
#include <string>

#include "../sm90/kernels.h"
#include "decode_args.h"
#include "sparse_decode_args.h"
#include "xla/ffi/api/ffi.h"

namespace jax_flash_mla {
namespace {

ffi::Error cuda_error(const char* what, cudaError_t err) {
  return ffi::Error::Internal(std::string(what) + ": " + cudaGetErrorName(err) + ": " +
                              cudaGetErrorString(err));
}

ffi::Error GetMlaMetadataImpl(cudaStream_t stream, ffi::AnyBuffer cache_seqlens,
                              ffi::Result<ffi::AnyBuffer> tile_scheduler_metadata,
                              ffi::Result<ffi::AnyBuffer> num_splits) {
  if (ffi::Error err = check_metadata_args(cache_seqlens, tile_scheduler_metadata, num_splits);
      err.failure())
    return err;
  const int batch = static_cast<int>(cache_seqlens.dimensions()[0]);
  const int num_sm_parts = static_cast<int>(tile_scheduler_metadata->dimensions()[0]);
  const cudaError_t err = launch_tile_schedule(
      static_cast<const int32_t*>(cache_seqlens.untyped_data()), batch, num_sm_parts,
      static_cast<int32_t*>(tile_scheduler_metadata->untyped_data()),
      static_cast<int32_t*>(num_splits->untyped_data()), stream);
  if (err != cudaSuccess) return cuda_error("tile schedule kernel", err);
  return ffi::Error::Success();
}

ffi::Error DecodeImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                      ffi::AnyBuffer block_table, ffi::AnyBuffer cache_seqlens,
                      ffi::AnyBuffer tile_scheduler_metadata, ffi::AnyBuffer num_splits,
                      std::optional<ffi::AnyBuffer> /*initial_out*/,
                      std::optional<ffi::AnyBuffer> /*initial_lse*/, float softmax_scale,
                      bool causal, int32_t head_dim_v, int32_t kernel,
                      ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                      ffi::Result<ffi::AnyBuffer> o_accum, ffi::Result<ffi::AnyBuffer> lse_accum) {
  DecodeParams params;
  if (ffi::Error err = decode_params(q, k_cache, block_table, cache_seqlens,
                                     tile_scheduler_metadata, num_splits, softmax_scale, causal,
                                     head_dim_v, out, lse, o_accum, lse_accum, &params);
      err.failure())
    return err;
  if (ffi::Error err = check_kernel_attr(kernel); err.failure()) return err;
  cudaError_t err = launch_split_kv(params, static_cast<SplitKvKernel>(kernel), stream);
  if (err == cudaErrorNotSupported)
    return ffi::Error::InvalidArgument(
        "kernel: the forced split-KV kernel " + std::to_string(kernel) +
        " cannot run this call (see split_kv_kernel_can_run in cpp/sm90/heuristics.h)");
  if (err != cudaSuccess) return cuda_error("split-KV decode kernel", err);
  err = launch_combine(params, stream);
  if (err != cudaSuccess) return cuda_error("combine kernel", err);
  return ffi::Error::Success();
}

// Sparse decode: the dense split-KV kernels and combine run it (params.h: one request per
// query token, one-token pages, so the key producer gathers exactly the selected tokens; FP8
// tokens are dequantized as they are gathered, key_tile_dequant.h).
ffi::Error SparseDecodeImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                            ffi::AnyBuffer indices, ffi::AnyBuffer lengths,
                            ffi::AnyBuffer attn_sink, ffi::AnyBuffer tile_scheduler_metadata,
                            ffi::AnyBuffer num_splits,
                            std::optional<ffi::AnyBuffer> /*initial_out*/,
                            std::optional<ffi::AnyBuffer> /*initial_lse*/, float softmax_scale,
                            bool is_fp8_kvcache, int32_t head_dim_v,
                            ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                            ffi::Result<ffi::AnyBuffer> o_accum,
                            ffi::Result<ffi::AnyBuffer> lse_accum) {
  DecodeParams params;
  if (ffi::Error err = sparse_decode_params(q, k_cache, indices, lengths, attn_sink,
                                            tile_scheduler_metadata, num_splits, softmax_scale,
                                            is_fp8_kvcache, head_dim_v, out, lse, o_accum,
                                            lse_accum, &params);
      err.failure())
    return err;
  cudaError_t err = launch_split_kv(params, SplitKvKernel::kDispatch, stream);
  if (err != cudaSuccess) return cuda_error("split-KV decode kernel (sparse)", err);
  err = launch_combine(params, stream);
  if (err != cudaSuccess) return cuda_error("combine kernel (sparse)", err);
  return ffi::Error::Success();
}

// Sparse prefill (flash_mla_sparse_fwd): sparse decode with each prompt token a request, and
// every row's largest scaled score written beside its lse (segment_output.h, the combine).
ffi::Error SparsePrefillImpl(
    cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer kv, ffi::AnyBuffer indices,
    ffi::AnyBuffer lengths, ffi::AnyBuffer attn_sink, ffi::AnyBuffer tile_scheduler_metadata,
    ffi::AnyBuffer num_splits, std::optional<ffi::AnyBuffer> /*initial_out*/,
    std::optional<ffi::AnyBuffer> /*initial_lse*/,
    std::optional<ffi::AnyBuffer> /*initial_max_logits*/, float softmax_scale,
    bool is_fp8_kvcache, int32_t head_dim_v, ffi::Result<ffi::AnyBuffer> out,
    ffi::Result<ffi::AnyBuffer> lse, ffi::Result<ffi::AnyBuffer> max_logits,
    ffi::Result<ffi::AnyBuffer> o_accum, ffi::Result<ffi::AnyBuffer> lse_accum,
    ffi::Result<ffi::AnyBuffer> max_accum) {
  DecodeParams params;
  if (ffi::Error err = sparse_decode_params(q, kv, indices, lengths, attn_sink,
                                            tile_scheduler_metadata, num_splits, softmax_scale,
                                            is_fp8_kvcache, head_dim_v, out, lse, o_accum,
                                            lse_accum, &params);
      err.failure())
    return err;
  if (ffi::Error err = sparse_prefill_max_params(max_logits, max_accum, lse->dimensions(),
                                                 lse_accum->dimensions(), &params);
      err.failure())
    return err;
  cudaError_t err = launch_split_kv(params, SplitKvKernel::kDispatch, stream);
  if (err != cudaSuccess) return cuda_error("split-KV kernel (sparse prefill)", err);
  err = launch_combine(params, stream);
  if (err != cudaSuccess) return cuda_error("combine kernel (sparse prefill)", err);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_flash_mla

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jax_flash_mla_get_mla_metadata_cuda, jax_flash_mla::GetMlaMetadataImpl,
    jax_flash_mla::bind_metadata_operands(
        xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()),
    {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jax_flash_mla_decode_cuda, jax_flash_mla::DecodeImpl,
    jax_flash_mla::bind_decode_operands(
        xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()),
    {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jax_flash_mla_sparse_decode_cuda, jax_flash_mla::SparseDecodeImpl,
    jax_flash_mla::bind_sparse_decode_operands(
        xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()),
    {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jax_flash_mla_sparse_prefill_cuda, jax_flash_mla::SparsePrefillImpl,
    jax_flash_mla::bind_sparse_prefill_operands(
        xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()),
    {xla::ffi::Traits::kCmdBufferCompatible});
