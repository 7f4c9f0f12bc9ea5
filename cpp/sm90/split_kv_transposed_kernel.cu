// Split-KV MLA decode on Hopper tensor cores for at most 32 query rows per KV head (h_q s_q
// <= 32: the tensor-parallel shards of DeepSeek-V3's 128 heads over 4-8 GPUs).
//
// Why a second kernel: wgmma's M is 64. With the query rows as M (split_kv_lockstep_kernel.cu),
// 16 rows pay for 64, and a 64-key tile costs ~3 us of tensor work on every row, more than the
// 2.4 us its 72 KiB take to arrive at the chip's copy rate (measured on an H200). Here the
// products are transposed so that the keys and the value columns fill M and the query rows are
// N (16 or 32):
//     S^T = K Q^T     m64 x kRows, K = 576: the tile's keys are A, the query rows B
//     O^T += V^T P^T  m512 x kRows, K = 64 keys: V^T (the MN-major view of the same key tile)
//                     is A, P^T (bf16/fp16 in shared memory) is B
// A tile is then ~170 KB of shared-memory operand reads and no padded rows: ~0.8 us, under
// its load time, so the kernel is bound by memory, not by the tensor cores.
//
// One CTA = (piece of the schedule, KV head, block of kRows query rows), 2 warpgroups (3 over
// FP8 keys):
//   producer  warpgroup 0: query rows (by TMA where one box per 64 columns covers them,
//             query_tensor_map.h) and key tiles (key_tile_producer.h) in key groups: one TMA
//             box per 8 keys with all their columns, 8 a tile at every page size, where column
//             blocks took 36 boxes at page 16 (their issue, ~120 cycles a box, outlasted the
//             tile's math: page 16 was 20% slower than page 64)
//             (FP8 keys: warpgroups 0 and 1, each converting one round of every tile)
//   math      the last warpgroup: the online softmax. In S^T's C layout a query row is a
//             column: its 64 keys are spread over 8 lanes of each warp and the 4 warps, so a
//             tile's row maxima are reduced by shuffles, then across warps through shared memory
//             (one warpgroup barrier); the row sums stay per thread until the segment's end.
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../common/split_kv.h"
#include "instance_ladder.h"
#include "kernels.h"
#include "key_masking.h"
#include "key_tile_dequant.h"
#include "key_tile_producer.h"
#include "once_per_device.h"
#include "paged_kv_tensor_map.h"
#include "pipeline_sync.h"
#include "pipeline_traits.h"
#include "query_tensor_map.h"
#include "row_softmax.h"
#include "segment_output.h"
#include "wgmma_ops.h"

namespace jax_flash_mla {
namespace {

using namespace cute;
using namespace sm90;

constexpr int kMathThreads = 128;
constexpr int kMathWarps = kMathThreads / 32;

// FP8 keys: two producer warpgroups, each converting one of a tile's two rounds (32 keys), so
// that each scheduler has two converting warps where it had one. A producer warp's instruction
// stream (~1 100 instructions a tile, most of them converting, at ~6 cycles each) was the
// tile's whole time with one (docs/design.md). Registers: the CTA starts at 65536 / 384 = 168
// a thread; each producer keeps one round in flight (the lockstep kernel's FP8 producer fits
// one in 96) and the math warpgroup takes what they give up: 2 p + m <= 512.
template <KeyFormat kKeyFormat>
constexpr int kProducerWarpgroups = kKeyFormat == KeyFormat::kFp8Packed ? 2 : 1;
template <KeyFormat kKeyFormat>
constexpr int kThreadsOf = kProducerWarpgroups<kKeyFormat> * kProducerThreads + kMathThreads;
constexpr uint32_t kFp8ProducerRegisters = 104;
constexpr uint32_t kFp8MathRegisters = 256;
static_assert(2 * kFp8ProducerRegisters + kFp8MathRegisters <= 512, "the register file");

constexpr KeyTileOrder kKeyOrder = KeyTileOrder::kKeyGroups;

template <typename Element, int kHeadDim, int kRows>
struct TransposedLayouts : TileLayouts<Element, kHeadDim, kRows, kKeyOrder> {
  // P^T as wgmma's B operand (N = query rows, K = keys), K-major: a row's 64 probabilities
  // are one 128-byte swizzled line.
  using Pt = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                    Shape<Int<kRows>, Int<kBlockN>>{}));
  // The same bytes seen as (keys, query rows): the shape of S^T, so that a thread writes its
  // own scores' places.
  using PtByKey = decltype(composition(
      Pt{}, make_layout(Shape<_64, Int<kRows>>{}, Stride<Int<kRows>, _1>{})));
  // S^T: keys (A, K-major as the tile lands) times query rows (B, K-major as staged).
  using MmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kRows>, Int<kHeadDim>>>()));
  // O^T: value columns (A, the MN-major V^T view) times query rows (B = P^T, K-major).
  using MmaO = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kRows>, Int<kBlockN>>,
                           GMMA::Major::MN, GMMA::Major::K>()));
};

