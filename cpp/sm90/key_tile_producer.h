// The producer warpgroup of the lockstep and transposed kernels (split_kv_lockstep_kernel.cu,
// split_kv_transposed_kernel.cu): it stages a segment's query rows (query_row_copies.h) and
// gathers its 64-key tiles into the 2-stage shared-memory ring (72 KiB a stage at d = 576),
// with TMA boxes through the block table (its first warp; see paged_kv_tensor_map.h), for
// page sizes TMA cannot box with cp.async, eight threads a key row (key_tile_copies.h), or,
// for DeepSeek-V3.2's FP8 tokens, through registers, dequantized (key_tile_dequant.h). A
// stage's "full" mbarrier completes when its bytes have landed; the stage is refilled as soon
// as every math warp has arrived on its "empty" mbarrier.
//
// Masking contract with the math warpgroups: key_valid[stage][key] says whether a key exists
// (in the segment, on a valid page). TMA boxes of invalid pages are fetched out of range (TMA
// writes zeros); keys past the segment inside a valid box are read and must be zeroed by the
// math side before P V (zero_value_rows, key_masking.h); the cp.async gather zero-fills every
// missing key.
#pragma once

#include <cute/tensor.hpp>

#include <cstdint>
#include <type_traits>

#include "../common/split_kv.h"
#include "kernel_trace.h"
#include "key_tile_copies.h"
#include "key_tile_dequant.h"
#include "key_tile_lookup.h"
#include "pipeline_sync.h"
#include "pipeline_traits.h"
#include "query_row_copies.h"

