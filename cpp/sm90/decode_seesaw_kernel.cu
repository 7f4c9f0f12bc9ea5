// Split-KV MLA decode on Hopper tensor cores for more than 32 query rows per KV head, d = 576,
// keys gathered by TMA: the "seesaw" schedule, in which each math warpgroup's softmax runs
// while the other's wgmmas keep the tensor cores busy. (The 64-row kernel of
// decode_wgmma_kernel.cu runs the two math warpgroups in lockstep, so the ~1 760 cycles of
// score exchange and softmax a tile leave the tensor cores idle: benchmarks/NOTES.md v14.)
//
// One CTA = (piece of the schedule, KV head, block of 64 query rows), 3 warpgroups: a producer
// (query rows and key tiles, key_tile_pipeline.h) and math warpgroups A and B. A owns output
// columns [0, 256) (O_L), B [256, 512) (O_R), 128 float registers a thread each. Tiles come in
// pairs: tile 2j lands in stage 0, tile 2j + 1 in stage 1. Per pair, with m the running row max
// (in log2 units), shared through shared memory:
//   A: S0 = Q K0^T (all 576 columns), m0 = max(m, rowmax S0), scale0 = 2^(m - m0),
//      P0 = 2^(S0 - m0), O_L = O_L scale0 + P0 V0_L (P0 from registers)
//   B: S1 = Q K1^T, m1 = max(m0, rowmax S1), scale1 = 2^(m0 - m1), P1 = 2^(S1 - m1),
//      O_R = O_R scale0 scale1 + P1 V1_R (P1 from registers), then O_R += (P0 scale1) V0_R
//   A: O_L = O_L scale1 + P1 V1_L
// so every tile's scores are computed once, by one warpgroup, and while A works out P0 the
// tensor cores run B's S1, while B works out P1 they run A's P0 V0_L, and so on.
// P0 scale1 goes to B over tile 0's rope columns (dead once S0 is done), P1 to A in a buffer of
// its own. Each stage has two column groups, [0, 256) and [256, 576), each with its own "full"
// and "empty" mbarrier: A is the last reader of stage 0's first group (P0 V0_L) and of stage
// 1's first group (P1 V1_L), B of stage 1's second group (P1 V1_R) and of stage 0's second
// (P0 V0_R, and P0 over the rope), and each group is refilled as soon as its last reader is
// done. The producer refills in the order the groups free (stage 0 group 0, stage 1 group 1,
// stage 0 group 1, stage 1 group 0), and each warpgroup's next S starts with the group that
// freed first: A with [0, 256) of stage 0, B with [256, 576) of stage 1.
//
// Opt-in (JAX_FLASH_MLA_KERNEL=seesaw): its traced CTAs run 2.10 us a tile against the
// lockstep kernel's 2.47, but the kernel as a whole is not yet faster (benchmarks/NOTES.md v15).
//
// Masking is the 64-row kernel's (key_valid per key, key limit per row); keys past the
// segment inside a valid TMA box are zeroed, value columns [0, 512), by the warpgroup that
// scored their tile, after its S and before any P V reads them.
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>

#include <cstdint>

#include "../common/split_kv.h"
#include "kernels.h"
#include "key_tile_pipeline.h"
#include "once_per_device.h"
#include "paged_kv_tensor_map.h"
#include "query_tensor_map.h"
#include "row_softmax.h"
#include "segment_output.h"

