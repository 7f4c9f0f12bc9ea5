// Device-side tile schedule: one block builds the schedule of tile_scheduler.h, so the metadata
// depends on cache_seqlens without a device-to-host copy.
//
// The schedule is a chain of dependent reads and read-modify-writes, one thread's serial walk
// over the requests and pieces; done straight on global memory every step would pay a full
// memory latency. When they fit, the block stages each request's tile count in shared memory
// (all threads), and the walks write their pieces there, to be copied out by all threads. The
// candidate budgets (at most kFixedOverheadTiles + 1) are walked at once, one warp's lane 0
// each, each into its own copy of the schedule where the copies fit: choosing the budget then
// costs about one walk, not six (where they do not fit, the chosen one is walked again).
#include <cstdint>

#include "../common/tile_scheduler.h"
#include "kernels.h"

namespace jax_flash_mla {
namespace {

constexpr int kScheduleThreads = 256;
constexpr int kScheduleWarps = kScheduleThreads / 32;
static_assert(kScheduleWarps >= kMaxScheduleBudgets, "a warp for each candidate budget");
// Stays under the default 48 KiB of dynamic shared memory, so no attribute call is needed.
constexpr int64_t kMaxStagedInts = 48 * 1024 / sizeof(int32_t);

// Shared memory when staged: the tile counts, then `copies` schedules (metadata, num_splits).
// copies: kMaxScheduleBudgets (one a candidate budget), 1 (the chosen budget walked again into it)
// or 0 (not staged: the walks read the lengths in place and write the schedule out directly).
struct StagedLayout {
  int64_t schedule_ints = 0;  // one copy: metadata, then num_splits
  int copies = 0;

  __host__ __device__ StagedLayout(int batch, int num_sm_parts) {
    schedule_ints = static_cast<int64_t>(num_sm_parts) * kMetadataInts + batch + 1;
    if (total_ints(batch, kMaxScheduleBudgets) <= kMaxStagedInts)
      copies = kMaxScheduleBudgets;
    else if (total_ints(batch, 1) <= kMaxStagedInts)
      copies = 1;
  }
  __host__ __device__ int64_t total_ints(int batch, int c) const {
    return batch + c * schedule_ints;
  }
};

__device__ void copy_out(const int32_t* from, int32_t* to, int64_t count) {
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) to[i] = from[i];
}

// One block a grid: told so, ptxas keeps the walk's state in 40 registers instead of spilling
// at 32.
__global__ void __launch_bounds__(kScheduleThreads, 1)
    tile_schedule_kernel(const int32_t* cache_seqlens, int batch, int num_sm_parts,
                         int32_t* tile_scheduler_metadata, int32_t* num_splits) {
  extern __shared__ int32_t staged_ints[];
  __shared__ ScheduleBudgets budgets;
  __shared__ int segments[kMaxScheduleBudgets];  // of budget first + i; -1: does not fit
  __shared__ int chosen;
  const StagedLayout layout(batch, num_sm_parts);
  const int64_t metadata_ints = static_cast<int64_t>(num_sm_parts) * kMetadataInts;
  const auto schedule_copy = [&](int c) { return staged_ints + batch + c * layout.schedule_ints; };
  const auto walk = [&](const auto& tiles_of) {
    if (threadIdx.x == 0) budgets = schedule_budgets(tiles_of, batch, num_sm_parts);
    __syncthreads();
    // Warp w walks budget first + w, the last with the rest absorbed (it always fits).
    const int warp = threadIdx.x / 32;
    const int64_t budget = budgets.first + warp;
    if (threadIdx.x % 32 == 0 && budget <= budgets.last) {
      int32_t* metadata = layout.copies > 1 ? schedule_copy(warp) : nullptr;
      int32_t* splits = layout.copies > 1 ? metadata + metadata_ints : nullptr;
      segments[warp] = walk_tile_schedule(tiles_of, batch, num_sm_parts, budget,
                                          budget == budgets.last, metadata, splits);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      chosen = static_cast<int>(chosen_budget(budgets, segments) - budgets.first);
      if (layout.copies <= 1) {
        int32_t* metadata = layout.copies == 1 ? schedule_copy(0) : tile_scheduler_metadata;
        int32_t* splits = layout.copies == 1 ? metadata + metadata_ints : num_splits;
        walk_tile_schedule(tiles_of, batch, num_sm_parts, budgets.first + chosen, true,
                           metadata, splits);
        chosen = 0;
      }
    }
    __syncthreads();
  };
  if (layout.copies == 0) {
    walk(TilesFromLengths{cache_seqlens});
    return;
  }
  for (int r = threadIdx.x; r < batch; r += blockDim.x)
    staged_ints[r] = static_cast<int32_t>(num_tiles_for_length(cache_seqlens[r]));
  __syncthreads();
  walk(TilesFromCounts{staged_ints});
  const int32_t* schedule = schedule_copy(chosen);
  copy_out(schedule, tile_scheduler_metadata, metadata_ints);
  copy_out(schedule + metadata_ints, num_splits, batch + 1);
}

}  // namespace

cudaError_t launch_tile_schedule(const int32_t* cache_seqlens, int batch, int num_sm_parts,
                                 int32_t* tile_scheduler_metadata, int32_t* num_splits,
                                 cudaStream_t stream) {
  if (batch < 0 || num_sm_parts <= 0) return cudaErrorInvalidValue;
  const StagedLayout layout(batch, num_sm_parts);
  const size_t smem_bytes = layout.total_ints(batch, layout.copies) * sizeof(int32_t);
  tile_schedule_kernel<<<1, kScheduleThreads, layout.copies > 0 ? smem_bytes : 0, stream>>>(
      cache_seqlens, batch, num_sm_parts, tile_scheduler_metadata, num_splits);
  return cudaGetLastError();
}

}  // namespace jax_flash_mla
