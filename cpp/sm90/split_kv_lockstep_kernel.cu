// Split-KV MLA decode on Hopper tensor cores (wgmma through CuTe), warp-specialized, for more
// than 32 query rows per KV head (fewer go to split_kv_transposed_kernel.cu).
//
// One CTA = (piece of the schedule, KV head, block of kBlockM = 64 query rows), 3 warpgroups:
//   producer      warpgroup 0 stages the segment's 64 query rows (by TMA where one box per 64
//                 columns covers them, query_tensor_map.h) and gathers the keys of every
//                 tile into the 2-stage ring (key_tile_producer.h) in key groups, one TMA box
//                 per 8 keys with all their columns: 8 boxes a tile at every page size (column
//                 blocks took 36 at page 16, 12% slower than page 64 at h_q = 64).
//                 It gives up registers (setmaxnreg) to the math warpgroups.
//   math 0 and 1  warpgroups 1 and 2 compute, per tile:
//     S = Q K^T     math warpgroup w: all 64 keys over half of the head dimension (m64n64k16,
//                   K = 288), then each sends the other the partial scores of the other's 32
//                   keys through shared memory and adds the ones it receives to its own keys'
//     softmax       warpgroup w: keys [32w, 32w + 32). Row maxima are exchanged through shared
//                   memory, so both keep the same running max; each keeps the partial row sums
//                   of its own keys
//     P             each writes its half of P (bf16/fp16) to shared memory
//     O += P V      math warpgroup w owns value columns [256w, 256w + 256) (m64n256k16, K = 64
//                   keys), reading the whole P and the V^T view of the same key tile
// so no FLOP is done twice and the 64 x 512 float accumulator is split 128 registers a thread.
// Why S is split along the head dimension rather than by keys: split by keys, both warpgroups
// read all of Q (216 KiB of shared-memory operands a tile instead of 144), and S is bound by
// those reads (~80 bytes a cycle measured either way): 2670 cycles a tile split by keys, 1840
// split by head dimension, plus ~450 for the exchange (cycles measured on an H200).
// Loads never wait on the math warpgroups' barriers: the next stage's copies are in flight the
// moment a stage frees, and the math warpgroups sync only with each other (named barrier).
// Schedules tried here and measured no faster: the seesaw (alternate tiles per warpgroup),
// whole scores per warpgroup with P in registers, and two transposed-kernel warpgroups of 32
// rows each. The seesaw kernel of split_kv_seesaw_kernel.cu, with per-piece barriers and its
// CTAs in pairs that share the keys, is faster where row blocks pair (more than 64 rows a KV
// head) and takes those grids; unpaired, it takes one row block's grids where each CTA's share
// of keys is long (seesaw_alone_pays, heuristics.h).
//
// Masking: a key past the segment, past the length or on an invalid page scores -inf. Its
// value row must still be finite (P = 0 times NaN is NaN): TMA boxes of invalid pages are
// fetched out of range (TMA writes zeros), keys past the end inside a valid box are zeroed by
// the math warpgroups (key_masking.h), and the cp.async gather zero-fills them (a zero source
// size: their memory is never touched).
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "../common/split_kv.h"
#include "instance_ladder.h"
#include "kernels.h"
#include "key_masking.h"
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

constexpr int kBlockM = kRowBlock;  // query rows per CTA: one wgmma M
constexpr int kMathWarpGroups = 2;
constexpr int kMathThreads = 128 * kMathWarpGroups;
constexpr int kThreads = kProducerThreads + kMathThreads;
// Registers: the producer needs few (72 hold its block-table lookups of the next tile without
// spilling), the math warpgroups hold a 64 x 256 float accumulator each (128 a thread) plus
// scores and addresses. The CTA starts at 65536 / 384 = 168 a thread and setmaxnreg.inc only
// takes what .dec gave back, so 128 (168 - p) >= 256 (m - 168), i.e. p + 2m <= 504 (more and
// the math warpgroups would wait forever for registers).
// A producer of FP8 keys holds a round of its tokens' bytes in registers (44 a thread) and the
// pool tokens of two tiles (key_tile_dequant.h): 96, and the math warpgroups then fit in 200
// (ptxas spills neither; at 88 the producer spilled).
template <KeyFormat kKeyFormat>
constexpr uint32_t kProducerRegisters = kKeyFormat == KeyFormat::kFp8Packed ? 96 : 72;
template <KeyFormat kKeyFormat>
constexpr uint32_t kMathRegisters = kKeyFormat == KeyFormat::kFp8Packed ? 200 : 216;