namespace jax_flash_mla {
namespace {

using namespace cute;
using namespace sm90;

constexpr int kBlockM = 64;  // query rows per CTA: one wgmma M
constexpr int kHeadDim = 576;
constexpr int kMathWarpGroups = 2;
constexpr int kMathThreads = 128 * kMathWarpGroups;
constexpr int kThreads = kProducerThreads + kMathThreads;
// setmaxnreg: 128 (168 - p) >= 256 (m - 168), i.e. p + 2m <= 504 (decode_wgmma_kernel.cu).
constexpr uint32_t kProducerRegisters = 72;
constexpr uint32_t kMathRegisters = 216;
// Named barriers after the producer's: both math warpgroups; then the seesaw's handoffs, each
// arrived at by one math warpgroup and waited at by the other.
constexpr int kMathBarrier = kProducerBarrier + 1;
constexpr int kMax0Ready = kProducerBarrier + 2;    // A -> B: m0 and scale0 in shared memory
constexpr int kScale1Ready = kProducerBarrier + 3;  // B -> A: m1 and scale1
constexpr int kP0Ready = kProducerBarrier + 4;      // A -> B: P0 scale1 over stage 0's rope
constexpr int kP1Ready = kProducerBarrier + 5;      // B -> A: P1 in its buffer
constexpr int kOwnP0Stored = kProducerBarrier + 6;  // A's warps: P0 written / read

// Column groups of a stage: [0, kSplitColumn) = V_L, [kSplitColumn, 576) = V_R and the rope.
constexpr int kGroups = 2;
constexpr int kSplitColumn = kHeadDimV / kMathWarpGroups;
constexpr int kSplitStep = kSplitColumn / 16;  // S's k-steps (16 columns) before the split
constexpr int kSteps = kHeadDim / 16;

template <typename Element>
struct Layouts : TileLayouts<Element, kHeadDim, kBlockM> {
  using Atom = GMMA::Layout_K_SW128_Atom<Element>;
  using P = decltype(tile_to_shape(Atom{}, Shape<Int<kBlockM>, Int<kBlockN>>{}));
  using MmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float,
                           Shape<Int<kBlockM>, Int<kBlockN>, Int<kHeadDim>>>()));
  // O half += P V half, P from this warpgroup's registers (its own tile) ...
  using MmaOwnP = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float,
                           Shape<Int<kBlockM>, Int<kSplitColumn>, Int<kBlockN>>,
                           GMMA::Major::K, GMMA::Major::MN>()));
  // ... or from shared memory (the other warpgroup's tile).
  using MmaSharedP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float,
                           Shape<Int<kBlockM>, Int<kSplitColumn>, Int<kBlockN>>,
                           GMMA::Major::K, GMMA::Major::MN>()));
};

template <typename Element>
struct SharedStorage {
  using L = Layouts<Element>;
  alignas(1024) Element q[cosize_v<typename L::Q>];
  alignas(1024) Element k[kStages][cosize_v<typename L::K>];
  alignas(1024) Element p1[cosize_v<typename L::P>];  // B's P1 for A
  uint8_t key_valid[kStages][kBlockN];
  float row_max[kBlockM];  // the running max: m0 after A's step, m1 after B's
  float scale0[kBlockM];
  float scale1[kBlockM];
  float row_sum[kMathWarpGroups][kBlockM];  // each warpgroup's denominator, at the end
  uint64_t k_full[kStages][kGroups];
  uint64_t k_empty[kStages][kGroups];
  uint64_t q_full;
  uint64_t q_empty;
};

// The mbarrier parity of each stage, flipped by producer and consumers alike after each use
// (a pair with one tile leaves stage 1 untouched).
struct StagePhases {
  uint32_t bits = 0;
  __device__ uint32_t parity(int stage) const { return (bits >> stage) & 1u; }
  __device__ void flip(int stage) { bits ^= 1u << stage; }
};

__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// `ptr`, as a value the compiler must assume changes at each call.
template <typename T>
__device__ __forceinline__ T* opaque(T* ptr) {
  asm volatile("" : "+l"(ptr));
  return ptr;
}

template <typename Element>
__device__ __forceinline__ Element* p0_buffer(SharedStorage<Element>& smem) {
  return smem.k[0] + kBlockN * kHeadDimV;  // stage 0's rope block: 64 x 64, the size of P
}

