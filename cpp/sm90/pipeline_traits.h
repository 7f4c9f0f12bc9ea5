// What the sm90 split-KV kernels agree on: the 64-key tile and its layouts in shared memory,
// the 2-stage ring of key tiles the producer warpgroup fills and the storage it fills, and the
// ids of every named barrier.
#pragma once

#include <cute/tensor.hpp>

#include <cstdint>
#include <type_traits>

#include "../common/split_kv.h"

namespace jax_flash_mla {
namespace sm90 {

using namespace cute;

constexpr int kBlockN = 64;  // keys per tile
constexpr int kHeadDimV = 512;  // value columns: the first 512 of a key row
constexpr int kStages = 2;
constexpr int kChunkElems = 8;  // 16-byte cp.async chunks
constexpr int kProducerThreads = 128;
static_assert(kBlockN == kTokensPerTile, "a tile is one unit of the schedule");
// The cp.async key gather's division of a tile (key_tile_lookup.h): eight producer threads a
// key row, four keys a thread.
constexpr int kCopyThreadsPerKey = 8;
constexpr int kCopyKeyStride = kProducerThreads / kCopyThreadsPerKey;  // 16
constexpr int kCopyKeysPerThread = kBlockN / kCopyKeyStride;          // 4
static_assert(kCopyThreadsPerKey * kChunkElems == 64 &&
                  kCopyKeyStride * kCopyKeysPerThread == kBlockN,
              "the key-row gather covers every chunk of every 64-column block of every key");

// The ids of bar.sync's named barriers (0 is __syncthreads's). They need only differ among the
// barriers of one kernel: the lockstep and transposed kernels use kMath (their producer threads
// never wait for each other); the seesaw kernel numbers its own from 1.
enum class NamedBarrier : int {
  // The lockstep and transposed kernels.
  kMath = 2,  // every math thread: exchanges through shared memory
  // The seesaw kernel: both math warpgroups, then its handoffs, each arrived at by one math
  // warpgroup and waited at by the other.
  kSeesawMath = 1,
  kMax0Ready = 2,    // A -> B: m0 and scale0 in shared memory
  kScale1Ready = 3,  // B -> A: m1 and scale1
  kP0Ready = 4,      // A -> B: P0 scale1 over stage 0's rope
  // B -> A: P1 in its buffer (and B's zeroed value rows), and B's P V both issued, so that A's
  // P1 V1_L and next S queue behind B's P0 V0_R, whose end frees stage 0's pieces 4-8.
  kP1Ready = 5,
};

// How a key tile's 1 KiB swizzle atoms (8 keys x 64 columns) follow each other in shared
// memory, and so which TMA boxes fill it:
//   kColumnBlocks  a 64-column block of all 64 keys after another (8 KiB each): a box is one
//                  column block of a run of keys inside one page, so a tile takes
//                  (64 / tokens a box) x (head_dim / 64) boxes: 9 at page 64, 36 at page 16.
//   kKeyGroups     a group of 8 keys with all their columns after another (9 KiB at d = 576):
//                  a box is one group (paged_kv_tensor_map.h's key-group map), 8 a tile at
//                  every page size that is a multiple of 8. wgmma reads either: only the
//                  stride between 8-key groups and between column blocks differ.
// Boxes are issued one at a time by the loading warp (~120 cycles each, measured on an H200),
// so the box count, not the bytes, is what grows as pages shrink: with column blocks page 16
// was 14-18% slower than page 64, with key groups it is as fast.
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

// What the two kernels of 64 query rows a CTA (split_kv_lockstep_kernel.cu,
// split_kv_seesaw_kernel.cu) add to those: P (query rows x the tile's keys) in shared memory,
// K-major like Q, and S = Q K^T with both operands there (m64n64, K the head dimension).
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
  uint8_t key_valid[kStages][kBlockN];     // the key exists (in the segment, on a valid page)
  uint64_t k_full[kStages];   // a stage's keys (and which of them exist) have landed
  uint64_t k_empty[kStages];  // every math warp is done with a stage
  uint64_t q_full;            // the segment's query rows have landed
  uint64_t q_empty;           // every math warp is done with the query rows
};

__device__ __forceinline__ int num_tiles_of(const Segment& seg) {
  return (seg.token_end - seg.token_begin + kBlockN - 1) / kBlockN;
}

// The first token of tile `tile` of a segment.
__device__ __forceinline__ int tile_begin_of(const Segment& seg, int tile) {
  return seg.token_begin + tile * kBlockN;
}

}  // namespace sm90
}  // namespace jax_flash_mla
