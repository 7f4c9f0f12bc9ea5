// Where a segment's query rows go, shared by the sm90 split-KV kernels: the final (out, lse)
// when the segment is its request's only split, else the split's float32 partial (o_accum,
// lse_accum) for the combine kernel. Destinations are computed once per row, not per element
// (per-element index math once made an epilogue thousands of instructions long).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cutlass/numeric_types.h>

#include <cmath>
#include <type_traits>

#include "../common/split_kv.h"
#include "pipeline_traits.h"
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

  // The row's result with its output weight scaled by the attention sink (sparse decode) when
  // the segment writes the final output; a split's partial is scaled by the combine instead,
  // which alone knows the merged lse.
  __device__ __forceinline__ RowResult with_sink(const DecodeParams& p, int row,
                                                 RowResult r) const {
    if (p.attn_sink != nullptr && seg.is_only_split && r.saw_key && row < p.rows_per_kv)
      r.inv_sum *= sink_scale(p, kv_head, row, r.lse);
    return r;
  }

  // By one thread per row: lse, and the largest scaled score where the call asks for it
  // (sparse prefill's max_logits, laid out as lse; a split's in max_accum, as lse_accum).
  __device__ __forceinline__ void store_lse(const DecodeParams& p, int row,
                                            const RowResult& r) const {
    if (row >= p.rows_per_kv) return;
    const float max_logit = r.saw_key ? r.max_logit : -INFINITY;
    if (seg.is_only_split) {
      const int64_t at = lse_offset(p, seg.batch_idx, kv_head, row);
      p.lse[at] = r.saw_key ? r.lse : INFINITY;
      if (p.max_logits != nullptr) p.max_logits[at] = max_logit;
    } else if (write_partial) {
      const int64_t at = accum_row_index(p, seg.slot, kv_head, row);
      p.lse_accum[at] = r.saw_key ? r.lse : -INFINITY;
      if (p.max_accum != nullptr) p.max_accum[at] = max_logit;
    }
  }
};

// A thread's output: its two rows (row_half) of a 64 x 256 wgmma C fragment, scaled by
// 1 / denominator. In the C layout a quad of threads holds 8 consecutive columns of a row per
// group j of 4 elements (thread q of the quad: columns 8j + 2q, 8j + 2q + 1), so a store of
// each thread's pairs writes 8 rows x 32 bytes per warp instruction, 64 instructions a thread.
// Two shuffles within the quad first give thread q the 4 consecutive columns 16k + 4q.. of
// groups 2k and 2k + 1 (round 1: quad lanes 0, 2, 1, 3 send to 0, 1, 2, 3, the even ones their
// group 2k pair, the odd ones their 2k + 1 pair; round 2: lanes 1, 3, 0, 2, the odd ones 2k,
// the even ones 2k + 1): 32 stores of 16 bytes (float partials) or 8 (bf16/fp16 output).
template <typename Element, typename Accumulator>
__device__ __forceinline__ void store_output_rows(const Accumulator& acc_o,
                                                 const RowResult (&result)[2],
                                                 const RowDestination<Element> (&destination)[2],
                                                 bool only_split, int column_base) {
  const int q = threadIdx.x % 4;
  const int lane_base = threadIdx.x % 32 - q;
  const int source1 = lane_base + (q == 0 ? 0 : q == 1 ? 2 : q == 2 ? 1 : 3);
  const int source2 = lane_base + (q == 0 ? 1 : q == 1 ? 3 : q == 2 ? 0 : 2);
  const bool sends_first_group_in_round1 = q % 2 == 0;
  constexpr int kGroups = decltype(size(acc_o))::value / 4;  // 8-column groups of a row
  CUTE_UNROLL
  for (int k = 0; k < kGroups / 2; ++k) {
    CUTE_UNROLL
    for (int h = 0; h < 2; ++h) {
      // This thread's pairs of groups 2k and 2k + 1 in row half h: elements 4j + 2h, + 1.
      const int first = 4 * (2 * k) + 2 * h;
      const int second = 4 * (2 * k + 1) + 2 * h;
      const float send1_x = sends_first_group_in_round1 ? acc_o(first) : acc_o(second);
      const float send1_y = sends_first_group_in_round1 ? acc_o(first + 1) : acc_o(second + 1);
      const float send2_x = sends_first_group_in_round1 ? acc_o(second) : acc_o(first);
      const float send2_y = sends_first_group_in_round1 ? acc_o(second + 1) : acc_o(first + 1);
      const float r1x = __shfl_sync(0xffffffffu, send1_x, source1);
      const float r1y = __shfl_sync(0xffffffffu, send1_y, source1);
      const float r2x = __shfl_sync(0xffffffffu, send2_x, source2);
      const float r2y = __shfl_sync(0xffffffffu, send2_y, source2);
      if (!destination[h].live) continue;
      const float scale = result[h].inv_sum;
      const float4 v = q < 2 ? make_float4(r1x, r1y, r2x, r2y) : make_float4(r2x, r2y, r1x, r1y);
      const int column = column_base + 16 * k + 4 * q;
      if (only_split) {
        using Pair = std::conditional_t<std::is_same_v<Element, cutlass::bfloat16_t>,
                                        __nv_bfloat162, __half2>;
        alignas(8) Pair pairs[2];
        reinterpret_cast<Element*>(pairs)[0] = static_cast<Element>(v.x * scale);
        reinterpret_cast<Element*>(pairs)[1] = static_cast<Element>(v.y * scale);
        reinterpret_cast<Element*>(pairs)[2] = static_cast<Element>(v.z * scale);
        reinterpret_cast<Element*>(pairs)[3] = static_cast<Element>(v.w * scale);
        *reinterpret_cast<uint2*>(destination[h].out + column) = *reinterpret_cast<uint2*>(pairs);
      } else {
        *reinterpret_cast<float4*>(destination[h].partial + column) =
            make_float4(v.x * scale, v.y * scale, v.z * scale, v.w * scale);
      }
    }
  }
}