// The producer: per pair, both tiles' block-table lookups first, then each column group as
// it frees. The first pair's early groups go before the query rows (whose buffer frees only
// after the previous segment's last scores).
template <typename Element>
__device__ void produce_segment(const DecodeParams& p, const CUtensorMap& k_map,
                                const CUtensorMap& q_map, bool query_tma, const Segment& seg,
                                int kv_head, int row_base, SharedStorage<Element>& smem,
                                StagePhases& phases, uint32_t& q_phase, WarpgroupTrace& trace) {
  using L = Layouts<Element>;
  const int num_tiles = num_tiles_of(seg);
  if (num_tiles == 0) return;
  const bool loads_keys = threadIdx.x < 32;
  const bool loads_query = !query_tma || threadIdx.x == 0;
  for (int first = 0; first < num_tiles; first += kStages) {
    const bool has_second = first + 1 < num_tiles;
    TmaTileLookup lookup[kStages];
    Tensor s_k0 = make_tensor(make_smem_ptr(smem.k[0]), typename L::K{});
    Tensor s_k1 = make_tensor(make_smem_ptr(smem.k[1]), typename L::K{});
    if (loads_keys) {
      lookup[0] = lookup_tile_tma(p, seg, seg.token_begin + first * kBlockN);
      if (has_second) lookup[1] = lookup_tile_tma(p, seg, seg.token_begin + (first + 1) * kBlockN);
      Barrier::wait(&smem.k_empty[0][0], phases.parity(0) ^ 1);
      trace.mark(kTraceStageFree, first);
      publish_key_valid(lookup[0], smem.key_valid[0]);
      load_columns_tma<Element, 0, kSplitColumn>(p, k_map, lookup[0], kv_head,
                                                 &smem.k_full[0][0], s_k0);
      if (has_second) {
        Barrier::wait(&smem.k_empty[1][1], phases.parity(1) ^ 1);
        publish_key_valid(lookup[1], smem.key_valid[1]);
        load_columns_tma<Element, kSplitColumn, kHeadDim>(p, k_map, lookup[1], kv_head,
                                                          &smem.k_full[1][1], s_k1);
      }
    }
    if (first == 0) {
      if (loads_query)
        stage_query_rows<Element, kHeadDim, kBlockM>(p, q_map, query_tma, seg, kv_head,
                                                     row_base, smem, q_phase, trace);
      q_phase ^= 1;  // by every producer thread, so that the phases agree
    }
    if (!loads_keys) return;
    Barrier::wait(&smem.k_empty[0][1], phases.parity(0) ^ 1);
    load_columns_tma<Element, kSplitColumn, kHeadDim>(p, k_map, lookup[0], kv_head,
                                                      &smem.k_full[0][1], s_k0);
    phases.flip(0);
    if (has_second) {
      Barrier::wait(&smem.k_empty[1][0], phases.parity(1) ^ 1);
      load_columns_tma<Element, 0, kSplitColumn>(p, k_map, lookup[1], kv_head,
                                                 &smem.k_full[1][0], s_k1);
      phases.flip(1);
    }
    trace.mark(kTraceKeysIssued, first);
  }
}

// k-steps [kFirst, kEnd) of a wgmma chain, issued and committed as one batch (not waited for).
template <int kFirst, int kEnd, typename TiledMma, typename FragA, typename FragB, typename FragC>
__device__ __forceinline__ void issue_steps(TiledMma& mma, const FragA& a, const FragB& b,
                                            FragC& c) {
  warpgroup_arrive();
  CUTE_UNROLL
  for (int k = kFirst; k < kEnd; ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
}

// S = Q K^T of the tile in `stage`, each column group as soon as it has landed: A (stage 0)
// starts with [0, 256), B (stage 1) with [256, 576), the groups their stages refill first.
template <typename Element, typename TiledMma, typename FragQ, typename FragK, typename FragS>
__device__ __forceinline__ void compute_scores(SharedStorage<Element>& smem, int stage,
                                               uint32_t parity, TiledMma& mma,
                                               const FragQ& frag_q, const FragK& frag_k,
                                               FragS& acc_s, WarpgroupTrace& trace, int tile) {
  warpgroup_fence_operand(acc_s);
  mma.accumulate_ = GMMA::ScaleOut::Zero;
  const int first_group = stage == 0 ? 0 : 1;
  Barrier::wait(&smem.k_full[stage][first_group], parity);
  trace.mark(kTraceKeysLanded, tile);
  if (stage == 0)
    issue_steps<0, kSplitStep>(mma, frag_q, frag_k, acc_s);
  else
    issue_steps<kSplitStep, kSteps>(mma, frag_q, frag_k, acc_s);
  Barrier::wait(&smem.k_full[stage][1 - first_group], parity);
  trace.mark(kTraceRestLanded, tile);
  if (stage == 0)
    issue_steps<kSplitStep, kSteps>(mma, frag_q, frag_k, acc_s);
  else
    issue_steps<0, kSplitStep>(mma, frag_q, frag_k, acc_s);
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc_s);
}

