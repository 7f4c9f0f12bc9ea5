// The copies that fill a stage of the ring with a key tile, from the producer's lookups
// (key_tile_lookup.h): by TMA, whole 64-column blocks of runs of keys inside a page (column
// blocks, by one warp, optionally in pieces with a barrier each and multicast to a cluster) or
// one box per 8-key group (key groups); by cp.async, one 16-byte chunk of a key row at a time,
// zero-filled where a key must not be read.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include <cstdint>

#include "../common/split_kv.h"
#include "key_tile_lookup.h"
#include "paged_kv_tensor_map.h"
#include "pipeline_traits.h"

namespace jax_flash_mla {
namespace sm90 {

// The L2 policy of key boxes. Where one copy of the keys serves every row block of a KV head
// (a single row block, or one pair sharing them by multicast), a key is read from L2 once:
// first to be evicted, so that the key stream (~300 MB a call at b=64 h_q=64) displaces less
// of what is read again. Where several row blocks (or pairs) each copy the same keys, the
// later copies are L2 hits: left at the normal policy. Measured on an H200: the split kernel
// ~3% faster at b=64 h_q=64 and b=32 h_q=128. The prediction was the combine reading the
// float32 partials from L2 instead; its time did not move, so the gain is in the split
// kernel's own traffic.
__device__ __forceinline__ uint64_t key_cache_hint(uint16_t multicast_mask) {
  const unsigned sharing_ctas = multicast_mask == 0 ? 1u : 2u;
  return static_cast<uint64_t>(gridDim.z <= sharing_ctas ? TMA::CacheHintSm90::EVICT_FIRST
                                                         : TMA::CacheHintSm90::EVICT_NORMAL);
}

// This lane's TMA box of a tile's columns [column, column + 64), if it has one (tokens_per_box
// >= 8, so a lane has at most one box row: 64 / tokens_per_box lanes do), completing on `full`.
// With a `multicast_mask`, the box lands at the same offset in each CTA of the cluster the
// mask names and completes on each one's barrier at `full`'s offset.
template <typename SmemTensor>
__device__ __forceinline__ void copy_key_box(const DecodeParams& p, const CUtensorMap& k_map,
                                             const TmaTileLookup& lookup, int kv_head,
                                             int column, uint64_t* full, SmemTensor& s_k,
                                             uint16_t multicast_mask = 0) {
  const int first = threadIdx.x % 32 * tma_tokens_per_box(p.page_block_size);
  if (first >= kBlockN) return;
  const uint64_t hint = key_cache_hint(multicast_mask);
  if (multicast_mask == 0)
    SM90_TMA_LOAD_3D::copy(&k_map, full, hint, &s_k(first, column), column, kv_head,
                           lookup.slot);
  else
    SM90_TMA_LOAD_MULTICAST_3D::copy(&k_map, full, multicast_mask, hint, &s_k(first, column),
                                     column, kv_head, lookup.slot);
}

// Columns [kBegin, kEnd) of a tile's keys (multiples of 64), by one warp: one box per
// (page run, 64 columns), all completing on `full`, which expects their bytes.
template <typename Element, int kBegin, int kEnd, typename SmemTensor>
__device__ __forceinline__ void load_columns_tma(const DecodeParams& p, const CUtensorMap& k_map,
                                                 const TmaTileLookup& lookup, int kv_head,
                                                 uint64_t* full, SmemTensor& s_k) {
  static_assert(kBegin % 64 == 0 && kEnd % 64 == 0 && kBegin < kEnd, "64-column boxes");
  constexpr uint32_t kBytes = kBlockN * (kEnd - kBegin) * sizeof(Element);
  if (threadIdx.x % 32 == 0)
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(full, kBytes);
  __syncwarp();
  // Not unrolled: the producer runs on few registers (setmaxnreg), and one copy per 64
  // columns keeps a loop's overhead negligible.
#pragma unroll 1
  for (int column = kBegin; column < kEnd; column += 64)
    copy_key_box(p, k_map, lookup, kv_head, column, full, s_k);
}

// Columns [column, column + 64) of a tile's keys, by one warp, completing on their own `full`
// barrier (which expects their bytes), so that a reader can start on them alone. In a cluster
// whose CTAs share the keys, every CTA's loading warp expects the piece's bytes on its own
// barrier, and one of them (`issues_box`) copies it to all (`multicast_mask`).
template <typename Element, typename SmemTensor>
__device__ __forceinline__ void load_piece_tma(const DecodeParams& p, const CUtensorMap& k_map,
                                               const TmaTileLookup& lookup, int kv_head,
                                               int column, uint64_t* full, SmemTensor& s_k,
                                               bool issues_box = true,
                                               uint16_t multicast_mask = 0) {
  constexpr uint32_t kBytes = kBlockN * 64 * sizeof(Element);
  if (threadIdx.x % 32 == 0)
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(full, kBytes);
  __syncwarp();
  if (issues_box) copy_key_box(p, k_map, lookup, kv_head, column, full, s_k, multicast_mask);
}

// A key-group tile by one warp: lane g copies keys [8 g, 8 g + 8) with all their columns, one
// box through the key-group map (make_paged_kv_key_group_tensor_map), completing on `full`,
// which expects the whole tile's bytes (a box out of range counts its zeros too).
template <typename Element, int kHeadDim, typename SmemTensor>
__device__ __forceinline__ void load_key_groups_tma(const CUtensorMap& k_map,
                                                    const TmaTileLookup& lookup, int kv_head,
                                                    uint64_t* full, SmemTensor& s_k) {
  constexpr uint32_t kBytes = kBlockN * kHeadDim * sizeof(Element);
  const int lane = threadIdx.x % 32;
  if (lane == 0) cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(full, kBytes);
  __syncwarp();
  if (lane < kBlockN / kKeyGroup)
    SM90_TMA_LOAD_4D::copy(&k_map, full, key_cache_hint(0), &s_k(lane * kKeyGroup, 0), 0,
                           lookup.slot, 0, kv_head);
}

// A whole tile by one warp, in kOrder (k_map is the map that order's boxes need), after
// publishing which of its keys exist.
template <typename Element, int kHeadDim, KeyTileOrder kOrder, typename SmemTensor>
__device__ __forceinline__ void load_tile_tma(const DecodeParams& p, const CUtensorMap& k_map,
                                              const TmaTileLookup& lookup, int kv_head,
                                              uint8_t* key_valid, uint64_t* full,
                                              SmemTensor& s_k) {
  publish_key_valid(lookup, key_valid);
  if constexpr (kOrder == KeyTileOrder::kKeyGroups)
    load_key_groups_tma<Element, kHeadDim>(k_map, lookup, kv_head, full, s_k);
  else
    load_columns_tma<Element, 0, kHeadDim>(p, k_map, lookup, kv_head, full, s_k);
}

// A whole tile by every producer thread, each copying its keys' chunks (key_tile_lookup.h's
// division) from its own table entries, and writing which of its keys exist; a key that must
// not be read (past the segment, on an invalid page) is zero-filled (a zero source size: its
// memory is never touched).
template <int kHeadDim, typename SmemTensor>
__device__ __forceinline__ void load_key_rows_cp_async(const DecodeParams& p, int kv_head,
                                                       int tile_begin,
                                                       const KeyRowEntries& rows,
                                                       SmemTensor& s_k, uint8_t* key_valid,
                                                       int thread) {
  const uint128_t* k_cache = static_cast<const uint128_t*>(p.k_cache);
  const int chunk = thread % kCopyThreadsPerKey;
  CUTE_UNROLL
  for (int j = 0; j < kCopyKeysPerThread; ++j) {
    const int key = copy_key_of(thread, j);
    const bool valid = is_valid_page(p, rows.entry[j]);
    const int64_t offset =
        valid ? k_offset(p, rows.entry[j], tile_begin + key, kv_head) / kChunkElems + chunk : 0;
    if (chunk == 0) key_valid[key] = valid;
    CUTE_UNROLL
    for (int block = 0; block < kHeadDim / 64; ++block) {
      const int column = 64 * block + kChunkElems * chunk;
      SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>::copy(
          k_cache[offset + block * (64 / kChunkElems)],
          *reinterpret_cast<uint128_t*>(&s_k(key, column)), valid);
    }
  }
}

}  // namespace sm90
}  // namespace jax_flash_mla
