// Every rule that picks the split-KV kernel of a CUDA decode call, as plain host C++ over the
// call's shape and what the device allows: dispatch.cu feeds it the live device's numbers, and
// the nanobind module exports choose_split_kv_kernel so that the CPU tests walk the rules too.
//
// The kernels (docs/design.md says why each exists):
//   transposed  split_kv_transposed_kernel.cu: at most 32 query rows a KV head (tensor-parallel
//               shards of 128 heads); S^T = K Q^T and O^T = V^T P^T so that keys and value
//               columns fill wgmma's M of 64 instead of padded query rows.
//   lockstep    split_kv_lockstep_kernel.cu: 64 query rows a CTA, two math warpgroups that
//               split each tile's work and meet at every tile. Any page size, either head dim.
//   seesaw      split_kv_seesaw_kernel.cu: 64 query rows a CTA, the math warpgroups scoring
//               alternate tiles so that one's softmax runs under the other's wgmmas; d = 576,
//               TMA only. Paired: the two row blocks of a KV head run as a cluster of two CTAs
//               that share every key tile by TMA multicast.
#pragma once

#include <cstdint>

#include "../common/tile_scheduler.h"

namespace jax_flash_mla {

// The values travel as the decode target's `kernel` attribute. kDispatch, what every call of
// the public API passes, lets choose_split_kv_kernel decide; the others force one kernel, a
// route only jax_flash_mla.testing takes (so that every kernel runs the test grids).
enum class SplitKvKernel : int32_t {
  kDispatch = 0,
  kTransposed = 1,
  kLockstep = 2,
  kSeesawAlone = 3,
  kSeesawPaired = 4,
};

// Either seesaw instance: both read column-block key tiles and need every map by TMA.
inline bool is_seesaw(SplitKvKernel kernel) {
  return kernel == SplitKvKernel::kSeesawAlone || kernel == SplitKvKernel::kSeesawPaired;
}

// Query rows a CTA of the lockstep and seesaw kernels takes per KV head; more rows per KV head
// take more CTAs (row blocks, the grid's z).
constexpr int kRowsPerCta = 64;
// The most query rows per KV head the transposed kernel takes (its S^T has them as N).
constexpr int kTransposedMaxRows = 32;
// The seesaw kernel's only head dim: its tile layouts hold the 64 rope columns in a ninth block.
constexpr int kSeesawHeadDim = 576;

// What the rules look at.
struct DispatchInputs {
  int rows_per_kv = 0;     // seqlen_q * num_heads_q / num_heads_k
  int head_dim = 0;        // 576 or 512
  int64_t batch = 0;
  int max_blocks_per_seq = 0;  // block_table columns
  int page_block_size = 0;
  int num_sm_parts = 0;    // schedule pieces, the grid's x
  int num_heads_k = 0;     // the grid's y
  bool keys_fit_tma = false;   // TMA can box this cache (paged_kv_fits_tma)
  bool query_fits_tma = false; // one TMA box covers kRowsPerCta query rows (query_fits_tma)
  int sms = 0;                 // multiprocessors of the device (0: unknown)
  int max_resident_pairs = 0;  // seesaw CTA pairs (clusters) resident at once (0: unknown)
};

inline int64_t row_blocks_per_kv_head(int rows_per_kv) {
  return (static_cast<int64_t>(rows_per_kv) + kRowsPerCta - 1) / kRowsPerCta;
}

// Key tiles the block table can hold per request. The host knows no lengths (they stay on the
// device, no sync): the rules below take the table's capacity for them, so a table sized far
// past the lengths keeps the choice made for long requests.
inline int64_t table_tiles_per_request(const DispatchInputs& in) {
  return num_tiles_for_length(static_cast<int64_t>(in.max_blocks_per_seq) * in.page_block_size);
}

// 17-32 rows: the transposed kernel only where each CTA gets more than 3 key tiles. With a tile
// or two a CTA a call is about one tile's latency, and the transposed kernel's one math
// warpgroup runs S^T and all 8 column blocks of O^T where the lockstep kernel's two share the
// work; from ~4 tiles a CTA its smaller tensor work (no padded rows) evens it out or wins.
// Split kernel at h_q = 32, s_k = 4096 on an H200, transposed / lockstep: b=1 13.1 / 10.8 us,
// b=4 17.3 / 15.8, b=8 21.5 / 21.2, b=16 and 32 even. At 16 rows or fewer, whose products are
// half as wide, the transposed kernel wins even at b=1 (8.5 against 10.1 us).
inline bool transposed_kernel_pays(const DispatchInputs& in) {
  constexpr int kRowsAlwaysTransposed = 16;
  constexpr int64_t kMaxTilesPerCtaForLockstep = 3;
  if (in.rows_per_kv > kTransposedMaxRows) return false;
  if (in.rows_per_kv <= kRowsAlwaysTransposed) return true;
  return in.batch * table_tiles_per_request(in) > kMaxTilesPerCtaForLockstep * in.num_sm_parts;
}

// Whether `kernel` can run this call at all, whatever its speed: the transposed kernel holds at
// most kTransposedMaxRows rows; the seesaw kernel's layouts are d = 576 and it takes both the key
// tiles and the query rows by TMA, and in pairs the row blocks come two by two. The lockstep
// kernel runs every call (cp.async where TMA cannot box the cache or the query rows).
inline bool split_kv_kernel_can_run(const DispatchInputs& in, SplitKvKernel kernel) {
  const bool seesaw = in.head_dim == kSeesawHeadDim && in.keys_fit_tma && in.query_fits_tma &&
                      in.rows_per_kv > kTransposedMaxRows;
  switch (kernel) {
    case SplitKvKernel::kTransposed: return in.rows_per_kv <= kTransposedMaxRows;
    case SplitKvKernel::kLockstep: return true;
    case SplitKvKernel::kSeesawAlone: return seesaw;
    case SplitKvKernel::kSeesawPaired:
      return seesaw && row_blocks_per_kv_head(in.rows_per_kv) % 2 == 0;
    default: return false;
  }
}

// Query rows a CTA of the transposed kernel stages (its kRows, the N of S^T): 16 or 32.
inline int transposed_rows_per_cta(int rows_per_kv) { return rows_per_kv <= 16 ? 16 : 32; }

// A pair needs two free SMs of one GPC (a cluster), so a GPU whose GPCs have odd SM counts holds
// fewer pairs than SMs / 2: pairs run only where row blocks come in pairs and the pairs fit in
// as few waves as single CTAs (one an SM) would. Where they run they are faster than the
// lockstep kernel on every row measured (h_q = 128: the pair reads each key tile once).
inline bool seesaw_pairs_fit(const DispatchInputs& in) {
  const int64_t row_blocks = row_blocks_per_kv_head(in.rows_per_kv);
  if (in.max_resident_pairs <= 0 || in.sms <= 0) return false;
  const int64_t ctas = static_cast<int64_t>(in.num_sm_parts) * in.num_heads_k * row_blocks;
  return (ctas / 2 + in.max_resident_pairs - 1) / in.max_resident_pairs <=
         (ctas + in.sms - 1) / in.sms;
}

// One row block a KV head (33-64 rows): the seesaw kernel unpaired loses its segment start and
// end (its pipeline fills and drains per segment) and wins per tile, so it pays where each CTA's
// share of keys is long: at least 96 tiles a CTA, with a request for every four CTAs so that a
// table sized far past the lengths does not send a small batch there. Kernel time at h_q = 64
// on an H200, against the lockstep kernel: ~62 tiles a CTA (b = 128, s_k = 4096) 2.3% slower;
// ~124 tiles (b = 128, s_k = 8192; b = 64, s_k = 16384) 3-7% faster.
inline bool seesaw_alone_pays(const DispatchInputs& in) {
  constexpr int64_t kMinTilesPerCta = 96;
  return row_blocks_per_kv_head(in.rows_per_kv) == 1 && 4 * in.batch >= in.num_sm_parts &&
         in.batch * table_tiles_per_request(in) >= kMinTilesPerCta * in.num_sm_parts;
}

inline SplitKvKernel choose_split_kv_kernel(const DispatchInputs& in) {
  if (transposed_kernel_pays(in)) return SplitKvKernel::kTransposed;
  if (split_kv_kernel_can_run(in, SplitKvKernel::kSeesawPaired) && seesaw_pairs_fit(in))
    return SplitKvKernel::kSeesawPaired;
  if (split_kv_kernel_can_run(in, SplitKvKernel::kSeesawAlone) && seesaw_alone_pays(in))
    return SplitKvKernel::kSeesawAlone;
  return SplitKvKernel::kLockstep;
}

}  // namespace jax_flash_mla