template <typename Element, int kHeadDim, int kRows>
struct TransposedStorage : PipelineStorage<Element, kHeadDim, kRows> {
  using L = TransposedLayouts<Element, kHeadDim, kRows>;
  alignas(1024) Element pt[cosize_v<typename L::Pt>];
  float warp_max[kMathWarps][kRows];  // each warp's tile maxima of every query row
  float warp_sum[kMathWarps][kRows];  // each warp's softmax denominators, at a segment's end
};

// The reduction over the 8 lanes of a warp that share lane % 4 (the lanes holding one query
// row's keys in a wgmma C fragment whose N is the query rows).
__device__ __forceinline__ float column_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 8));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 16));
}

__device__ __forceinline__ float column_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 4);
  x += __shfl_xor_sync(0xffffffffu, x, 8);
  return x + __shfl_xor_sync(0xffffffffu, x, 16);
}

// wgmma's C layout with the query rows as N: value v of a thread's fragment (per M block) is
// on query row 2 (lane % 4) + v % 2 + 8 (v / 4) and on M row 16 warp + lane / 4 + 8 ((v / 2) % 2).
// row_slot(v) numbers a thread's kRows / 4 query rows; compile-time in v, so per-row arrays
// stay in registers.
__host__ __device__ constexpr int row_slot(int v) { return v % 2 + 2 * (v / 4); }
__device__ __forceinline__ int row_of_slot(int slot) {
  return 2 * (threadIdx.x % 4) + slot % 2 + 8 * (slot / 2);
}