namespace jax_flash_mla {
namespace sm90 {

// The producer warpgroup: for each segment, its query rows (once the math warpgroups are done
// with the previous ones), then its key tiles, each as soon as a stage frees, in kOrder (with
// TMA, k_map is the map that order's boxes need).
template <typename Element, int kHeadDim, int kQueryRows,
          KeyTileOrder kOrder = KeyTileOrder::kColumnBlocks,
          KeyFormat kKeyFormat = KeyFormat::kSameAsQuery, int kFp8RoundsAhead = 1,
          int kFp8Producers = 1>
__device__ void produce_segment(const DecodeParams& p, const CUtensorMap& k_map, bool use_tma,
                                const CUtensorMap& q_map, bool query_tma,
                                const Segment& seg, int kv_head, int row_base,
                                PipelineStorage<Element, kHeadDim, kQueryRows>& smem,
                                RingPosition& ring, uint32_t& q_phase, WarpgroupTrace& trace) {
  using L = TileLayouts<Element, kHeadDim, kQueryRows, kOrder>;
  // FP8 keys with several producer warpgroups: this thread's warpgroup takes rounds part,
  // part + kFp8Producers, ... of each tile, and only warpgroup 0 stages the query rows.
  // Compile-time 0 with one (a runtime warpgroup index made the lockstep producer spill).
  const int thread = kFp8Producers > 1 ? threadIdx.x % kProducerThreads : threadIdx.x;  // 0..127
  const int part = kFp8Producers > 1 ? threadIdx.x / kProducerThreads : 0;
  static_assert(kFp8Producers == 1 || kKeyFormat == KeyFormat::kFp8Packed,
                "several producer warpgroups share FP8 tiles only");
  const int num_tiles = num_tiles_of(seg);
  if (num_tiles == 0) return;
  // With TMA one warp drives the copy engine for the keys; with cp.async all producer threads
  // gather them. The query rows: thread 0 (in the TMA warp) alone with TMA, every producer
  // thread with cp.async.
  const bool loads_keys = !use_tma || thread < 32;
  const bool loads_query = part == 0 && (!query_tma || thread == 0);
  // FP8 keys (bf16 queries, d = 576, one KV head; an instance of their own) by every producer
  // thread through registers, as one stream of rounds with kFp8RoundsAhead of them in flight
  // (key_tile_dequant.h): a tile's loads went out while the tile before it was stored; the
  // stores reach wgmma (the async proxy) through a proxy fence before each thread's release
  // arrival.
  constexpr bool kFp8Keys = kKeyFormat == KeyFormat::kFp8Packed;
  static_assert(!kFp8Keys || (std::is_same_v<Element, cutlass::bfloat16_t> &&
                              kHeadDim == kSparseHeadDim),
                "FP8 keys are DeepSeek-V3.2's 576-column latents, read with bf16 queries");
  Fp8StoreSlots fp8_slots{};
  if constexpr (kFp8Keys) fp8_slots = fp8_store_slots<typename L::K>(smem.k[0], thread);
  using Fp8Stream = Fp8KeyStream<kFp8RoundsAhead, kFp8Rounds / kFp8Producers>;
  const auto load_fp8_keys = [&](Fp8Stream& stream, int tile) {
    Barrier::wait(&smem.k_empty[ring.stage], ring.phase ^ 1);
    trace.mark(kTraceStageFree, tile);
    stream.template store_tile<typename L::K>(p, seg, tile, fp8_slots,
                                              cute::cast_smem_ptr_to_uint(smem.k[ring.stage]),
                                              smem.key_valid[ring.stage], thread);
    cutlass::arch::fence_view_async_shared();
    Barrier::arrive(&smem.k_full[ring.stage]);
    trace.mark(kTraceKeysIssued, tile);
    ring.advance();
  };
  // cp.async: each thread's keys' table entries are fetched a tile ahead (next_rows).
  KeyRowEntries next_rows{};
  if (!use_tma && !kFp8Keys) next_rows = fetch_key_rows(p, seg, tile_begin_of(seg, 0), thread);
  const auto load_keys = [&](int tile) {
    const int tile_begin = tile_begin_of(seg, tile);
    TmaTileLookup lookup{};
    KeyRowEntries rows{};
    if (use_tma) {
      lookup = lookup_tile_tma<kOrder>(p, seg, tile_begin);
    } else {
      rows = next_rows;
      next_rows = fetch_key_rows(p, seg, tile_begin_of(seg, tile + 1), thread);
    }
    Barrier::wait(&smem.k_empty[ring.stage], ring.phase ^ 1);
    trace.mark(kTraceStageFree, tile);
    Tensor s_k = make_tensor(make_smem_ptr(smem.k[ring.stage]), typename L::K{});
    if (use_tma) {
      load_tile_tma<Element, kHeadDim, kOrder>(p, k_map, lookup, kv_head,
                                               smem.key_valid[ring.stage],
                                               &smem.k_full[ring.stage], s_k);
    } else {
      load_key_rows_cp_async<kHeadDim>(p, kv_head, tile_begin, rows, s_k,
                                       smem.key_valid[ring.stage], thread);
      arrive_when_copies_land(&smem.k_full[ring.stage]);
      // key_valid was written with plain stores, one thread a key row: each writer's plain
      // (release) arrival publishes its keys' to the math warpgroups.
      if (thread % kCopyThreadsPerKey == 0) Barrier::arrive(&smem.k_full[ring.stage]);
    }
    trace.mark(kTraceKeysIssued, tile);
    ring.advance();
  };
  // The first tile's keys go before the query rows: their stage frees once the previous
  // segment's next-to-last tile is done, the query buffer only after its last tile's scores,
  // so the new segment's first keys are in flight while the previous one finishes.
  const auto stage_query = [&] {
    if (loads_query)
      stage_query_rows<Element, kHeadDim, kQueryRows>(p, q_map, query_tma, seg, kv_head,
                                                      row_base, smem, q_phase, trace);
    q_phase ^= 1;  // by every producer thread, so that the phases agree whichever path stages
  };
  if constexpr (kFp8Keys) {
    Fp8Stream stream(p, seg, thread, part);
    load_fp8_keys(stream, 0);
    stage_query();
    for (int tile = 1; tile < num_tiles; ++tile) load_fp8_keys(stream, tile);
    return;
  }
  if (loads_keys) load_keys(0);
  stage_query();
  if (!loads_keys) return;
  for (int tile = 1; tile < num_tiles; ++tile) load_keys(tile);
}

}  // namespace sm90
}  // namespace jax_flash_mla
