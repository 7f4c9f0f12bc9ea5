// Host entry points of the sm90 kernels, called by the CUDA FFI handlers. Each one only
// enqueues work on `stream` (no allocation, no host synchronization, so it can be captured in
// a CUDA graph) and returns the launch status (cudaGetLastError after the launch).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/params.h"

namespace jax_flash_mla {

// Fills tile_scheduler_metadata [num_sm_parts, kMetadataInts] and num_splits [batch + 1] on
// the device from cache_seqlens [batch] (see common/tile_scheduler.h).
cudaError_t launch_tile_schedule(const int32_t* cache_seqlens, int batch, int num_sm_parts,
                                 int32_t* tile_scheduler_metadata, int32_t* num_splits,
                                 cudaStream_t stream);

// Attention of every piece of the schedule: final (out, lse) for requests with one split,
// float32 partials in (o_accum, lse_accum) for the others.
// Two implementations: CUDA cores (decode_kernel.cu, the first version) and Hopper tensor
// cores (decode_wgmma_kernel.cu), which gathers keys with TMA where the page size allows and
// stages query rows with TMA where the head count allows (both only with `allow_tma`), else
// with cp.async.
cudaError_t launch_split_kv_decode(const DecodeParams& params, cudaStream_t stream);
// Where d = 576 with TMA key tiles and query rows, the seesaw schedule
// (decode_seesaw_kernel.cu) can take the 64-row kernel's place: kNever, kWhereFaster (the
// default: where its CTAs run in pairs that share the keys, or alone with long shares of keys
// a CTA; decode_wgmma_kernel.cu), kAlways (in pairs where seesaw_pairs_fit), kAlwaysUnpaired
// (never in pairs: each CTA copies its own keys, the second read of a tile an L2 hit, as
// FlashMLA does; for comparisons).
enum class SeesawUse { kNever, kWhereFaster, kAlways, kAlwaysUnpaired };
cudaError_t launch_split_kv_decode_wgmma(const DecodeParams& params, bool allow_tma,
                                         SeesawUse seesaw, cudaStream_t stream);
// Whether the seesaw kernel runs `grid` (the 64-row kernel's) in pairs of CTAs, one cluster
// each, that share the key tiles: row blocks come in pairs, and the pairs fit the current
// device in as few waves as single CTAs would.
bool seesaw_pairs_fit(dim3 grid);
// The seesaw kernel, on the tensor maps the caller built (keys: paged_kv_tensor_map.h; query
// rows: query_tensor_map.h, both required) and the 64-row kernel's grid; `paired` (only where
// seesaw_pairs_fit): in pairs of CTAs.
cudaError_t launch_split_kv_decode_seesaw(const DecodeParams& params, const CUtensorMap& k_map,
                                          const CUtensorMap& q_map, dim3 grid, bool paired,
                                          cudaStream_t stream);
// The same for at most kNarrowMaxRows query rows per KV head (decode_narrow_kernel.cu): the
// products transposed so that keys and value columns fill wgmma's M of 64, not padded rows.
constexpr int kNarrowMaxRows = 32;
cudaError_t launch_split_kv_decode_narrow(const DecodeParams& params, bool allow_tma,
                                          cudaStream_t stream);
// Whether the narrow kernel, rather than the 64-row one, should run a grid of at most
// kNarrowMaxRows rows a KV head: always at 16 rows or fewer; at 17-32 only where the block table
// holds more than a few key tiles a CTA (decode_narrow_kernel.cu says why).
bool narrow_kernel_pays(const DecodeParams& params);

// Merges the partials of split requests into (out, lse) and writes the empty output of
// requests with no keys. Must run after launch_split_kv_decode on the same stream.
cudaError_t launch_combine(const DecodeParams& params, cudaStream_t stream);

}  // namespace jax_flash_mla
