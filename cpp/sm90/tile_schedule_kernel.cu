// Device-side tile schedule: one block runs the serial build_tile_schedule, so the metadata
// depends on cache_seqlens without a device-to-host copy.
//
// The schedule is a chain of dependent reads and read-modify-writes; done straight on global
// memory every step would pay a full memory latency. When the inputs and outputs fit, the
// block stages them in shared memory with all its threads, one thread builds the schedule
// there, and all threads copy it out.
#include <cstdint>

#include "../common/tile_scheduler.h"
#include "kernels.h"

namespace jax_flash_mla {
namespace {

constexpr int kScheduleThreads = 256;
// Stays under the default 48 KiB of dynamic shared memory, so no attribute call is needed.
constexpr int64_t kMaxStagedInts = 48 * 1024 / sizeof(int32_t);

__global__ void __launch_bounds__(kScheduleThreads)
    tile_schedule_kernel(const int32_t* cache_seqlens, int batch, int num_sm_parts,
                         int32_t* tile_scheduler_metadata, int32_t* num_splits, bool staged) {
  if (!staged) {
    if (threadIdx.x == 0)
      build_tile_schedule(cache_seqlens, batch, num_sm_parts, tile_scheduler_metadata,
                          num_splits);
    return;
  }
  extern __shared__ int32_t staged_ints[];
  int32_t* seqlens_smem = staged_ints;
  int32_t* num_splits_smem = seqlens_smem + batch;
  int32_t* metadata_smem = num_splits_smem + batch + 1;
  const int64_t metadata_ints = static_cast<int64_t>(num_sm_parts) * kMetadataInts;

  for (int i = threadIdx.x; i < batch; i += blockDim.x) seqlens_smem[i] = cache_seqlens[i];
  __syncthreads();
  if (threadIdx.x == 0)
    build_tile_schedule(seqlens_smem, batch, num_sm_parts, metadata_smem, num_splits_smem);
  __syncthreads();
  for (int64_t i = threadIdx.x; i < metadata_ints; i += blockDim.x)
    tile_scheduler_metadata[i] = metadata_smem[i];
  for (int i = threadIdx.x; i <= batch; i += blockDim.x) num_splits[i] = num_splits_smem[i];
}

}  // namespace

cudaError_t launch_tile_schedule(const int32_t* cache_seqlens, int batch, int num_sm_parts,
                                 int32_t* tile_scheduler_metadata, int32_t* num_splits,
                                 cudaStream_t stream) {
  if (batch < 0 || num_sm_parts <= 0) return cudaErrorInvalidValue;
  const int64_t staged_ints =
      2 * static_cast<int64_t>(batch) + 1 + static_cast<int64_t>(num_sm_parts) * kMetadataInts;
  const bool staged = staged_ints <= kMaxStagedInts;
  const size_t smem_bytes = staged ? staged_ints * sizeof(int32_t) : 0;
  tile_schedule_kernel<<<1, kScheduleThreads, smem_bytes, stream>>>(
      cache_seqlens, batch, num_sm_parts, tile_scheduler_metadata, num_splits, staged);
  return cudaGetLastError();
}

}  // namespace jax_flash_mla