// Masks S (to -inf where a key is absent or out of the row's reach), scales it into the log2
// domain and returns the row maxima of this thread's two rows over the quad (the whole row).
template <typename FragS, typename Coords>
__device__ __forceinline__ void mask_and_max(FragS& acc_s, const Coords& coord_s,
                                             const uint8_t* key_valid, int tile_begin,
                                             const int (&key_limit)[2], float scale_log2,
                                             float (&tile_max)[2]) {
  tile_max[0] = tile_max[1] = -INFINITY;
  CUTE_UNROLL
  for (int i = 0; i < size(acc_s); ++i) {
    const int half = row_half(i);
    const int key = get<1>(coord_s(i));
    const bool visible = key_valid[key] && tile_begin + key < key_limit[half];
    const float s = visible ? acc_s(i) * scale_log2 : -INFINITY;
    acc_s(i) = s;
    tile_max[half] = fmaxf(tile_max[half], s);
  }
  for (int h = 0; h < 2; ++h) tile_max[h] = quad_max(tile_max[h]);
}

// The reference a tile's probabilities are measured from: its new running max, or 0 while the
// row has seen no key (so that 2^(-inf - reference) is 0, not NaN).
__device__ __forceinline__ float reference_of(float new_max) {
  return new_max == -INFINITY ? 0.f : new_max;
}

// P = 2^(S - reference) in place; returns each row half's sum of this thread's P.
template <typename FragS>
__device__ __forceinline__ void exponentiate(FragS& acc_s, const float (&reference)[2],
                                             float (&sum)[2]) {
  sum[0] = sum[1] = 0.f;
  CUTE_UNROLL
  for (int i = 0; i < size(acc_s); ++i) {
    const float prob = exp2f(acc_s(i) - reference[row_half(i)]);
    acc_s(i) = prob;
    sum[row_half(i)] += prob;
  }
}

// Writes P times a per-row factor (a C fragment, float or already bf16/fp16) into a 64 x 64
// buffer of layout L::P: elements i and i + 1 (i even) are adjacent keys of one row, one
// 4-byte store.
template <typename Element, typename FragP, typename PartitionedP>
__device__ __forceinline__ void store_probs(const FragP& probs, const float (&scale)[2],
                                            PartitionedP& p_out) {
  CUTE_UNROLL
  for (int i = 0; i < size(probs); i += 2) {
    const float factor = scale[row_half(i)];
    const Element pair[2] = {static_cast<Element>(static_cast<float>(probs(i)) * factor),
                             static_cast<Element>(static_cast<float>(probs(i + 1)) * factor)};
    *reinterpret_cast<uint32_t*>(&p_out(i)) = *reinterpret_cast<const uint32_t*>(pair);
  }
}

// O *= scale per row half; skipped when no row of the warp changes (scale exactly 1), as most
// tiles once the running maxima settle.
template <typename FragO>
__device__ __forceinline__ void rescale_output(FragO& acc_o, const float (&scale)[2]) {
  if (__any_sync(0xffffffffu, scale[0] != 1.f || scale[1] != 1.f)) {
    CUTE_UNROLL
    for (int i = 0; i < size(acc_o); ++i) acc_o(i) *= scale[row_half(i)];
  }
}

