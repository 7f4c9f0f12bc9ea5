// Where a key tile's keys live, found by the producer through the block table before it copies
// them: for a TMA gather, each lane's box of the tile and which keys exist; for the cp.async
// gather, each key's offset in the cache. The keys that exist (in the segment, on a valid page)
// are published to the math warpgroups in the stage's key_valid, for their masks.
#pragma once

#include <cute/tensor.hpp>

#include <cstdint>

#include "../common/split_kv.h"
#include "paged_kv_tensor_map.h"
#include "pipeline_traits.h"

namespace jax_flash_mla {
namespace sm90 {

// The cp.async gather's division of a tile: eight producer threads a key row, thread
// `thread % 8` copying the 16-byte chunk of that index of each of the row's 64-column blocks,
// and thread group `thread / 8` taking keys group, group + 16, group + 32, group + 48. A thread
// then resolves its own keys from its own table entries (no key offsets through shared memory,
// no producer barrier between the lookups and the copies), and one copy instruction of a warp
// moves 128 contiguous bytes of each of four key rows. (kCopyThreadsPerKey and the rest:
// pipeline_traits.h, which the barriers' arrival counts read too.)
__device__ __forceinline__ int copy_key_of(int thread, int j) {
  return thread / kCopyThreadsPerKey + kCopyKeyStride * j;
}

// The block-table entries of this thread's keys of the tile at `tile_begin`, -1 past the
// segment, as loaded: fetched a tile before they are used, so that their round trip (HBM for
// sparse indices, read once) overlaps the tile before.
struct KeyRowEntries {
  int32_t entry[kCopyKeysPerThread];
};

__device__ __forceinline__ KeyRowEntries fetch_key_rows(const DecodeParams& p, const Segment& seg,
                                                        int tile_begin, int thread) {
  KeyRowEntries rows;
  CUTE_UNROLL
  for (int j = 0; j < kCopyKeysPerThread; ++j) {
    const int token = tile_begin + copy_key_of(thread, j);
    rows.entry[j] = token < seg.token_end ? block_table_entry(p, seg.batch_idx, token) : -1;
  }
  return rows;
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

}  // namespace sm90
}  // namespace jax_flash_mla