template <typename Element, int kHeadDim, int kRows, int kProducerGroups>
__device__ void attend_segment_transposed(const DecodeParams& p, bool use_tma, const Segment& seg,
                                      int kv_head, int row_base,
                                      TransposedStorage<Element, kHeadDim, kRows>& smem,
                                      RingPosition& ring, uint32_t& q_phase,
                                      WarpgroupTrace& trace) {
  using L = TransposedLayouts<Element, kHeadDim, kRows>;
  constexpr int kRowSlots = kRows / 4;
  const int math_thread = threadIdx.x - kProducerGroups * kProducerThreads;
  const int warp = math_thread / 32;

  Tensor s_q = make_tensor(make_smem_ptr(smem.q), typename L::Q{});
  Tensor s_pt = make_tensor(make_smem_ptr(smem.pt), typename L::Pt{});
  Tensor s_pt_by_key = make_tensor(make_smem_ptr(smem.pt), typename L::PtByKey{});

  typename L::MmaS mma_s;
  typename L::MmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(math_thread);
  auto thr_o = mma_o.get_thread_slice(math_thread);

  Tensor acc_s = partition_fragment_C(mma_s, Shape<_64, Int<kRows>>{});
  Tensor coord_s = thr_s.partition_C(make_identity_tensor(Shape<_64, Int<kRows>>{}));
  Tensor acc_o = partition_fragment_C(mma_o, Shape<Int<kHeadDimV>, Int<kRows>>{});
  Tensor coord_o = thr_o.partition_C(make_identity_tensor(Shape<Int<kHeadDimV>, Int<kRows>>{}));
  clear(acc_o);
  constexpr int kValuesPerBlock = decltype(size<0>(acc_o))::value;
  static_assert(decltype(size<0>(acc_s))::value == kValuesPerBlock &&
                    kValuesPerBlock == 2 * kRowSlots,
                "one C layout for S^T and O^T: 2 M rows x kRows / 4 query rows a thread");

  Tensor frag_q = thr_s.partition_fragment_B(s_q);
  Tensor frag_pt = thr_o.partition_fragment_B(s_pt);
  Tensor p_out = thr_s.partition_C(s_pt_by_key);

  const int seqlen = clamped_seqlen(p, seg.batch_idx);
  int key_limit[kRowSlots];
  RowSoftmax softmax[kRowSlots];  // sums: this thread's keys only, until the segment's end
  CUTE_UNROLL
  for (int j = 0; j < kRowSlots; ++j) {
    const int row = row_base + row_of_slot(j);
    key_limit[j] = segment_key_limit(p, seg, seqlen, row);
  }
  const float scale_log2 = p.softmax_scale * kLog2e;

  const int num_tiles = num_tiles_of(seg);
  // The previous segment's warp_sum may still be being read.
  named_barrier_sync(NamedBarrier::kMath, kMathThreads);
  trace.mark(kTraceSegmentBegin, num_tiles);
  wait_query_rows(smem, num_tiles, q_phase, trace);

  for (int tile = 0; tile < num_tiles; ++tile) {
    const int stage = ring.stage;
    const uint8_t* key_valid = smem.key_valid[stage];
    const int tile_begin = tile_begin_of(seg, tile);
    wait_tile_keys(smem, ring, tile, trace);
    Tensor s_k = make_tensor(make_smem_ptr(smem.k[stage]), typename L::K{});
    Tensor frag_k = thr_s.partition_fragment_A(s_k);
    warpgroup_gemm<true>(mma_s, frag_k, frag_q, acc_s);
    trace.mark(kTraceScoresDone, tile);
    // The last tile's scores are the last use of Q: the producer may stage the next segment's.
    if (tile == num_tiles - 1) warp_release(&smem.q_empty);
    // Keys past the segment inside a valid TMA box: their value columns, once scored.
    if (use_tma && seg.token_end - tile_begin < kBlockN)
      zero_value_rows(s_k, seg.token_end - tile_begin, kBlockN, math_thread);

    // Mask, scale into the log2 domain, and take this thread's maxima of each query row.
    float tile_max[kRowSlots];
    CUTE_UNROLL
    for (int j = 0; j < kRowSlots; ++j) tile_max[j] = -INFINITY;
    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) {
      const int j = row_slot(i);
      const int key = get<0>(coord_s(i));
      const float s =
          masked_log2_score(acc_s(i), key_valid[key], tile_begin + key, key_limit[j], scale_log2);
      acc_s(i) = s;
      tile_max[j] = fmaxf(tile_max[j], s);
    }
    CUTE_UNROLL
    for (int j = 0; j < kRowSlots; ++j) {
      tile_max[j] = column_max(tile_max[j]);
      if (threadIdx.x % 32 < 4) smem.warp_max[warp][row_of_slot(j)] = tile_max[j];
    }
    named_barrier_sync(NamedBarrier::kMath, kMathThreads);
    trace.mark(kTraceMaxShared, tile);
    float rescale[kRowSlots];
    float reference[kRowSlots];
    CUTE_UNROLL
    for (int j = 0; j < kRowSlots; ++j) {
      const int row = row_of_slot(j);
      float row_max = -INFINITY;
      CUTE_UNROLL
      for (int w = 0; w < kMathWarps; ++w) row_max = fmaxf(row_max, smem.warp_max[w][row]);
      reference[j] = softmax[j].advance(row_max, rescale[j]);
    }
    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) {
      const int j = row_slot(i);
      const float prob = exp2_flush_subnormal(acc_s(i) - reference[j]);
      softmax[j].sum += prob;
      p_out(i) = static_cast<Element>(prob);
    }
    // P^T (and any zeroed keys) were written through the generic proxy; wgmma reads them
    // through the async proxy, after every math thread's writes (and reads of warp_max).
    cutlass::arch::fence_view_async_shared();
    named_barrier_sync(NamedBarrier::kMath, kMathThreads);
    trace.mark(kTraceProbsShared, tile);

    CUTE_UNROLL
    for (int i = 0; i < size(acc_o); ++i) acc_o(i) *= rescale[row_slot(i % kValuesPerBlock)];
    Tensor s_vt = make_tensor(make_smem_ptr(smem.k[stage]), typename L::Vt{});
    Tensor frag_vt = thr_o.partition_fragment_A(s_vt);
    warpgroup_gemm<false>(mma_o, frag_vt, frag_pt, acc_o);
    // This warp's O^T wgmma has completed: its reads of the stage (and of P^T) are over.
    warp_release(&smem.k_empty[stage]);
    trace.mark(kTraceValuesDone, tile);
    ring.advance();
  }

  // Denominators: this thread's keys, the warp's, then the 4 warps'.
  CUTE_UNROLL
  for (int j = 0; j < kRowSlots; ++j) {
    const float warp_total = column_sum(softmax[j].sum);
    if (threadIdx.x % 32 < 4) smem.warp_sum[warp][row_of_slot(j)] = warp_total;
  }
  named_barrier_sync(NamedBarrier::kMath, kMathThreads);
  RowResult result[kRowSlots];
  CUTE_UNROLL
  for (int j = 0; j < kRowSlots; ++j) {
    float total = 0.f;
    CUTE_UNROLL
    for (int w = 0; w < kMathWarps; ++w) total += smem.warp_sum[w][row_of_slot(j)];
    result[j] = softmax[j].finish(total);
  }
  trace.mark(kTraceRowsReady, num_tiles);
  const SegmentOutput output(p, seg, kv_head);
  CUTE_UNROLL
  for (int j = 0; j < kRowSlots; ++j)
    result[j] = output.with_sink(p, row_base + row_of_slot(j), result[j]);
  if (math_thread < 4) {
    CUTE_UNROLL
    for (int j = 0; j < kRowSlots; ++j) output.store_lse(p, row_base + row_of_slot(j), result[j]);
  }
  // Each query row's destination is computed once; element i of the fragment is at value
  // column get<0>(coord_o(i)) of row slot row_slot(i % kValuesPerBlock).
  RowDestination<Element> destination[kRowSlots];
  CUTE_UNROLL
  for (int j = 0; j < kRowSlots; ++j)
    destination[j] = output.destination<Element>(p, row_base + row_of_slot(j));
  CUTE_UNROLL
  for (int i = 0; i < size(acc_o); ++i) {
    const int j = row_slot(i % kValuesPerBlock);
    if (!destination[j].live) continue;
    const int column = get<0>(coord_o(i));
    const float value = acc_o(i) * result[j].inv_sum;
    if (seg.is_only_split)
      destination[j].out[column] = static_cast<Element>(value);
    else
      destination[j].partial[column] = value;
  }
  trace.mark(kTraceSegmentEnd, num_tiles);
}