// The epilogue through shared memory (the seesaw kernel), beside store_output_rows above: a
// segment's 64 output rows staged over the key stages, then stored by one bulk copy a row (the
// TMA engine, asynchronous), in place of each thread's 32 16-byte stores of 8 rows each. The
// staged rows are kHeadDimV values (float partials, or Element for a request's only split),
// kStagedRowElements apart: the 8-element pad keeps each half-warp's 8-byte writes (4 rows x 4
// threads) off each other's banks. The kernel's producer holds the next segment's key copies
// until the rows have been read out. (Measured 4.7% faster at b=128 h_q=128 on an H200.)
constexpr int kStagedRowElements = kHeadDimV + 8;
constexpr int kStagedRows = kRowBlock;
constexpr int kStagedRowsBytes = kStagedRows * kStagedRowElements * sizeof(float);
constexpr int kStoringWarps = kStagedRows / 32;  // one row a thread

// This thread's two rows of O (a 64 x 256 C fragment of value columns from column_base),
// times 1 / denominator, into the staged rows: elements i and i + 1 (i even) are columns
// 8 (i / 4) + 2 (thread % 4) and the next one, of row half (i / 2) % 2.
template <typename Element, typename Accumulator>
__device__ __forceinline__ void stage_output_rows(const Accumulator& acc_o,
                                                  const RowResult (&result)[2],
                                                  const int (&row)[2], bool only_split,
                                                  int column_base, void* staging) {
  const int first_column = column_base + threadIdx.x % 4 * 2;
  if (only_split) {
    Element* rows = static_cast<Element*>(staging);
    CUTE_UNROLL
    for (int i = 0; i < size(acc_o); i += 2) {
      const int h = row_half(i);
      const Element pair[2] = {static_cast<Element>(acc_o(i) * result[h].inv_sum),
                               static_cast<Element>(acc_o(i + 1) * result[h].inv_sum)};
      *reinterpret_cast<uint32_t*>(rows + row[h] * kStagedRowElements + first_column +
                                   8 * (i / 4)) = *reinterpret_cast<const uint32_t*>(pair);
    }
  } else {
    float* rows = static_cast<float*>(staging);
    CUTE_UNROLL
    for (int i = 0; i < size(acc_o); i += 2) {
      const int h = row_half(i);
      *reinterpret_cast<float2*>(rows + row[h] * kStagedRowElements + first_column +
                                 8 * (i / 4)) =
          make_float2(acc_o(i) * result[h].inv_sum, acc_o(i + 1) * result[h].inv_sum);
    }
  }
}

// Row `row` (of the CTA's 64) of the staged rows, by one thread, to its destination; returns
// once the copy has read it out of shared memory. The caller then releases the key stages.
template <typename Element>
__device__ __forceinline__ void store_staged_row(const DecodeParams& p,
                                                 const SegmentOutput& output, int row_base,
                                                 int row, bool only_split, const void* staging) {
  const RowDestination<Element> destination = output.destination<Element>(p, row_base + row);
  if (destination.live) {
    if (only_split)
      cute::SM90_BULK_COPY_S2G::copy(
          static_cast<const Element*>(staging) + row * kStagedRowElements, destination.out,
          kHeadDimV * sizeof(Element));
    else
      cute::SM90_BULK_COPY_S2G::copy(static_cast<const float*>(staging) + row * kStagedRowElements,
                                     destination.partial, kHeadDimV * sizeof(float));
  }
  cute::tma_store_arrive();
  cute::tma_store_wait<0>();
}

}  // namespace sm90
}  // namespace jax_flash_mla
