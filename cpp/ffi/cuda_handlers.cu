// XLA FFI handlers of the CUDA path: decode and check the buffers, then enqueue the sm90
// kernels on XLA's stream. Nothing here allocates or waits on the device, so both handlers can
// be captured into CUDA graphs (command buffers).
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>

#include "../sm90/kernels.h"
#include "decode_args.h"
#include "xla/ffi/api/ffi.h"

namespace jax_flash_mla {
namespace {

ffi::Error cuda_error(const char* what, cudaError_t err) {
  return ffi::Error::Internal(std::string(what) + ": " + cudaGetErrorName(err) + ": " +
                              cudaGetErrorString(err));
}

// JAX_FLASH_MLA_KERNEL selects the split-KV kernel, for comparisons: "simple" is the first
// (CUDA-core) kernel, "cpasync" the tensor-core kernels with their cp.async key gather and
// query rows for every shape, "wide" the default with the 64-row tier for every head count,
// "seesaw" the seesaw schedule (decode_seesaw_kernel.cu) wherever it applies (d = 576, TMA key
// tiles and query rows, more than kNarrowMaxRows rows), paired where its CTAs pair,
// "seesaw-unpaired" the same never paired (each CTA copies its own keys), "lockstep" the 64-row
// kernel (decode_wgmma_kernel.cu) in its place everywhere. Unset, the tensor-core kernels copy
// with TMA where they can; at most kNarrowMaxRows query rows per KV head go to the narrow
// kernel (at 17-32 rows only with more than a few key tiles a CTA, narrow_kernel_pays, v25;
// else to the 64-row kernel); more go to the seesaw kernel where its CTAs pair
// (benchmarks/NOTES.md v17) or where one row block's CTAs have long shares of keys (v19), else
// to the 64-row one. Read once per process.
enum class KernelChoice { kSimple, kCpAsync, kWide, kSeesaw, kSeesawUnpaired, kLockstep, kTma };

KernelChoice kernel_choice() {
  static const KernelChoice choice = [] {
    struct Named {
      const char* name;
      KernelChoice choice;
    };
    constexpr Named kChoices[] = {{"simple", KernelChoice::kSimple},
                                  {"cpasync", KernelChoice::kCpAsync},
                                  {"wide", KernelChoice::kWide},
                                  {"seesaw", KernelChoice::kSeesaw},
                                  {"seesaw-unpaired", KernelChoice::kSeesawUnpaired},
                                  {"lockstep", KernelChoice::kLockstep}};
    const char* name = std::getenv("JAX_FLASH_MLA_KERNEL");
    if (name == nullptr) return KernelChoice::kTma;
    for (const Named& named : kChoices)
      if (std::string(name) == named.name) return named.choice;
    return KernelChoice::kTma;
  }();
  return choice;
}

SeesawUse seesaw_use(KernelChoice choice) {
  switch (choice) {
    case KernelChoice::kSeesaw: return SeesawUse::kAlways;
    case KernelChoice::kSeesawUnpaired: return SeesawUse::kAlwaysUnpaired;
    case KernelChoice::kLockstep: return SeesawUse::kNever;
    default: return SeesawUse::kWhereFaster;
  }
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
                      bool causal, int32_t head_dim_v,
                      ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                      ffi::Result<ffi::AnyBuffer> o_accum, ffi::Result<ffi::AnyBuffer> lse_accum) {
  DecodeParams params;
  if (ffi::Error err = decode_params(q, k_cache, block_table, cache_seqlens,
                                     tile_scheduler_metadata, num_splits, softmax_scale, causal,
                                     head_dim_v, out, lse, o_accum, lse_accum, &params);
      err.failure())
    return err;
  const KernelChoice choice = kernel_choice();
  const bool allow_tma = choice != KernelChoice::kCpAsync;
  cudaError_t err;
  if (choice == KernelChoice::kSimple)
    err = launch_split_kv_decode(params, stream);
  else if (choice != KernelChoice::kWide && params.rows_per_kv <= kNarrowMaxRows &&
           narrow_kernel_pays(params))
    err = launch_split_kv_decode_narrow(params, allow_tma, stream);
  else
    err = launch_split_kv_decode_wgmma(params, allow_tma, seesaw_use(choice), stream);
  if (err != cudaSuccess) return cuda_error("split-KV decode kernel", err);
  err = launch_combine(params, stream);
  if (err != cudaSuccess) return cuda_error("combine kernel", err);
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