template <typename Element, int kHeadDim, int kRows, KeyFormat kKeyFormat>
__global__ void __launch_bounds__(kThreadsOf<kKeyFormat>, 1)
    split_kv_transposed_kernel(const __grid_constant__ DecodeParams params,
                                  const __grid_constant__ CUtensorMap k_map, bool use_tma,
                                  const __grid_constant__ CUtensorMap q_map, bool query_tma) {
  extern __shared__ __align__(1024) unsigned char smem_bytes[];
  auto& smem = *reinterpret_cast<TransposedStorage<Element, kHeadDim, kRows>*>(smem_bytes);
  constexpr int kProducers = kProducerWarpgroups<kKeyFormat>;
  start_pipeline(params, smem, k_map, use_tma, q_map, query_tma, kMathWarps, kProducers);

  const int32_t* piece =
      params.tile_scheduler_metadata + static_cast<int64_t>(blockIdx.x) * kMetadataInts;
  RingPosition ring;
  uint32_t q_phase = 0;
  WarpgroupTrace trace;
  const int kv_head = blockIdx.y;
  const int row_base = blockIdx.z * kRows;
  // Both roles walk the same segments in the same order, so their ring positions agree.
  if (threadIdx.x < kProducers * kProducerThreads) {
    if constexpr (kProducers > 1) cutlass::arch::warpgroup_reg_dealloc<kFp8ProducerRegisters>();
    for_each_segment(params, piece, [&](const Segment& seg) {
      // FP8 keys: each producer warpgroup's rounds of the next tile in flight while this
      // tile's are stored.
      produce_segment<Element, kHeadDim, kRows, kKeyOrder, kKeyFormat, kFp8Rounds / kProducers,
                      kProducers>(params, k_map, use_tma, q_map, query_tma, seg, kv_head,
                                  row_base, smem, ring, q_phase, trace);
    });
    // Copies still in flight must land before their issuing threads exit.
    cp_async_wait<0>();
  } else {
    if constexpr (kProducers > 1) cutlass::arch::warpgroup_reg_alloc<kFp8MathRegisters>();
    for_each_segment(params, piece, [&](const Segment& seg) {
      attend_segment_transposed<Element, kHeadDim, kRows, kProducers>(
          params, use_tma, seg, kv_head, row_base, smem, ring, q_phase, trace);
    });
  }
  trace.publish();
}

}  // namespace

cudaError_t launch_split_kv_transposed(const DecodeParams& params, const SplitKvMaps& maps,
                                       cudaStream_t stream) {
  const dim3 grid(params.num_sm_parts, params.num_heads_k, 1);
  return with_key_instance(params, [&](auto element, auto head_dim, auto key_format) {
    using Element = decltype(element);
    constexpr int kHeadDim = decltype(head_dim)::value;
    auto launch = [&](auto rows) {
      constexpr int kRows = decltype(rows)::value;
      return launch_decode_kernel<
          split_kv_transposed_kernel<Element, kHeadDim, kRows, decltype(key_format)::value>,
          sizeof(TransposedStorage<Element, kHeadDim, kRows>)>(
          grid, kThreadsOf<decltype(key_format)::value>, stream, params, maps.keys,
          maps.keys_by_tma, maps.query, maps.query_by_tma);
    };
    return transposed_rows_per_cta(params.rows_per_kv) == 16 ? launch(IntConstant<16>{})
                                                              : launch(IntConstant<32>{});
  });
}

}  // namespace jax_flash_mla
