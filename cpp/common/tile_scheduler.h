// Split-KV tile scheduler, shared by the CPU handler and the CUDA metadata kernel.
//
// Every request's keys are cut into tiles of kTokensPerTile tokens. The tiles of all requests,
// in request order, form one line of work that is cut into `num_sm_parts` contiguous pieces of
// about equal cost: one piece per CTA (or per CPU work item). A request whose tiles fall into
// several pieces is "split": each piece writes a float32 partial (o, lse) into its own split
// slot and the combine step merges them. Each (piece, request) pair also pays a fixed cost
// (loading Q, writing the output), counted as kFixedOverheadTiles tiles, so that many short
// requests are not crammed into one piece.
//
// Metadata layout, one row of kMetadataInts int32 per piece:
//   [kBeginReq]   first request the piece touches (== batch for an idle piece)
//   [kBeginTile]  first tile of that request
//   [kEndReq]     last request the piece touches (inclusive; kBeginReq - 1 when idle)
//   [kEndTile]    one past the last tile of kEndReq
//   [kBeginSplit] how many earlier pieces already hold tiles of kBeginReq: the piece's split
//                 index inside that request (later requests of the piece start at split 0)
// num_splits [batch + 1] is the exclusive prefix sum of the number of splits per request, so
// request r owns split slots [num_splits[r], num_splits[r + 1]). Requests with no keys own none.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace jax_flash_mla {

constexpr int kTokensPerTile = 64;
constexpr int kFixedOverheadTiles = 5;

enum MetadataField : int {
  kBeginReq = 0,
  kBeginTile = 1,
  kEndReq = 2,
  kEndTile = 3,
  kBeginSplit = 4,
  kMetadataInts = 8,  // padded to 32 bytes so a row is one aligned vector load
};

// Negative lengths count as empty; the scheduler does not know the block table, so the
// attention step clamps again to the table's capacity (see split_kv.h).
FMLA_HOST_DEVICE int64_t num_tiles_for_length(int64_t seqlen) {
  return seqlen <= 0 ? 0 : (seqlen + kTokensPerTile - 1) / kTokensPerTile;
}

// Upper bound on the number of split slots any schedule uses: each piece boundary splits at
// most one request, so there are at most batch + num_sm_parts - 1 (piece, request) segments.
FMLA_HOST_DEVICE int64_t max_split_slots(int64_t batch, int64_t num_sm_parts) {
  return batch + num_sm_parts;
}

// Serial and O(batch + num_sm_parts): fast enough for one thread on the GPU, and the single
// source of truth for both paths.
FMLA_HOST_DEVICE void build_tile_schedule(const int32_t* cache_seqlens, int batch,
                                          int num_sm_parts, int32_t* metadata,
                                          int32_t* num_splits) {
  int64_t total_cost = 0;
  for (int r = 0; r < batch; ++r) {
    const int64_t tiles = num_tiles_for_length(cache_seqlens[r]);
    if (tiles > 0) total_cost += tiles + kFixedOverheadTiles;
  }
  for (int r = 0; r <= batch; ++r) num_splits[r] = 0;
  const int64_t payload = (total_cost + num_sm_parts - 1) / num_sm_parts + kFixedOverheadTiles;

  int req = 0;
  int64_t tile = 0;       // next unassigned tile of `req`
  int split_in_req = 0;   // splits of `req` already handed out
  for (int part = 0; part < num_sm_parts; ++part) {
    int32_t* row = metadata + static_cast<int64_t>(part) * kMetadataInts;
    for (int f = 0; f < kMetadataInts; ++f) row[f] = 0;
    while (req < batch && num_tiles_for_length(cache_seqlens[req]) == 0) ++req;
    if (req >= batch) {
      row[kBeginReq] = batch;
      row[kEndReq] = batch - 1;
      continue;
    }
    row[kBeginReq] = req;
    row[kBeginTile] = static_cast<int32_t>(tile);
    row[kBeginSplit] = split_in_req;
    const bool last_part = part == num_sm_parts - 1;
    int64_t budget = payload;
    while (req < batch) {
      const int64_t tiles = num_tiles_for_length(cache_seqlens[req]);
      if (tiles == 0) {
        ++req;
        continue;
      }
      const int64_t cost = tiles - tile + kFixedOverheadTiles;
      if (last_part || cost <= budget) {
        budget -= cost;
        num_splits[req + 1] += 1;
        row[kEndReq] = req;
        row[kEndTile] = static_cast<int32_t>(tiles);
        ++req;
        tile = 0;
        split_in_req = 0;
        continue;
      }
      const int64_t take = budget - kFixedOverheadTiles;
      if (take > 0) {
        num_splits[req + 1] += 1;
        row[kEndReq] = req;
        row[kEndTile] = static_cast<int32_t>(tile + take);
        tile += take;
        split_in_req += 1;
      }
      break;
    }
  }
  for (int r = 0; r < batch; ++r) num_splits[r + 1] += num_splits[r];
}

}  // namespace jax_flash_mla
