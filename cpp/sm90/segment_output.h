// Where a segment's query rows go, shared by both sm90 decode kernels: the final (out, lse)
// when the segment is its request's only split, else the split's float32 partial (o_accum,
// lse_accum) for the combine kernel. Destinations are computed once per row, not per element
// (per-element index math once made an epilogue thousands of instructions long).
#pragma once

#include <cmath>

#include "../common/split_kv.h"
#include "key_tile_pipeline.h"
#include "row_softmax.h"

namespace jax_flash_mla {
namespace sm90 {

template <typename Element>
struct RowDestination {
  bool live;       // the row exists and this segment writes something for it
  Element* out;    // its output row (only split)
  float* partial;  // its float32 partial row (split)
};

struct SegmentOutput {
  Segment seg;
  int kv_head;
  bool write_partial;  // a split whose slot is in range

  __device__ __forceinline__ SegmentOutput(const DecodeParams& p, const Segment& segment,
                                           int head)
      : seg(segment), kv_head(head),
        write_partial(!segment.is_only_split && slot_in_range(p, segment.slot)) {}

  template <typename Element>
  __device__ __forceinline__ RowDestination<Element> destination(const DecodeParams& p,
                                                                 int row) const {
    const bool live = row < p.rows_per_kv && (seg.is_only_split || write_partial);
    const int safe_row = live ? row : 0;
    return {live, static_cast<Element*>(p.out) + out_offset(p, seg.batch_idx, kv_head, safe_row),
            p.o_accum +
                (write_partial ? accum_row_index(p, seg.slot, kv_head, safe_row) : 0) * kHeadDimV};
  }

  // By one thread per row.
  __device__ __forceinline__ void store_lse(const DecodeParams& p, int row,
                                            const RowResult& r) const {
    if (row >= p.rows_per_kv) return;
    if (seg.is_only_split)
      p.lse[lse_offset(p, seg.batch_idx, kv_head, row)] = r.saw_key ? r.lse : INFINITY;
    else if (write_partial)
      p.lse_accum[accum_row_index(p, seg.slot, kv_head, row)] = r.saw_key ? r.lse : -INFINITY;
  }
};

}  // namespace sm90
}  // namespace jax_flash_mla
