// The split-KV step's dispatch: checks a call once for every kernel, reads what the device
// allows, lets heuristics.h pick the kernel (or takes the one a test forces), builds the tensor
// maps that kernel reads and calls its launcher.
#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/params.h"
#include "heuristics.h"
#include "kernels.h"
#include "once_per_device.h"
#include "paged_kv_tensor_map.h"
#include "query_tensor_map.h"

namespace jax_flash_mla {
namespace {

int multiprocessor_count() {
  return once_per_device([] {
    int device = 0, sms = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    return sms;
  });
}

DispatchInputs dispatch_inputs(const DecodeParams& p) {
  DispatchInputs in;
  in.rows_per_kv = p.rows_per_kv;
  in.head_dim = p.head_dim;
  in.batch = p.batch;
  in.max_blocks_per_seq = p.max_blocks_per_seq;
  in.page_block_size = p.page_block_size;
  in.num_sm_parts = p.num_sm_parts;
  in.num_heads_k = p.num_heads_k;
  in.keys_fit_tma = paged_kv_fits_tma(p);
  in.query_fits_tma = query_fits_tma(p, kRowsPerCta);
  in.sms = multiprocessor_count();
  in.max_resident_pairs = seesaw_resident_pairs();
  return in;
}

// The maps `kernel` reads: the seesaw kernel gathers 64-column blocks of each page's run of keys
// (its refills free a tile by column pieces), the others key groups (one box per 8 keys with all
// their columns); the transposed kernel stages 16 or 32 query rows, the others kRowsPerCta.
SplitKvMaps tensor_maps(const DecodeParams& p, SplitKvKernel kernel) {
  SplitKvMaps maps;
  maps.keys_by_tma = is_seesaw(kernel) ? make_paged_kv_tensor_map(p, &maps.keys)
                                       : make_paged_kv_key_group_tensor_map(p, &maps.keys);
  const int query_rows = kernel == SplitKvKernel::kTransposed
                             ? transposed_rows_per_cta(p.rows_per_kv)
                             : kRowsPerCta;
  maps.query_by_tma = make_query_tensor_map(p, query_rows, &maps.query);
  return maps;
}

cudaError_t launch_kernel(const DecodeParams& p, SplitKvKernel kernel, const SplitKvMaps& maps,
                          cudaStream_t stream) {
  switch (kernel) {
    case SplitKvKernel::kTransposed: return launch_split_kv_transposed(p, maps, stream);
    case SplitKvKernel::kSeesawAlone: return launch_split_kv_seesaw(p, maps, false, stream);
    case SplitKvKernel::kSeesawPaired: return launch_split_kv_seesaw(p, maps, true, stream);
    default: return launch_split_kv_lockstep(p, maps, stream);
  }
}

}  // namespace

cudaError_t launch_split_kv(const DecodeParams& p, SplitKvKernel kernel, cudaStream_t stream) {
  // Launch guards of every kernel: the head dims their layouts hold, a schedule to walk, and a
  // grid within CUDA's limits on y and z.
  if ((p.head_dim != 576 && p.head_dim != 512) || p.head_dim_v != kSupportedHeadDimV ||
      p.num_sm_parts <= 0 || p.num_heads_k <= 0)
    return cudaErrorInvalidValue;
  // FP8 keys are DeepSeek-V3.2's 656-byte latents: bf16 queries of 576 columns, one KV head
  // (key_tile_producer.h reads them only there).
  if (p.key_format == KeyFormat::kFp8Packed &&
      (p.dtype != ElementType::kBF16 || p.head_dim != kSparseHeadDim || p.num_heads_k != 1))
    return cudaErrorInvalidValue;
  if (p.batch <= 0 || p.rows_per_kv <= 0) return cudaSuccess;  // no query row, nothing to attend
  if (p.num_heads_k > 65535 || row_blocks_per_kv_head(p.rows_per_kv) > 65535)
    return cudaErrorInvalidConfiguration;

  const DispatchInputs in = dispatch_inputs(p);
  const bool forced = kernel != SplitKvKernel::kDispatch;
  if (!forced) kernel = choose_split_kv_kernel(in);
  // The seesaw kernel's first math warpgroup keeps no running max, so it has no lse to weigh an
  // attention sink by and no max_logits to write (sparse calls, whose one-token pages never fit
  // its TMA maps anyway).
  if (is_seesaw(kernel) && (p.attn_sink != nullptr || p.max_logits != nullptr)) {
    if (forced) return cudaErrorNotSupported;
    kernel = SplitKvKernel::kLockstep;
  }
  if (!split_kv_kernel_can_run(in, kernel)) return cudaErrorNotSupported;
  SplitKvMaps maps = tensor_maps(p, kernel);
  if (is_seesaw(kernel) && !(maps.keys_by_tma && maps.query_by_tma)) {
    // The driver refused a map the shape allows (paged_kv_tensor_map.h reports it): the
    // lockstep kernel runs the call instead, unless a test forced the seesaw.
    if (forced) return cudaErrorNotSupported;
    kernel = SplitKvKernel::kLockstep;
    maps = tensor_maps(p, kernel);
  }
  return launch_kernel(p, kernel, maps, stream);
}

}  // namespace jax_flash_mla