constexpr KeyTileOrder kKeyOrder = KeyTileOrder::kKeyGroups;

// kHeadDim (576 or 512) is a template parameter so that every k-loop over it unrolls: a
// run-time trip count made ptxas serialize the wgmma chain (warning C7515).
template <typename Element, int kHeadDim>
struct Layouts : RowBlockLayouts<Element, kHeadDim, kKeyOrder> {
  // MmaS: S of all 64 keys, issued over half of the head dimension by each math warpgroup.
  // The same C layout restricted to one warpgroup's 32 keys: where its scores and its half of
  // P sit (no wgmma is issued with it).
  using MmaOwnKeys = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float,
                           Shape<Int<kBlockM>, Int<kBlockN / kMathWarpGroups>, Int<kHeadDim>>>()));
  using MmaO = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float,
                           Shape<Int<kBlockM>, Int<kHeadDimV / kMathWarpGroups>, Int<kBlockN>>,
                           GMMA::Major::K, GMMA::Major::MN>()));
};

constexpr int kKeysPerWg = kBlockN / kMathWarpGroups;  // keys whose softmax a warpgroup owns

// Partial scores one math warpgroup sends the other: 16 floats a thread, stored as 4 float4 of
// consecutive threads (conflict-free), 8 KiB.
constexpr int kPartialFloats = 16 * 128;

// d = 512's buffer of both warpgroups' partial scores (d = 576 has none: see SharedStorage).
struct NoPartialsBuffer {};
struct PartialsBuffer {
  alignas(16) float partials[2 * kPartialFloats];
};

template <typename Element, int kHeadDim>
struct SharedStorage
    : PipelineStorage<Element, kHeadDim, kBlockM>,
      std::conditional_t<(kHeadDim > kHeadDimV), NoPartialsBuffer, PartialsBuffer> {
  using L = Layouts<Element, kHeadDim>;
  // d = 576 leaves no room for more buffers (224 of the 227 KiB a CTA may have): there P goes
  // over the tile's rope columns (one atom in each key group), dead once both warpgroups have
  // their scores, and so do the partial scores math warpgroup 1 sends (it alone reads the
  // rope columns for S); `p` holds the partial scores math warpgroup 0 sends. d = 512: P in
  // `p`, the partials in PartialsBuffer.
  // (d = 576 uses every byte of the 227 KiB: not one more fits.)
  static constexpr bool kPOverRope = kHeadDim > kHeadDimV;
  alignas(1024) Element p[cosize_v<typename L::P>];
  float row_max[kMathWarpGroups][kBlockM];  // per-warpgroup tile maxima, exchanged
  float row_sum[kMathWarpGroups][kBlockM];  // per-warpgroup softmax denominators, at the end
};