template <typename Element>
__device__ void attend_segment(const DecodeParams& p, const Segment& seg, int kv_head,
                               int row_base, SharedStorage<Element>& smem, StagePhases& phases,
                               uint32_t& q_phase, WarpgroupTrace& trace) {
  using L = Layouts<Element>;
  const int wg = (threadIdx.x - kProducerThreads) / 128;  // 0: A, 1: B
  const int wg_thread = threadIdx.x % 128;
  const int stage = wg;  // the stage of the tiles this warpgroup scores

  typename L::MmaS mma_s;
  typename L::MmaOwnP mma_own;
  typename L::MmaSharedP mma_shared;
  auto thr_s = mma_s.get_thread_slice(wg_thread);
  auto thr_own = mma_own.get_thread_slice(wg_thread);
  auto thr_shared = mma_shared.get_thread_slice(wg_thread);

  Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor coord_s = thr_s.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  // This tile's P as P V's A operand, in registers: for 16-bit inputs the m64n64 C fragment's
  // element order is the A fragment's of four k16 steps (thread's pair, row half, 8-key half,
  // then step), so the C-ordered copy is the operand as is.
  Tensor p_regs = make_tensor<Element>(Shape<Shape<_2, _2, _2>, _1, Int<kBlockN / 16>>{});
  static_assert(decltype(size(acc_s))::value == decltype(size(p_regs))::value, "P's shape");
  Tensor acc_o = partition_fragment_C(mma_own, Shape<Int<kBlockM>, Int<kSplitColumn>>{});
  clear(acc_o);

  // This warpgroup's value columns of either stage (V^T views over the key tiles), and the
  // P buffers: P0 over stage 0's rope, P1 its own.
  const auto value_half = [&](int s) {
    Tensor s_vt = make_tensor(make_smem_ptr(opaque(smem.k[s])), typename L::Vt{});
    return local_tile(s_vt, Shape<Int<kSplitColumn>, Int<kBlockN>>{}, make_coord(wg, 0));
  };
  const auto p_buffer = [&](int which) {  // P0 over stage 0's rope, P1 its own
    return make_tensor(make_smem_ptr(opaque(which == 0 ? p0_buffer(smem) : smem.p1)),
                       typename L::P{});
  };

  // O half += P V half with the P of `stage`'s tile from its buffer (P0 over stage 0's rope,
  // P1 its own), issued and committed, not waited for.
  const auto issue_values_shared_p = [&](int s) {
    Tensor frag_p = thr_shared.partition_fragment_A(p_buffer(s));
    Tensor frag_v = thr_shared.partition_fragment_B(value_half(s));
    warpgroup_fence_operand(acc_o);
    issue_steps<0, kBlockN / 16>(mma_shared, frag_p, frag_v, acc_o);
  };

  const int my_row[2] = {(wg_thread / 32) * 16 + (wg_thread % 32) / 4,
                         (wg_thread / 32) * 16 + (wg_thread % 32) / 4 + 8};
  const int seqlen = clamped_seqlen(p, seg.batch_idx);
  int key_limit[2];
  for (int h = 0; h < 2; ++h) key_limit[h] = segment_key_limit(p, seg, seqlen, row_base + my_row[h]);
  const float scale_log2 = p.softmax_scale * kLog2e;
  float row_sum[2] = {0.f, 0.f};  // this thread's share, measured from the running max
  float running_max[2] = {-INFINITY, -INFINITY};  // B's m1 after each pair (B only)

  const int num_tiles = num_tiles_of(seg);
  // The previous segment's row sums may still be read by the other warpgroup.
  named_barrier_sync(kMathBarrier, kMathThreads);
  trace.mark(kTraceSegmentBegin, num_tiles);
  wait_query_rows(smem, num_tiles, q_phase, trace);

  for (int first = 0; first < num_tiles; first += kStages) {
    const bool last_pair = first + kStages >= num_tiles;
    const bool has_second = first + 1 < num_tiles;
    const uint32_t parity0 = phases.parity(0);
    const uint32_t parity1 = phases.parity(1);
    // S's operand descriptors, from pointers the compiler cannot see through: loop-invariant,
    // they were hoisted out of the loop, 36 k-steps x 2 operands x 64 bits held live across
    // it (the math warpgroups spilled). (Made after each of S's waits instead: 8% slower.)
    Tensor s_q = make_tensor(make_smem_ptr(opaque(smem.q)), typename L::Q{});
    Tensor s_k = make_tensor(make_smem_ptr(opaque(smem.k[stage])), typename L::K{});
    Tensor frag_q = thr_s.partition_fragment_A(s_q);
    Tensor frag_k = thr_s.partition_fragment_B(s_k);
    if (wg == 0) {
      // ---- A: tile `first`, stage 0 ----
      const int tile_begin = seg.token_begin + first * kBlockN;
      compute_scores(smem, 0, parity0, mma_s, frag_q, frag_k, acc_s, trace, first);
      trace.mark(kTraceScoresDone, first);
      if (last_pair) warp_release(&smem.q_empty);
      if (seg.token_end - tile_begin < kBlockN)
        zero_value_rows(s_k, seg.token_end - tile_begin, kBlockN, wg_thread);
      float tile_max[2];
      mask_and_max(acc_s, coord_s, smem.key_valid[0], tile_begin, key_limit, scale_log2,
                   tile_max);
      float reference[2], scale0[2];
      for (int h = 0; h < 2; ++h) {
        const float previous = first == 0 ? -INFINITY : smem.row_max[my_row[h]];
        const float m0 = fmaxf(previous, tile_max[h]);
        reference[h] = reference_of(m0);
        scale0[h] = exp2f(previous - reference[h]);
        __syncwarp();  // every lane of the quad has read row_max
        if (wg_thread % 4 == 0) {
          smem.row_max[my_row[h]] = m0;
          smem.scale0[my_row[h]] = scale0[h];
        }
      }
      named_barrier_arrive(kMax0Ready, kMathThreads);
      trace.mark(kTraceMaxShared, first);
      // P0 for A's own P0 V0_L, over stage 0's rope (dead once S0 is done); rewritten times
      // scale1 for B once that is done. (P0 as a register operand would keep 16 more
      // registers live beside S and O: the math warpgroups spilled.)
      float tile_sum[2];
      exponentiate(acc_s, reference, tile_sum);
      for (int h = 0; h < 2; ++h) row_sum[h] = row_sum[h] * scale0[h] + tile_sum[h];
      Tensor p0_out = thr_s.partition_C(p_buffer(0));
      const float unit[2] = {1.f, 1.f};
      store_probs<Element>(acc_s, unit, p0_out);
      rescale_output(acc_o, scale0);
      // P0 and any zeroed value rows (generic proxy) must be visible to the wgmmas (async).
      cutlass::arch::fence_view_async_shared();
      named_barrier_sync(kOwnP0Stored, 128);  // every warp's part of P0
      issue_values_shared_p(0);
      // B's scale1, then P0 scale1 for B once P0 V0_L is done with stage 0's first group.
      trace.mark(kTraceValuesDone, -1);  // P0 V0_L issued
      named_barrier_sync(kScale1Ready, kMathThreads);
      trace.mark(kTraceHandoffIn, first);
      float scale1[2];
      for (int h = 0; h < 2; ++h) scale1[h] = smem.scale1[my_row[h]];
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_o);
      warp_release(&smem.k_empty[0][0]);
      named_barrier_sync(kOwnP0Stored, 128);  // every warp's P0 V0_L has read P0
      store_probs<Element>(acc_s, scale1, p0_out);
      cutlass::arch::fence_view_async_shared();
      named_barrier_arrive(kP0Ready, kMathThreads);
      trace.mark(kTraceProbsShared, first);
      for (int h = 0; h < 2; ++h) row_sum[h] *= scale1[h];
      rescale_output(acc_o, scale1);
      if (has_second) {
        // O_L += P1 V1_L, P1 from B's buffer.
        named_barrier_sync(kP1Ready, kMathThreads);
        trace.mark(kTraceHandoffIn, first + 1);
        issue_values_shared_p(1);
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc_o);
        warp_release(&smem.k_empty[1][0]);
      }
      trace.mark(kTraceValuesDone, first);
    } else {
      // ---- B: tile `first + 1`, stage 1 (none in a segment's last pair of odd length) ----
      const int tile_begin = seg.token_begin + (first + 1) * kBlockN;
      float tile_max[2] = {-INFINITY, -INFINITY};
      if (has_second) {
        compute_scores(smem, 1, parity1, mma_s, frag_q, frag_k, acc_s, trace, first + 1);
        trace.mark(kTraceScoresDone, first + 1);
      }
      if (last_pair) warp_release(&smem.q_empty);
      if (has_second) {
        if (seg.token_end - tile_begin < kBlockN)
          zero_value_rows(s_k, seg.token_end - tile_begin, kBlockN, wg_thread);
        mask_and_max(acc_s, coord_s, smem.key_valid[1], tile_begin, key_limit, scale_log2,
                     tile_max);
      }
      named_barrier_sync(kMax0Ready, kMathThreads);
      trace.mark(kTraceHandoffIn, first);
      float reference[2], output_scale[2];
      for (int h = 0; h < 2; ++h) {
        const float m0 = smem.row_max[my_row[h]];
        const float scale0 = smem.scale0[my_row[h]];
        const float m1 = fmaxf(m0, tile_max[h]);
        reference[h] = reference_of(m1);
        const float scale1 = exp2f(m0 - reference[h]);
        running_max[h] = m1;
        output_scale[h] = scale0 * scale1;
        __syncwarp();  // every lane of the quad has read row_max
        if (wg_thread % 4 == 0) {
          smem.row_max[my_row[h]] = m1;
          smem.scale1[my_row[h]] = scale1;
        }
      }
      named_barrier_arrive(kScale1Ready, kMathThreads);
      trace.mark(kTraceMaxShared, first + 1);
      for (int h = 0; h < 2; ++h) row_sum[h] *= output_scale[h];
      rescale_output(acc_o, output_scale);
      if (has_second) {
        float tile_sum[2];
        exponentiate(acc_s, reference, tile_sum);
        for (int h = 0; h < 2; ++h) row_sum[h] += tile_sum[h];
        CUTE_UNROLL
        for (int i = 0; i < size(acc_s); ++i) p_regs(i) = static_cast<Element>(acc_s(i));
        Tensor p1_out = thr_s.partition_C(p_buffer(1));
        const float unit[2] = {1.f, 1.f};
        store_probs<Element>(p_regs, unit, p1_out);
        // P1 and any zeroed value rows, for A's wgmma (async proxy).
        cutlass::arch::fence_view_async_shared();
        named_barrier_arrive(kP1Ready, kMathThreads);
        trace.mark(kTraceProbsShared, first + 1);
        Tensor frag_v1 = thr_own.partition_fragment_B(value_half(1));
        warpgroup_fence_operand(p_regs);
        warpgroup_fence_operand(acc_o);
        issue_steps<0, kBlockN / 16>(mma_own, p_regs, frag_v1, acc_o);
        // Each batch waited for in the branch that issued it: ptxas serialized every wgmma
        // of the kernel (C7511/C7514) when a batch could be in flight across branches.
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc_o);
        warpgroup_fence_operand(p_regs);
        warp_release(&smem.k_empty[1][1]);
        trace.mark(kTraceValuesDone, first + 1);
      }
      // O_R += (P0 scale1) V0_R, P0 from A.
      named_barrier_sync(kP0Ready, kMathThreads);
      trace.mark(kTraceHandoffIn, first);
      issue_values_shared_p(0);
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_o);
      warp_release(&smem.k_empty[0][1]);
      trace.mark(kTraceValuesDone, first + 1);
    }
    phases.flip(0);
    if (has_second) phases.flip(1);
  }

  // Denominators: each warpgroup's quad partial sums, then the other warpgroup's.
  for (int h = 0; h < 2; ++h) {
    const float quad_total = quad_sum(row_sum[h]);
    if (wg_thread % 4 == 0) smem.row_sum[wg][my_row[h]] = quad_total;
  }
  named_barrier_sync(kMathBarrier, kMathThreads);
  RowResult result[2];
  for (int h = 0; h < 2; ++h) {
    const float total = smem.row_sum[0][my_row[h]] + smem.row_sum[1][my_row[h]];
    // A row that saw a key has a denominator of at least 1 (its max's own term).
    const bool saw_key = total > 0.f;
    result[h] = {saw_key, saw_key ? 1.f / total : 0.f,
                 (running_max[h] + log2f(total)) * kLn2};
  }
  trace.mark(kTraceRowsReady, num_tiles);
  const SegmentOutput output(p, seg, kv_head);
  if (wg == 1 && wg_thread % 4 == 0) {  // B holds the final running max
    for (int h = 0; h < 2; ++h) output.store_lse(p, row_base + my_row[h], result[h]);
  }
  RowDestination<Element> destination[2];
  for (int h = 0; h < 2; ++h) destination[h] = output.destination<Element>(p, row_base + my_row[h]);
  store_output_rows<Element>(acc_o, result, destination, seg.is_only_split, wg * kSplitColumn);
  trace.mark(kTraceSegmentEnd, num_tiles);
}

