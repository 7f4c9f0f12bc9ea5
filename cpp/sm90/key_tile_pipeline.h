// The load side of the sm90 decode kernels, shared by the 64-row kernel
// (decode_wgmma_kernel.cu) and the narrow one (decode_narrow_kernel.cu): a producer warpgroup
// stages a segment's query rows and gathers its 64-key tiles into a 2-stage shared-memory ring
// (72 KiB a stage at d = 576), with TMA boxes through the block table (its first warp; see
// paged_kv_tensor_map.h) or, for page sizes TMA cannot box, with cp.async one token row at a
// time. The query rows go by TMA too (one thread, query_tensor_map.h) where one box per 64
// columns covers them, else by cp.async from every producer thread. A stage's "full" mbarrier
// completes when its bytes have landed; the stage is refilled as soon as every math warp has
// arrived on its "empty" mbarrier.
//
// Masking contract with the math warpgroups: key_valid[stage][key] says whether a key exists
// (in the segment, on a valid page). TMA boxes of invalid pages are fetched out of range (TMA
// writes zeros); keys past the segment inside a valid box are read and must be zeroed by the
// math side before P V; the cp.async gather zero-fills every missing key.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include <cstdint>
#include <type_traits>

#include "../common/split_kv.h"
#include "kernel_trace.h"
#include "paged_kv_tensor_map.h"
#include "query_tensor_map.h"

namespace jax_flash_mla {
namespace sm90 {

using namespace cute;

constexpr int kBlockN = 64;  // keys per tile
constexpr int kHeadDimV = 512;  // value columns: the first 512 of a key row
constexpr int kStages = 2;
constexpr int kChunkElems = 8;  // 16-byte cp.async chunks
constexpr int kProducerThreads = 128;
// Named barrier among the producer's threads (0 is __syncthreads; kernels number theirs after).
constexpr int kProducerBarrier = 1;
static_assert(kBlockN == kTokensPerTile, "a tile is one unit of the schedule");

// How a key tile's 1 KiB swizzle atoms (8 keys x 64 columns) follow each other in shared
// memory, and so which TMA boxes fill it:
//   kColumnBlocks  a 64-column block of all 64 keys after another (8 KiB each): a box is one
//                  column block of a run of keys inside one page, so a tile takes
//                  (64 / tokens a box) x (head_dim / 64) boxes: 9 at page 64, 36 at page 16.
//   kKeyGroups     a group of 8 keys with all their columns after another (9 KiB at d = 576):
//                  a box is one group (paged_kv_tensor_map.h's key-group map), 8 a tile at
//                  every page size that is a multiple of 8. wgmma reads either: only the
//                  stride between 8-key groups and between column blocks differ.
// Boxes are issued one at a time by the loading warp (~120 cycles each, NOTES v19), so the
// box count, not the bytes, is what grows as pages shrink: with column blocks page 16 was
// 14-18% slower than page 64, with key groups it is as fast (NOTES v22).
// (kKeyGroup, the keys of a key-group box, is paged_kv_tensor_map.h's: the map's box and the
// tile's layout must agree.)
enum class KeyTileOrder { kColumnBlocks, kKeyGroups };

// 128-byte swizzled, K-major: the layout wgmma reads without bank conflicts, and the layout a
// TMA box of 64 columns lands in.
template <typename Element, int kHeadDim, int kQueryRows,
          KeyTileOrder kOrder = KeyTileOrder::kColumnBlocks>
struct TileLayouts {
  using Atom = GMMA::Layout_K_SW128_Atom<Element>;
  using Q = decltype(tile_to_shape(Atom{}, Shape<Int<kQueryRows>, Int<kHeadDim>>{}));
  // Atoms down the keys first (column blocks), or along the columns first (key groups).
  using AtomOrder =
      std::conditional_t<kOrder == KeyTileOrder::kKeyGroups, Step<_2, _1>, Step<_1, _2>>;
  using K = decltype(tile_to_shape(Atom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}, AtomOrder{}));
  // V^T (value columns x keys) over the very bytes of a K tile: MN-major.
  using Vt = decltype(composition(
      K{}, make_ordered_layout(Shape<Int<kHeadDimV>, Int<kBlockN>>{}, Step<_2, _1>{})));
};

// What the two kernels of 64 query rows a CTA (decode_wgmma_kernel.cu, decode_seesaw_kernel.cu)
// add to those: P (query rows x the tile's keys) in shared memory, K-major like Q, and
// S = Q K^T with both operands there (m64n64, K the head dimension).
constexpr int kRowBlock = 64;  // one wgmma M
template <typename Element, int kHeadDim, KeyTileOrder kOrder = KeyTileOrder::kColumnBlocks>
struct RowBlockLayouts : TileLayouts<Element, kHeadDim, kRowBlock, kOrder> {
  using P = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                   Shape<Int<kRowBlock>, Int<kBlockN>>{}));
  using MmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float,
                           Shape<Int<kRowBlock>, Int<kBlockN>, Int<kHeadDim>>>()));
};