// A math warpgroup's share of one segment: the online softmax over its tiles, then the
// output rows (or the split's float32 partial).
template <typename Element, int kHeadDim>
__device__ void attend_segment(const DecodeParams& p, bool use_tma, const Segment& seg,
                               int kv_head, int row_base, SharedStorage<Element, kHeadDim>& smem,
                               RingPosition& ring, uint32_t& q_phase, WarpgroupTrace& trace) {
  using L = Layouts<Element, kHeadDim>;
  const int wg = (threadIdx.x - kProducerThreads) / 128;
  const int wg_thread = threadIdx.x % 128;

  using Storage = SharedStorage<Element, kHeadDim>;
  Tensor s_q = make_tensor(make_smem_ptr(smem.q), typename L::Q{});

  typename L::MmaS mma_s;
  typename L::MmaOwnKeys mma_own;
  typename L::MmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(wg_thread);
  auto thr_own = mma_own.get_thread_slice(wg_thread);
  auto thr_o = mma_o.get_thread_slice(wg_thread);

  // Partial scores of all 64 keys (this warpgroup's half of the head dimension), then the
  // scores of this warpgroup's own keys and the coordinates (row, key within the half) of each.
  Tensor acc_partial = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor acc_s =
      partition_fragment_C(mma_own, Shape<Int<kBlockM>, Int<kBlockN / kMathWarpGroups>>{});
  Tensor coord_s = thr_own.partition_C(
      make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN / kMathWarpGroups>>{}));
  constexpr int kOwnScores = decltype(size(acc_s))::value;
  static_assert(decltype(size(acc_partial))::value == 2 * kOwnScores,
                "the first half of the 64-key C fragment is keys 0-31, the second keys 32-63");
  Tensor acc_o =
      partition_fragment_C(mma_o, Shape<Int<kBlockM>, Int<kHeadDimV / kMathWarpGroups>>{});
  clear(acc_o);

  // Operands: Q and the tile's keys for S (this warpgroup's k-steps of them); all of P and
  // this warpgroup's V columns for O.
  Tensor frag_q = thr_s.partition_fragment_A(s_q);
  constexpr int kSteps = decltype(size<2>(frag_q))::value;  // 16 head-dimension columns each
  constexpr int kFirstHalfSteps = kSteps / 2;  // d = 576: columns 0-287; the rest has the rope
  // Where P of the tile in `stage` goes, and where each warpgroup's outgoing partials go.
  // The rope columns of a key-group tile are the last 1 KiB swizzle atom of each group of 8
  // keys (8 KiB in all, the size of P): P over them is the tile's rope column block seen as
  // 64 rows x 64 keys, its 8-row atoms a group (9 KiB) apart, which wgmma reads as it reads
  // the keys; the partials take them as 8 runs of 64 float4.
  constexpr int kAtomFloat4s = 1024 / 16;
  constexpr int kGroupElements = kKeyGroup * kHeadDim;  // one key group's swizzle atoms
  constexpr int kRopeInGroup = kKeyGroup * kHeadDimV;   // its rope atom, after the values'
  const auto p_of_stage = [&](int stage) {
    if constexpr (Storage::kPOverRope)
      return local_tile(make_tensor(make_smem_ptr(smem.k[stage]), typename L::K{}),
                        Shape<Int<kBlockM>, Int<kBlockN>>{}, make_coord(0, kHeadDimV / 64));
    else
      return make_tensor(make_smem_ptr(smem.p), typename L::P{});
  };
  // Float4 `i` (of kPartialFloats / 4) of the partial scores `sender` sends.
  const auto partial_slot = [&](int sender, int stage, int i) -> float4* {
    if constexpr (Storage::kPOverRope) {
      if (sender == 0) return reinterpret_cast<float4*>(smem.p) + i;
      Element* rope_atom = smem.k[stage] + i / kAtomFloat4s * kGroupElements + kRopeInGroup;
      return reinterpret_cast<float4*>(rope_atom) + i % kAtomFloat4s;
    } else {
      return reinterpret_cast<float4*>(smem.partials + sender * kPartialFloats) + i;
    }
  };

  // Each thread holds two rows: warp * 16 + lane / 4 and that + 8 (wgmma's C layout, where
  // accumulator i belongs to the second row when bit 1 of i is set: row_half(i)).
  const int my_row[2] = {(wg_thread / 32) * 16 + (wg_thread % 32) / 4,
                         (wg_thread / 32) * 16 + (wg_thread % 32) / 4 + 8};
  const int seqlen = clamped_seqlen(p, seg.batch_idx);
  int key_limit[2];
  for (int i = 0; i < 2; ++i) {
    const int row = row_base + my_row[i];
    key_limit[i] = segment_key_limit(p, seg, seqlen, row);
  }
  RowSoftmax softmax[2];  // sums: this thread's keys only, until the segment's end
  const float scale_log2 = p.softmax_scale * kLog2e;

  const int num_tiles = num_tiles_of(seg);
  // The previous segment's row_sum may still be read by the other warpgroup.
  named_barrier_sync(NamedBarrier::kMath, kMathThreads);
  trace.mark(kTraceSegmentBegin, num_tiles);
  wait_query_rows(smem, num_tiles, q_phase, trace);

  for (int tile = 0; tile < num_tiles; ++tile) {
    const int stage = ring.stage;
    const uint8_t* key_valid = smem.key_valid[stage];
    const int tile_begin = tile_begin_of(seg, tile);
    wait_tile_keys(smem, ring, tile, trace);
    // Scores of this tile only: issuing the next tile's behind this tile's P V (tried) holds
    // this stage until the next tile has landed, so with 2 stages the next load cannot start
    // early; b >= 32 rows lost 20-30%.
    Tensor s_k = make_tensor(make_smem_ptr(smem.k[stage]), typename L::K{});
    Tensor frag_k = thr_s.partition_fragment_B(s_k);
    if (wg == 0)
      warpgroup_gemm_steps<0, kFirstHalfSteps>(mma_s, frag_q, frag_k, acc_partial);
    else
      warpgroup_gemm_steps<kFirstHalfSteps, kSteps>(mma_s, frag_q, frag_k, acc_partial);
    trace.mark(kTraceScoresDone, tile);
    // The last tile's scores are the last use of Q: the producer may stage the next segment's.
    if (tile == num_tiles - 1) warp_release(&smem.q_empty);

    // Send the other warpgroup the partial scores of its keys, take those of this one's. The
    // buffers are free: the other warpgroup read this one's previous partials before the
    // previous tile's maxima were exchanged, and math warpgroup 1 sends over rope columns only
    // it reads, once its own scores have completed.
    const auto exchange = [&](auto send_first, auto keep_first) {
      CUTE_UNROLL
      for (int j = 0; j < kOwnScores; j += 4)
        *partial_slot(wg, stage, (j / 4) * 128 + wg_thread) =
            make_float4(acc_partial(send_first + j), acc_partial(send_first + j + 1),
                        acc_partial(send_first + j + 2), acc_partial(send_first + j + 3));
      named_barrier_sync(NamedBarrier::kMath, kMathThreads);
      CUTE_UNROLL
      for (int j = 0; j < kOwnScores; j += 4) {
        const float4 other = *partial_slot(1 - wg, stage, (j / 4) * 128 + wg_thread);
        acc_s(j) = acc_partial(keep_first + j) + other.x;
        acc_s(j + 1) = acc_partial(keep_first + j + 1) + other.y;
        acc_s(j + 2) = acc_partial(keep_first + j + 2) + other.z;
        acc_s(j + 3) = acc_partial(keep_first + j + 3) + other.w;
      }
    };
    if (wg == 0)
      exchange(Int<kOwnScores>{}, Int<0>{});
    else
      exchange(Int<0>{}, Int<kOwnScores>{});
    trace.mark(kTracePartialsShared, tile);
    // TMA reads whole boxes: keys past the segment inside a valid one hold whatever the cache
    // holds. Both warpgroups' scores are done (the barrier above): each zeroes the value
    // columns of its own keys.
    if (use_tma && seg.token_end - tile_begin < kBlockN)
      zero_value_rows(s_k, max(seg.token_end - tile_begin, wg * kKeysPerWg),
                      (wg + 1) * kKeysPerWg, wg_thread);
    Tensor s_p = p_of_stage(stage);
    Tensor s_p_half = local_tile(s_p, Shape<Int<kBlockM>, Int<kBlockN / kMathWarpGroups>>{},
                                 make_coord(0, wg));
    Tensor p_out = thr_own.partition_C(s_p_half);

    // Mask, scale into the log2 domain, and take this warpgroup's row maxima. (Skipping the
    // per-key tests on tiles every row sees whole measured no faster: this step is bound by
    // the exchange's barrier.)
    float tile_max[2] = {-INFINITY, -INFINITY};
    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) {
      const int half = row_half(i);
      const int key = wg * kKeysPerWg + get<1>(coord_s(i));
      const float s = masked_log2_score(acc_s(i), key_valid[key], tile_begin + key,
                                        key_limit[half], scale_log2);
      acc_s(i) = s;
      tile_max[half] = fmaxf(tile_max[half], s);
    }
    for (int h = 0; h < 2; ++h) {
      tile_max[h] = quad_max(tile_max[h]);
      if (wg_thread % 4 == 0) smem.row_max[wg][my_row[h]] = tile_max[h];
    }
    named_barrier_sync(NamedBarrier::kMath, kMathThreads);
    trace.mark(kTraceMaxShared, tile);
    float rescale[2];
    float reference[2];
    for (int h = 0; h < 2; ++h) {
      reference[h] = softmax[h].advance(
          fmaxf(smem.row_max[0][my_row[h]], smem.row_max[1][my_row[h]]), rescale[h]);
    }
    // Elements i and i + 1 (i even) are adjacent columns of one row: one 4-byte store.
    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); i += 2) {
      const int half = row_half(i);
      const float prob0 = exp2_flush_subnormal(acc_s(i) - reference[half]);
      const float prob1 = exp2_flush_subnormal(acc_s(i + 1) - reference[half]);
      softmax[half].sum += prob0 + prob1;
      const Element pair[2] = {static_cast<Element>(prob0), static_cast<Element>(prob1)};
      *reinterpret_cast<uint32_t*>(&p_out(i)) = *reinterpret_cast<const uint32_t*>(pair);
    }
    // P (and any zeroed keys) were written through the generic proxy; wgmma reads them
    // through the async proxy.
    cutlass::arch::fence_view_async_shared();
    named_barrier_sync(NamedBarrier::kMath, kMathThreads);
    trace.mark(kTraceProbsShared, tile);

    // Once the running maxima settle, most tiles move none of a warp's rows: the 128
    // multiplies a thread are skipped then (rescale is exactly 1 when the max is unchanged).
    if (__any_sync(0xffffffffu, rescale[0] != 1.f || rescale[1] != 1.f)) {
      CUTE_UNROLL
      for (int i = 0; i < size(acc_o); ++i) acc_o(i) *= rescale[row_half(i)];
    }
    Tensor s_vt = make_tensor(make_smem_ptr(smem.k[stage]), typename L::Vt{});
    Tensor s_vt_half = local_tile(s_vt, Shape<Int<kHeadDimV / kMathWarpGroups>, Int<kBlockN>>{},
                                  make_coord(wg, 0));
    Tensor frag_v = thr_o.partition_fragment_B(s_vt_half);
    Tensor frag_p = thr_o.partition_fragment_A(s_p);
    warpgroup_gemm<false>(mma_o, frag_p, frag_v, acc_o);
    // This warp's P V wgmma has completed: its reads of the stage (and of P) are over.
    warp_release(&smem.k_empty[stage]);
    trace.mark(kTraceValuesDone, tile);
    ring.advance();
  }

  // Denominators: the quad's partial sums, then the other warpgroup's keys.
  for (int h = 0; h < 2; ++h) {
    const float quad_total = quad_sum(softmax[h].sum);
    if (wg_thread % 4 == 0) smem.row_sum[wg][my_row[h]] = quad_total;
  }
  named_barrier_sync(NamedBarrier::kMath, kMathThreads);
  RowResult result[2];
  for (int h = 0; h < 2; ++h)
    result[h] = softmax[h].finish(smem.row_sum[0][my_row[h]] + smem.row_sum[1][my_row[h]]);
  trace.mark(kTraceRowsReady, num_tiles);
  const SegmentOutput output(p, seg, kv_head);
  for (int h = 0; h < 2; ++h) result[h] = output.with_sink(p, row_base + my_row[h], result[h]);
  if (wg == 0 && wg_thread % 4 == 0) {
    for (int h = 0; h < 2; ++h) output.store_lse(p, row_base + my_row[h], result[h]);
  }
  RowDestination<Element> destination[2];
  for (int h = 0; h < 2; ++h) destination[h] = output.destination<Element>(p, row_base + my_row[h]);
  store_output_rows<Element>(acc_o, result, destination, seg.is_only_split,
                             wg * (kHeadDimV / kMathWarpGroups));
  trace.mark(kTraceSegmentEnd, num_tiles);
}