template <typename Element>
__device__ __forceinline__ void init_barriers(SharedStorage<Element>& smem, bool query_tma) {
  for (int s = 0; s < kStages; ++s) {
    for (int g = 0; g < kGroups; ++g) {
      ClusterBarrier::init(&smem.k_full[s][g], 1);  // the TMA warp's arrival with the bytes
      ClusterBarrier::init(&smem.k_empty[s][g], 4);  // the 4 warps of the group's last reader
    }
  }
  ClusterBarrier::init(&smem.q_full, query_tma ? 1 : kProducerThreads);
  ClusterBarrier::init(&smem.q_empty, kMathThreads / 32);
  cutlass::arch::fence_barrier_init();
}

template <typename Element>
__global__ void __launch_bounds__(kThreads, 1)
    split_kv_decode_seesaw_kernel(const __grid_constant__ DecodeParams params,
                                  const __grid_constant__ CUtensorMap k_map,
                                  const __grid_constant__ CUtensorMap q_map, bool query_tma) {
  extern __shared__ __align__(1024) unsigned char smem_bytes[];
  auto& smem = *reinterpret_cast<SharedStorage<Element>*>(smem_bytes);
  start_pipeline(k_map, true, q_map, query_tma, [&] { init_barriers(smem, query_tma); });

  const int32_t* piece =
      params.tile_scheduler_metadata + static_cast<int64_t>(blockIdx.x) * kMetadataInts;
  StagePhases phases;
  uint32_t q_phase = 0;
  WarpgroupTrace trace;
  const int kv_head = blockIdx.y;
  const int row_base = blockIdx.z * kBlockM;
  // Every role walks the same segments in the same order, so the stage phases agree.
  if (threadIdx.x < kProducerThreads) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegisters>();
    for_each_segment(params, piece, [&](const Segment& seg) {
      produce_segment<Element>(params, k_map, q_map, query_tma, seg, kv_head, row_base, smem,
                               phases, q_phase, trace);
    });
    cp_async_wait<0>();  // the cp.async query rows, if any, land before their threads exit
  } else {
    cutlass::arch::warpgroup_reg_alloc<kMathRegisters>();
    for_each_segment(params, piece, [&](const Segment& seg) {
      attend_segment<Element>(params, seg, kv_head, row_base, smem, phases, q_phase, trace);
    });
  }
  trace.publish();
}

template <typename Element>
cudaError_t launch_instance(const DecodeParams& params, const CUtensorMap& k_map,
                            const CUtensorMap& q_map, bool query_tma, dim3 grid,
                            cudaStream_t stream) {
  return launch_decode_kernel<split_kv_decode_seesaw_kernel<Element>,
                              sizeof(SharedStorage<Element>)>(grid, kThreads, stream, params,
                                                               k_map, q_map, query_tma);
}

}  // namespace

cudaError_t launch_split_kv_decode_seesaw(const DecodeParams& params, const CUtensorMap& k_map,
                                          const CUtensorMap& q_map, bool query_tma, dim3 grid,
                                          cudaStream_t stream) {
  if (params.head_dim != kHeadDim || params.head_dim_v != kHeadDimV)
    return cudaErrorInvalidValue;
  return params.dtype == ElementType::kBF16
             ? launch_instance<cutlass::bfloat16_t>(params, k_map, q_map, query_tma, grid, stream)
             : launch_instance<cutlass::half_t>(params, k_map, q_map, query_tma, grid, stream);
}

}  // namespace jax_flash_mla