// The shared memory the producer fills; a kernel's own storage derives from it.
template <typename Element, int kHeadDim, int kQueryRows>
struct PipelineStorage {
  using L = TileLayouts<Element, kHeadDim, kQueryRows>;
  // Swizzled buffers must start on 1024-byte boundaries (the swizzle pattern's period).
  alignas(1024) Element q[cosize_v<typename L::Q>];
  alignas(1024) Element k[kStages][cosize_v<typename L::K>];
  int64_t token_offset[kStages][kBlockN];  // cp.async gather: k_cache offset of each key, -1: none
  uint8_t key_valid[kStages][kBlockN];     // the key exists (in the segment, on a valid page)
  uint64_t k_full[kStages];   // a stage's keys (and their offsets) have landed
  uint64_t k_empty[kStages];  // every math warp is done with a stage
  uint64_t q_full;            // the segment's query rows have landed
  uint64_t q_empty;           // every math warp is done with the query rows
};

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

__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Counts the calling warp in at named barrier `id` without waiting for the others.
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
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

// Keys [0, limit) of the segment that query row `row` (of this CTA's KV head) may see; 0 for
// the padding rows past rows_per_kv.
__device__ __forceinline__ int segment_key_limit(const DecodeParams& p, const Segment& seg,
                                                 int seqlen, int row) {
  return row < p.rows_per_kv ? min(key_limit_for_row(p, seqlen, row), seg.token_end) : 0;
}


