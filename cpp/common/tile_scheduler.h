// Split-KV tile scheduler, shared by the CPU handler and the CUDA metadata kernel.
//
// Every request's keys are cut into tiles of kTokensPerTile tokens. The tiles of all requests,
// in request order, form one line of work that is cut into at most `num_sm_parts` contiguous
// pieces, none costing more than a budget (the smallest of a few that fit, build_tile_schedule):
// one piece per CTA (or per CPU work item). A request whose tiles fall into
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

// A request's tile count, looked up by the schedule walks: from the lengths themselves (the
// CPU handler), or from counts the GPU kernel stages in shared memory first, so that its
// serial walks read one int a request.
struct TilesFromLengths {
  const int32_t* cache_seqlens;
  FMLA_HOST_DEVICE int64_t operator()(int r) const {
    return num_tiles_for_length(cache_seqlens[r]);
  }
};

struct TilesFromCounts {
  const int32_t* tiles;
  FMLA_HOST_DEVICE int64_t operator()(int r) const { return tiles[r]; }
};

// The budgets worth trying: a piece's cost (tiles plus kFixedOverheadTiles a segment) can be no
// less than an equal share of the total, nor less than one tile and its overhead; and the
// equal share plus one overhead always fits every tile into num_sm_parts pieces (a piece that
// stops short leaves less than one overhead unused). [first, last]: at most
// kMaxScheduleBudgets of them.
constexpr int kMaxScheduleBudgets = kFixedOverheadTiles + 1;
struct ScheduleBudgets {
  int64_t first = 0;
  int64_t last = 0;
  FMLA_HOST_DEVICE int count() const { return static_cast<int>(last - first) + 1; }
};

template <typename Tiles>
FMLA_HOST_DEVICE ScheduleBudgets schedule_budgets(const Tiles& tiles_of, int batch,
                                                  int num_sm_parts) {
  int64_t total_cost = 0;
  for (int r = 0; r < batch; ++r) {
    const int64_t tiles = tiles_of(r);
    if (tiles > 0) total_cost += tiles + kFixedOverheadTiles;
  }
  const int64_t share = (total_cost + num_sm_parts - 1) / num_sm_parts;
  ScheduleBudgets b;
  b.last = share + kFixedOverheadTiles;
  b.first = share > 1 + kFixedOverheadTiles ? share : 1 + kFixedOverheadTiles;
  if (b.first > b.last) b.first = b.last;
  return b;
}

// Walks the tiles of all requests in order, cutting a piece whenever the next tile (and its
// segment's overhead) would take the piece past `budget_per_piece`. Returns the number of
// (piece, request) segments, or -1 if some tile found no piece; with `absorb_rest` the last
// piece takes whatever is left whatever its cost (so the walk always succeeds). Writes the
// pieces and the per-request split counts (as a prefix sum) when `metadata` is not null.
// Serial and O(batch + num_sm_parts).
template <typename Tiles>
FMLA_HOST_DEVICE int walk_tile_schedule(const Tiles& tiles_of, int batch, int num_sm_parts,
                                        int64_t budget_per_piece, bool absorb_rest,
                                        int32_t* metadata, int32_t* num_splits) {
  if (metadata != nullptr)
    for (int r = 0; r <= batch; ++r) num_splits[r] = 0;
  int segments = 0;
  int req = 0;
  int64_t tile = 0;       // next unassigned tile of `req`
  int split_in_req = 0;   // splits of `req` already handed out
  for (int part = 0; part < num_sm_parts; ++part) {
    int32_t row[kMetadataInts] = {};
    while (req < batch && tiles_of(req) == 0) ++req;
    if (req >= batch) {
      row[kBeginReq] = batch;
      row[kEndReq] = batch - 1;
    } else {
      row[kBeginReq] = req;
      row[kBeginTile] = static_cast<int32_t>(tile);
      row[kBeginSplit] = split_in_req;
      const bool takes_rest = absorb_rest && part == num_sm_parts - 1;
      int64_t budget = budget_per_piece;
      while (req < batch) {
        const int64_t tiles = tiles_of(req);
        if (tiles == 0) {
          ++req;
          continue;
        }
        const int64_t cost = tiles - tile + kFixedOverheadTiles;
        if (takes_rest || cost <= budget) {
          budget -= cost;
          ++segments;
          if (metadata != nullptr) num_splits[req + 1] += 1;
          row[kEndReq] = req;
          row[kEndTile] = static_cast<int32_t>(tiles);
          ++req;
          tile = 0;
          split_in_req = 0;
          continue;
        }
        const int64_t take = budget - kFixedOverheadTiles;
        if (take > 0) {
          ++segments;
          if (metadata != nullptr) num_splits[req + 1] += 1;
          row[kEndReq] = req;
          row[kEndTile] = static_cast<int32_t>(tile + take);
          tile += take;
          split_in_req += 1;
        }
        break;
      }
    }
    if (metadata != nullptr)
      for (int f = 0; f < kMetadataInts; ++f)
        metadata[static_cast<int64_t>(part) * kMetadataInts + f] = row[f];
  }
  if (metadata != nullptr)
    for (int r = 0; r < batch; ++r) num_splits[r + 1] += num_splits[r];
  while (req < batch && tiles_of(req) == 0) ++req;
  return req >= batch ? segments : -1;
}

// The chosen budget, from each candidate's walk: segments[i] for budget first + i, the last
// with the rest absorbed (so always >= 0); -1 where a walk left tiles over. The smallest budget
// that fits every tile and cuts no more segments than the last: the longest piece is the split
// kernel's critical path, but each segment past one a request also writes a float32 partial
// the combine reads back (at b = 1, h_q = 128 a budget of one tile a piece instead of two took
// a kernel no faster and a call 2.3 us, 12%, slower, measured on an H200).
FMLA_HOST_DEVICE int64_t chosen_budget(const ScheduleBudgets& budgets, const int* segments) {
  const int last = budgets.count() - 1;
  for (int i = 0; i < last; ++i)
    if (segments[i] >= 0 && segments[i] <= segments[last]) return budgets.first + i;
  return budgets.last;
}

// The schedule with the chosen budget. The equal share plus one overhead alone (the only
// budget FlashMLA's scheduler tries) lets a piece stop up to an overhead short of it and cut
// requests unevenly: 64 requests of 64 tiles over 132 pieces take 34 + 30 tiles each (longest
// piece 39), where 37 cuts each into two halves of 32, 4.5% off the split kernel at b = 64,
// h_q = 64. The GPU walks the candidates in parallel (tile_schedule_kernel.cu); here one
// after another.
FMLA_HOST_DEVICE void build_tile_schedule(const int32_t* cache_seqlens, int batch,
                                          int num_sm_parts, int32_t* metadata,
                                          int32_t* num_splits) {
  const TilesFromLengths tiles_of{cache_seqlens};
  const ScheduleBudgets budgets = schedule_budgets(tiles_of, batch, num_sm_parts);
  int segments[kMaxScheduleBudgets];
  for (int i = 0; i < budgets.count(); ++i)
    segments[i] = walk_tile_schedule(tiles_of, batch, num_sm_parts, budgets.first + i,
                                     i == budgets.count() - 1, nullptr, nullptr);
  walk_tile_schedule(tiles_of, batch, num_sm_parts, chosen_budget(budgets, segments), true,
                     metadata, num_splits);
}

}  // namespace jax_flash_mla