template <typename Element, int kHeadDim, KeyFormat kKeyFormat>
__global__ void __launch_bounds__(kThreads, 1)
    split_kv_lockstep_kernel(const __grid_constant__ DecodeParams params,
                                 const __grid_constant__ CUtensorMap k_map, bool use_tma,
                                 const __grid_constant__ CUtensorMap q_map, bool query_tma) {
  extern __shared__ __align__(1024) unsigned char smem_bytes[];
  auto& smem = *reinterpret_cast<SharedStorage<Element, kHeadDim>*>(smem_bytes);
  start_pipeline(params, smem, k_map, use_tma, q_map, query_tma, kMathThreads / 32);

  const int32_t* piece =
      params.tile_scheduler_metadata + static_cast<int64_t>(blockIdx.x) * kMetadataInts;
  RingPosition ring;
  uint32_t q_phase = 0;
  WarpgroupTrace trace;
  const int kv_head = blockIdx.y;
  const int row_base = blockIdx.z * kBlockM;
  // Both roles walk the same segments in the same order, so their ring positions agree.
  if (threadIdx.x < kProducerThreads) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegisters<kKeyFormat>>();
    for_each_segment(params, piece, [&](const Segment& seg) {
      produce_segment<Element, kHeadDim, kBlockM, kKeyOrder, kKeyFormat>(
          params, k_map, use_tma, q_map, query_tma, seg, kv_head, row_base, smem, ring, q_phase,
          trace);
    });
    // Copies still in flight must land before their issuing threads exit.
    cp_async_wait<0>();
  } else {
    cutlass::arch::warpgroup_reg_alloc<kMathRegisters<kKeyFormat>>();
    for_each_segment(params, piece, [&](const Segment& seg) {
      attend_segment(params, use_tma, seg, kv_head, row_base, smem, ring, q_phase, trace);
    });
  }
  trace.publish();
}

}  // namespace

cudaError_t launch_split_kv_lockstep(const DecodeParams& params, const SplitKvMaps& maps,
                                     cudaStream_t stream) {
  const dim3 grid(params.num_sm_parts, params.num_heads_k,
                  static_cast<unsigned>(row_blocks_per_kv_head(params.rows_per_kv)));
  return with_key_instance(params, [&](auto element, auto head_dim, auto key_format) {
    using Element = decltype(element);
    constexpr int kHeadDim = decltype(head_dim)::value;
    static_assert(cosize_v<typename Layouts<Element, kHeadDim>::P> * sizeof(Element) ==
                      kPartialFloats * sizeof(float),
                  "P and one warpgroup's partial scores share a buffer");
    return launch_decode_kernel<
        split_kv_lockstep_kernel<Element, kHeadDim, decltype(key_format)::value>,
        sizeof(SharedStorage<Element, kHeadDim>)>(grid, kThreads, stream, params, maps.keys,
                                                  maps.keys_by_tma, maps.query,
                                                  maps.query_by_tma);
  });
}

}  // namespace jax_flash_mla