// mbarrier arrivals of a stage's "full" barrier: with TMA, one arrival that also expects the
// tile's bytes; with cp.async, every producer thread's copies plus one plain arrival that
// publishes the key offsets. The query's "full" barrier: one arrival expecting the rows' bytes
// with TMA (query_tma), every producer thread's copies with cp.async. "Empty" barriers: one
// arrival per math warp. By thread 0, before the CTA's first __syncthreads.
template <typename Storage>
__device__ __forceinline__ void init_pipeline_barriers(Storage& smem, bool use_tma,
                                                       bool query_tma, uint32_t math_warps) {
  for (int s = 0; s < kStages; ++s) {
    ClusterBarrier::init(&smem.k_full[s], use_tma ? 1 : kProducerThreads + 1);
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
__device__ __forceinline__ void start_pipeline(Storage& smem, const CUtensorMap& k_map,
                                               bool use_tma, const CUtensorMap& q_map,
                                               bool query_tma, uint32_t math_warps) {
  start_pipeline(k_map, use_tma, q_map, query_tma,
                 [&] { init_pipeline_barriers(smem, use_tma, query_tma, math_warps); });
}

// C (+)= A B, issued by one warpgroup, waited for.
template <bool kZeroInit, typename TiledMma, typename FragA, typename FragB, typename FragC>
__device__ __forceinline__ void warpgroup_gemm(TiledMma& mma, const FragA& a, const FragB& b,
                                               FragC& c) {
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  warpgroup_fence_operand(c);
}

// C = A B over k-steps [kFirst, kEnd) of the operands only (a part of the reduction
// dimension), issued by one warpgroup, waited for. The bounds are compile-time so that the
// chain unrolls (a run-time trip count made ptxas serialize it, warning C7515).
template <int kFirst, int kEnd, typename TiledMma, typename FragA, typename FragB, typename FragC>
__device__ __forceinline__ void warpgroup_gemm_steps(TiledMma& mma, const FragA& a,
                                                     const FragB& b, FragC& c) {
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int k = kFirst; k < kEnd; ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  warpgroup_fence_operand(c);
}

__device__ __forceinline__ int num_tiles_of(const Segment& seg) {
  return (seg.token_end - seg.token_begin + kBlockN - 1) / kBlockN;
}

// The first token of tile `tile` of a segment.
__device__ __forceinline__ int tile_begin_of(const Segment& seg, int tile) {
  return seg.token_begin + tile * kBlockN;
}


// Producer threads 0..63 look up where each key of a tile lives; -1 for keys that must not
// be read.
__device__ __forceinline__ void plan_tile(const DecodeParams& p, const Segment& seg, int kv_head,
                                          int tile_begin, int64_t* token_offset,
                                          uint8_t* key_valid, int thread) {
  if (thread < kBlockN) {
    const int token = tile_begin + thread;
    int64_t offset = -1;
    if (token < seg.token_end) {
      const int page = page_of_token(p, seg.batch_idx, token);
      if (page >= 0) offset = k_offset(p, page, token, kv_head);
    }
    token_offset[thread] = offset;
    key_valid[thread] = offset >= 0;
  }
}

// TMA gather of one tile by one producer warp: which keys exist (for the math warpgroups'
// masks), then one box of tokens_per_box token slots per (page run, 64 columns). A box whose
// tokens are past the segment or on an invalid page is sent past the tensor's last token slot:
// TMA fills it with zeros and never reads memory for it. Keys past the segment inside a valid
// box are read (they exist in memory) and zeroed by the math warpgroups (zero_value_rows).
struct TmaTileLookup {
  bool key_valid[kBlockN / 32];  // keys lane and lane + 32
  int32_t slot;                  // the box starting at key lane * tokens_per_box, if there is one
};

// A lane's block-table entries for a tile: those of keys lane and lane + 32 (-1 past the
// segment), as loaded. Fetching is separate from resolving (resolve_tile_lookup) so that a
// kernel can issue the loads long before it needs them: an entry can take an HBM round trip.
struct TilePages {
  int32_t entry[kBlockN / 32];
};

__device__ __forceinline__ TilePages fetch_tile_pages(const DecodeParams& p, const Segment& seg,
                                                      int tile_begin) {
  const int lane = threadIdx.x % 32;
  TilePages pages;
  CUTE_UNROLL
  for (int i = 0; i < kBlockN / 32; ++i) {
    const int token = tile_begin + lane + 32 * i;
    pages.entry[i] = token < seg.token_end ? block_table_entry(p, seg.batch_idx, token) : -1;
  }
  return pages;
}

// The lookup from the entries, for boxes of `tokens_per_box` consecutive keys inside a page
// (every lane of the warp at once: the box lanes read the entry of their box's first key from
// the lane holding it).
__device__ __forceinline__ TmaTileLookup resolve_tile_lookup(const DecodeParams& p,
                                                             const Segment& seg, int tile_begin,
                                                             const TilePages& pages,
                                                             int tokens_per_box) {
  const int lane = threadIdx.x % 32;
  TmaTileLookup lookup;
  CUTE_UNROLL
  for (int i = 0; i < kBlockN / 32; ++i) lookup.key_valid[i] = is_valid_page(p, pages.entry[i]);
  const int first_key = min(lane * tokens_per_box, kBlockN - 1);
  const int32_t low = __shfl_sync(0xffffffffu, pages.entry[0], first_key % 32);
  const int32_t high = __shfl_sync(0xffffffffu, pages.entry[1], first_key % 32);
  const int32_t page = first_key < 32 ? low : high;
  const int token = tile_begin + first_key;
  lookup.slot = p.num_blocks * p.page_block_size;  // past the end: TMA writes zeros
  if (lane * tokens_per_box < kBlockN && token < seg.token_end && is_valid_page(p, page))
    lookup.slot = page * p.page_block_size + token % p.page_block_size;
  return lookup;
}

// Keys a TMA box holds in a tile of that order (a divisor of the page: the map's precondition).
template <KeyTileOrder kOrder>
__device__ __forceinline__ int tokens_per_key_box(const DecodeParams& p) {
  return kOrder == KeyTileOrder::kKeyGroups ? kKeyGroup : tma_tokens_per_box(p.page_block_size);
}

// One warp's lookups of a tile, done before the stage frees: the block-table reads (an L2
// round trip) overlap the wait instead of delaying the copy.
template <KeyTileOrder kOrder>
__device__ __forceinline__ TmaTileLookup lookup_tile_tma(const DecodeParams& p, const Segment& seg,
                                                         int tile_begin) {
  return resolve_tile_lookup(p, seg, tile_begin, fetch_tile_pages(p, seg, tile_begin),
                             tokens_per_key_box<kOrder>(p));
}

// Which keys of a tile exist, for the math warpgroups' masks: written by the loading warp,
// published by its lane 0's next (release) arrival on the stage's "full" barrier.
__device__ __forceinline__ void publish_key_valid(const TmaTileLookup& lookup, uint8_t* key_valid) {
  const int lane = threadIdx.x % 32;
  CUTE_UNROLL
  for (int i = 0; i < kBlockN / 32; ++i) key_valid[lane + 32 * i] = lookup.key_valid[i];
  __syncwarp();
}

// The L2 policy of key boxes. Where one copy of the keys serves every row block of a KV head
// (a single row block, or one pair sharing them by multicast), a key is read from L2 once:
// first to be evicted, so that the key stream (~300 MB a call at b=64 h_q=64) displaces less
// of what is read again. Where several row blocks (or pairs) each copy the same keys, the
// later copies are L2 hits: left at the normal policy. Measured (NOTES v21): the split kernel
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

// The math side's half of the masking contract: zeroes the value columns of keys
// [first_key, end_key) of a landed tile, spread over the 128 threads of one warpgroup (thread
// 0..127). Keys past the segment inside a valid TMA box hold whatever the cache holds, NaN
// included, and P = 0 times NaN is NaN.
template <typename SmemTensor>
__device__ __forceinline__ void zero_value_rows(SmemTensor& s_k, int first_key, int end_key,
                                                int thread) {
  constexpr int chunks_per_row = kHeadDimV / kChunkElems;
  for (int c = first_key * chunks_per_row + thread; c < end_key * chunks_per_row; c += 128) {
    *reinterpret_cast<uint4*>(&s_k(c / chunks_per_row, c % chunks_per_row * kChunkElems)) =
        make_uint4(0, 0, 0, 0);
  }
}

template <int kHeadDim, typename SmemTensor>
__device__ __forceinline__ void load_tile(const DecodeParams& p, const int64_t* token_offset,
                                          SmemTensor& s_k, int thread) {
  const uint128_t* k_cache = static_cast<const uint128_t*>(p.k_cache);
  constexpr int chunks_per_row = kHeadDim / kChunkElems;
  CUTE_UNROLL
  for (int c = thread; c < kBlockN * chunks_per_row; c += kProducerThreads) {
    const int token = c / chunks_per_row;
    const int chunk = c % chunks_per_row;
    const int64_t offset = token_offset[token];
    const bool valid = offset >= 0;
    const uint128_t* src = k_cache + (valid ? offset / kChunkElems + chunk : 0);
    SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>::copy(
        *src, *reinterpret_cast<uint128_t*>(&s_k(token, chunk * kChunkElems)), valid);
  }
}

template <int kHeadDim, int kQueryRows, typename SmemTensor>
__device__ __forceinline__ void load_query_rows(const DecodeParams& p, const Segment& seg,
                                                int kv_head, int row_base, SmemTensor& s_q,
                                                int thread) {
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
  // rows: it starts on a 1024-byte swizzle period), as a box lands. Not unrolled: the 64-row
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
    load_query_rows<kHeadDim, kQueryRows>(p, seg, kv_head, row_base, s_q, threadIdx.x);
    arrive_when_copies_land(&smem.q_full);
  }
  trace.mark(kTraceQueryIssued, -1);
}

// The producer warpgroup: for each segment, its query rows (once the math warpgroups are done
// with the previous ones), then its key tiles, each as soon as a stage frees, in kOrder (with
// TMA, k_map is the map that order's boxes need).
template <typename Element, int kHeadDim, int kQueryRows,
          KeyTileOrder kOrder = KeyTileOrder::kColumnBlocks>
__device__ void produce_segment(const DecodeParams& p, const CUtensorMap& k_map, bool use_tma,
                                const CUtensorMap& q_map, bool query_tma,
                                const Segment& seg, int kv_head, int row_base,
                                PipelineStorage<Element, kHeadDim, kQueryRows>& smem,
                                RingPosition& ring, uint32_t& q_phase, WarpgroupTrace& trace) {
  using L = TileLayouts<Element, kHeadDim, kQueryRows, kOrder>;
  const int thread = threadIdx.x;  // 0..127
  const int num_tiles = num_tiles_of(seg);
  if (num_tiles == 0) return;
  // With TMA one warp drives the copy engine for the keys; with cp.async all producer threads
  // gather them. The query rows: thread 0 (in the TMA warp) alone with TMA, every producer
  // thread with cp.async.
  const bool loads_keys = !use_tma || thread < 32;
  const bool loads_query = !query_tma || thread == 0;
  const auto load_keys = [&](int tile) {
    const int tile_begin = tile_begin_of(seg, tile);
    TmaTileLookup lookup{};
    if (use_tma) lookup = lookup_tile_tma<kOrder>(p, seg, tile_begin);
    Barrier::wait(&smem.k_empty[ring.stage], ring.phase ^ 1);
    trace.mark(kTraceStageFree, tile);
    Tensor s_k = make_tensor(make_smem_ptr(smem.k[ring.stage]), typename L::K{});
    if (use_tma) {
      load_tile_tma<Element, kHeadDim, kOrder>(p, k_map, lookup, kv_head,
                                               smem.key_valid[ring.stage],
                                               &smem.k_full[ring.stage], s_k);
    } else {
      int64_t* offsets = smem.token_offset[ring.stage];
      plan_tile(p, seg, kv_head, tile_begin, offsets, smem.key_valid[ring.stage], thread);
      named_barrier_sync(kProducerBarrier, kProducerThreads);
      load_tile<kHeadDim>(p, offsets, s_k, thread);
      arrive_when_copies_land(&smem.k_full[ring.stage]);
      // The offsets were written with plain stores: one plain (release) arrival publishes
      // them to the math warpgroups, after the barrier above ordered every writer before it.
      if (thread == 0) Barrier::arrive(&smem.k_full[ring.stage]);
    }
    trace.mark(kTraceKeysIssued, tile);
    ring.advance();
  };
  // The first tile's keys go before the query rows: their stage frees once the previous
  // segment's next-to-last tile is done, the query buffer only after its last tile's scores,
  // so the new segment's first keys are in flight while the previous one finishes.
  if (loads_keys) load_keys(0);
  if (loads_query)
    stage_query_rows<Element, kHeadDim, kQueryRows>(p, q_map, query_tma, seg, kv_head, row_base,
                                                    smem, q_phase, trace);
  q_phase ^= 1;  // by every producer thread, so that the phases agree whichever path stages
  if (!loads_keys) return;
  for (int tile = 1; tile < num_tiles; ++tile) load_keys(tile);
}

}  // namespace sm90
}  // namespace jax_flash_mla
