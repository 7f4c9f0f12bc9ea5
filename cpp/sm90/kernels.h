// Host entry points of the sm90 kernels. Each one only enqueues work on `stream` (no
// allocation, no host synchronization, so it can be captured in a CUDA graph) and returns the
// launch status (cudaGetLastError after the launch).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/params.h"
#include "heuristics.h"

namespace jax_flash_mla {

// Fills tile_scheduler_metadata [num_sm_parts, kMetadataInts] and num_splits [batch + 1] on
// the device from cache_seqlens [batch] (see common/tile_scheduler.h).
cudaError_t launch_tile_schedule(const int32_t* cache_seqlens, int batch, int num_sm_parts,
                                 int32_t* tile_scheduler_metadata, int32_t* num_splits,
                                 cudaStream_t stream);

// The split-KV step of one call (dispatch.cu): attention of every piece of the schedule, final
// (out, lse) for requests with one split, float32 partials in (o_accum, lse_accum) for the
// others. kDispatch runs the kernel choose_split_kv_kernel picks; another value forces that
// kernel, and where it cannot run this call (split_kv_kernel_can_run, or the driver refuses a
// tensor map it needs) nothing is launched and cudaErrorNotSupported comes back.
cudaError_t launch_split_kv(const DecodeParams& params, SplitKvKernel kernel, cudaStream_t stream);

// The tensor maps the dispatch built for one call. A kernel gathers by cp.async what has no map
// (page sizes and head counts TMA cannot box); the seesaw kernel needs both.
struct SplitKvMaps {
  CUtensorMap keys = {};  // the kernel's own view of the cache (paged_kv_tensor_map.h)
  bool keys_by_tma = false;
  CUtensorMap query = {};  // the CTA's query rows (query_tensor_map.h)
  bool query_by_tma = false;
};

// One launcher a kernel, each for a call the dispatch has checked (head dims, grid limits).
// Grids: (num_sm_parts, num_heads_k, row blocks of kRowsPerCta; 1 for the transposed kernel).
cudaError_t launch_split_kv_transposed(const DecodeParams& params, const SplitKvMaps& maps,
                                       cudaStream_t stream);
cudaError_t launch_split_kv_lockstep(const DecodeParams& params, const SplitKvMaps& maps,
                                     cudaStream_t stream);
// paired: the row blocks in CTA pairs, one cluster each, that share the key tiles.
cudaError_t launch_split_kv_seesaw(const DecodeParams& params, const SplitKvMaps& maps,
                                   bool paired, cudaStream_t stream);
// Seesaw CTA pairs (clusters of two) the current device holds at once; 0 if it cannot say.
int seesaw_resident_pairs();

// Merges the partials of split requests into (out, lse) and writes the empty output of
// requests with no keys. Must run after launch_split_kv on the same stream.
cudaError_t launch_combine(const DecodeParams& params, cudaStream_t stream);

}  // namespace jax_flash_mla
