// The copies of a segment's query rows into the query buffer, by the producer warpgroup once
// every math warp is done with the previous segment's: by TMA from one thread where one box per
// 64 columns covers them (query_tensor_map.h), else by cp.async from every producer thread.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include <cstdint>

#include "../common/split_kv.h"
#include "kernel_trace.h"
#include "pipeline_sync.h"
#include "pipeline_traits.h"
#include "query_tensor_map.h"

namespace jax_flash_mla {
namespace sm90 {

// cp.async copy of a segment's query rows by every producer thread (thread 0..127), 16 bytes a
// copy; rows past rows_per_kv (tokens past seqlen_q) are zero-filled.
template <int kHeadDim, int kQueryRows, typename SmemTensor>
__device__ __forceinline__ void load_query_rows_cp_async(const DecodeParams& p, const Segment& seg,
                                                         int kv_head, int row_base,
                                                         SmemTensor& s_q, int thread) {
  const uint128_t* q = static_cast<const uint128_t*>(p.q);
  constexpr int chunks_per_row = kHeadDim / kChunkElems;
  CUTE_UNROLL
  for (int c = thread; c < kQueryRows * chunks_per_row; c += kProducerThreads) {
    const int r = c / chunks_per_row;
    const int chunk = c % chunks_per_row;
    const int row = row_base + r;
    const bool valid = row < p.rows_per_kv;
    const uint128_t* src =
        q + (valid ? q_offset(p, seg.batch_idx, kv_head, row) / kChunkElems + chunk : 0);
    SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>::copy(
        *src, *reinterpret_cast<uint128_t*>(&s_q(r, chunk * kChunkElems)), valid);
  }
}

// TMA copy of a segment's query rows by one thread: one box of kQueryRows rows per 64 columns,
// starting at row row_base of KV head kv_head (query_tensor_map.h: the same coordinates serve
// both box shapes), all completing on `full`. Rows past rows_per_kv are tokens past seqlen_q,
// out of range: TMA writes zeros, and still counts their bytes.
template <typename Element, int kHeadDim, int kQueryRows, typename SmemTensor>
__device__ __forceinline__ void load_query_rows_tma(const DecodeParams& p,
                                                    const CUtensorMap& q_map, const Segment& seg,
                                                    int kv_head, int row_base, uint64_t* full,
                                                    SmemTensor& s_q) {
  constexpr uint32_t kQueryBytes = kQueryRows * kHeadDim * sizeof(Element);
  cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(full, kQueryBytes);
  const int head = row_base % p.heads_per_kv;
  const int token = row_base / p.heads_per_kv;
  // Each 64-column block of the buffer holds its kQueryRows rows contiguously (a multiple of 8
  // rows: it starts on a 1024-byte swizzle period), as a box lands. Not unrolled: the lockstep
  // kernel's producer runs on 72 registers (setmaxnreg), and 9 unrolled copies (d = 576)
  // spilled there; a loop of 9 copies once a segment costs nothing measurable.
#pragma unroll 1
  for (int column = 0; column < kHeadDim; column += 64)
    SM90_TMA_LOAD_5D::copy(&q_map, full, static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_NORMAL),
                           &s_q(0, column), column, head, kv_head, token, seg.batch_idx);
}

// A segment's query rows, once every math warp is done with the previous ones: by TMA from
// producer thread 0 (query_tma), else by cp.async from every producer thread. `Storage` has
// q, q_full and q_empty as PipelineStorage does.
template <typename Element, int kHeadDim, int kQueryRows, typename Storage>
__device__ __forceinline__ void stage_query_rows(const DecodeParams& p, const CUtensorMap& q_map,
                                                 bool query_tma, const Segment& seg, int kv_head,
                                                 int row_base, Storage& smem, uint32_t q_phase,
                                                 WarpgroupTrace& trace) {
  using L = TileLayouts<Element, kHeadDim, kQueryRows>;
  Barrier::wait(&smem.q_empty, q_phase ^ 1);
  trace.mark(kTraceQueryFree, -1);
  Tensor s_q = make_tensor(make_smem_ptr(smem.q), typename L::Q{});
  if (query_tma) {
    load_query_rows_tma<Element, kHeadDim, kQueryRows>(p, q_map, seg, kv_head, row_base,
                                                       &smem.q_full, s_q);
  } else {
    load_query_rows_cp_async<kHeadDim, kQueryRows>(p, seg, kv_head, row_base, s_q, threadIdx.x);
    arrive_when_copies_land(&smem.q_full);
  }
  trace.mark(kTraceQueryIssued, -1);
}

}  // namespace sm90
}  // namespace jax_flash_mla
