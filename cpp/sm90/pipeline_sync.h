// How the sm90 kernels' roles wait for each other: the mbarriers of the ring of key tiles and
// of the query rows (set up at a CTA's start), named barriers, and the cluster barrier.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include <cstdint>

#include "../common/params.h"
#include "kernel_trace.h"
#include "pipeline_traits.h"

namespace jax_flash_mla {
namespace sm90 {

using Barrier = cutlass::arch::ClusterBarrier;
using cutlass::arch::ClusterBarrier;

// Stage index and mbarrier phase of the ring, advanced identically by producer and consumers.
struct RingPosition {
  int stage = 0;
  uint32_t phase = 0;
  __device__ void advance() {
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
  }
};

__device__ __forceinline__ void named_barrier_sync(NamedBarrier id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(static_cast<int>(id)), "r"(threads) : "memory");
}

// Counts the calling warp in at named barrier `id` without waiting for the others.
__device__ __forceinline__ void named_barrier_arrive(NamedBarrier id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(static_cast<int>(id)), "r"(threads) : "memory");
}

// Returns once every thread of every CTA of the cluster has arrived.
__device__ __forceinline__ void cluster_arrive_and_wait() {
  asm volatile("barrier.cluster.arrive;\n" ::: "memory");
  asm volatile("barrier.cluster.wait;\n" ::: "memory");
}

// The calling thread's earlier cp.async copies arrive on `barrier` when they land.
__device__ __forceinline__ void arrive_when_copies_land(uint64_t* barrier) {
  cutlass::arch::cpasync_barrier_arrive_noinc(barrier);
}

// Once per warp, after the warp's own wgmmas on the buffer have completed.
__device__ __forceinline__ void warp_release(uint64_t* barrier) {
  __syncwarp();
  if (threadIdx.x % 32 == 0) Barrier::arrive(barrier);
}

// The math side of the ring. A segment's query rows: waited for only when it has tiles (the
// producer stages none otherwise).
template <typename Storage>
__device__ __forceinline__ void wait_query_rows(Storage& smem, int num_tiles, uint32_t& q_phase,
                                                WarpgroupTrace& trace) {
  if (num_tiles > 0) {
    Barrier::wait(&smem.q_full, q_phase);
    q_phase ^= 1;
  }
  trace.mark(kTraceQueryLanded, -1);
}

// The keys of `tile`, in the ring's current stage. They were written by TMA or cp.async;
// wgmma reads through the async proxy.
template <typename Storage>
__device__ __forceinline__ void wait_tile_keys(Storage& smem, const RingPosition& ring, int tile,
                                               WarpgroupTrace& trace) {
  Barrier::wait(&smem.k_full[ring.stage], ring.phase);
  trace.mark(kTraceKeysLanded, tile);
  cutlass::arch::fence_view_async_shared();
}

// mbarrier arrivals of a stage's "full" barrier: with TMA, one arrival that also expects the
// tile's bytes; with cp.async, every producer thread's copies and a plain arrival from each
// thread that wrote key_valid (one a key row); with FP8 keys (key_tile_dequant.h), every
// producer thread's plain arrival after its stores, in each of fp8_producers warpgroups.
__device__ __forceinline__ uint32_t key_tile_arrivals(const DecodeParams& p, bool use_tma,
                                                      int fp8_producers) {
  if (use_tma) return 1;
  return p.key_format == KeyFormat::kFp8Packed
             ? kProducerThreads * fp8_producers
             : kProducerThreads + kProducerThreads / kCopyThreadsPerKey;
}

// The ring's barriers: "full" as key_tile_arrivals says. The query's "full" barrier: one
// arrival expecting the rows' bytes with TMA (query_tma), every producer thread's copies with
// cp.async. "Empty" barriers: one arrival per math warp. By thread 0, before the CTA's first
// __syncthreads.
template <typename Storage>
__device__ __forceinline__ void init_pipeline_barriers(Storage& smem, uint32_t key_arrivals,
                                                       bool query_tma, uint32_t math_warps) {
  for (int s = 0; s < kStages; ++s) {
    ClusterBarrier::init(&smem.k_full[s], key_arrivals);
    ClusterBarrier::init(&smem.k_empty[s], math_warps);
  }
  ClusterBarrier::init(&smem.q_full, query_tma ? 1 : kProducerThreads);
  ClusterBarrier::init(&smem.q_empty, math_warps);
  cutlass::arch::fence_barrier_init();
}

// The tensor maps live in kernel parameter space; a TMA copy's first use of one fetches its
// 128 bytes first. Fetched at the CTA's start instead, by the thread that sets up the barriers,
// so that the first segment's key and query copies do not wait for it.
__device__ __forceinline__ void prefetch_tensor_maps(const CUtensorMap& k_map, bool use_tma,
                                                     const CUtensorMap& q_map, bool query_tma) {
  if (use_tma) cute::prefetch_tma_descriptor(&k_map);
  if (query_tma) cute::prefetch_tma_descriptor(&q_map);
}

// A CTA's start, called by every thread of the sm90 kernels: thread 0 fetches the tensor maps
// and initializes the barriers (`init_barriers()`), and no thread goes on before they are
// initialized.
template <typename InitBarriers>
__device__ __forceinline__ void start_pipeline(const CUtensorMap& k_map, bool use_tma,
                                               const CUtensorMap& q_map, bool query_tma,
                                               InitBarriers&& init_barriers) {
  if (threadIdx.x == 0) {
    prefetch_tensor_maps(k_map, use_tma, q_map, query_tma);
    init_barriers();
  }
  __syncthreads();
}

// The same with PipelineStorage's barriers.
template <typename Storage>
__device__ __forceinline__ void start_pipeline(const DecodeParams& p, Storage& smem,
                                               const CUtensorMap& k_map, bool use_tma,
                                               const CUtensorMap& q_map, bool query_tma,
                                               uint32_t math_warps, int fp8_producers = 1) {
  start_pipeline(k_map, use_tma, q_map, query_tma, [&] {
    init_pipeline_barriers(smem, key_tile_arrivals(p, use_tma, fp8_producers), query_tma,
                           math_warps);
  });
}

}  // namespace sm90
}  // namespace jax_flash_mla
