// Split-KV MLA decode on Hopper tensor cores for more than 32 query rows per KV head, d = 576,
// keys and query rows gathered by TMA: the "seesaw" schedule, in which each math warpgroup's
// softmax runs while the other's wgmmas keep the tensor cores busy. (The 64-row kernel of
// split_kv_lockstep_kernel.cu runs its two math warpgroups in lockstep, so the ~1 760 cycles of
// score exchange and softmax a tile leave the tensor cores idle.)
//
// One CTA = (piece of the schedule, KV head, block of 64 query rows), 3 warpgroups: a producer
// (key pieces and query rows by TMA, issued by two warps, one a stage; 56 registers) and math
// warpgroups A and B (224). A owns output columns [0, 256) (O_L), B [256, 512) (O_R), 128
// float registers a thread each.
// Tiles come in pairs: tile 2j lands in stage 0 and is scored by A, tile 2j + 1 in stage 1,
// scored by B. Per pair, with m the running row max (log2 units) in shared memory and S0, S1
// already computed:
//   A: m0 = max(m, rowmax S0), scale0 = 2^(m - m0), P0 = 2^(S0 - m0),
//      O_L = O_L scale0 + P0 V0_L (P0 from registers)
//   B: m1 = max(m0, rowmax S1), scale1 = 2^(m0 - m1), P1 = 2^(S1 - m1),
//      O_R = O_R scale0 scale1 + P1 V1_R (P1 from registers) + (P0 scale1) V0_R
//   A: O_L = O_L scale1 + P1 V1_L, then the next pair's S0
//   B: the next pair's S1
// so B's softmax runs under A's P0 V0_L and A's next softmax under B's next S1. P0 scale1 goes
// to B over stage 0's rope columns (dead once S0 is done), P1 to A in a buffer of its own.
//
// Each stage's 576 columns are 9 pieces of 64, each with its own "full" mbarrier, so S starts
// on the first piece to land, and two refill groups with their own "empty" mbarrier, released
// by each group's last reader: pieces 0-3 (V_L) by A's P V, pieces 4-8 (V_R and the rope, P0's
// buffer in stage 0) by B's. The producer refills them in the order they free (stage 0's 0-3
// after P0 V0_L, stage 1's 4-8 after P1 V1_R, stage 0's 4-8 after P0 V0_R, stage 1's 0-3 after
// P1 V1_L); A's S starts with pieces 0-3, B's with 4-8.
//
// Where the row blocks pair (more than 64 query rows per KV head), the two CTAs of a pair run
// as a cluster and share each key tile by TMA multicast (KeySharing): so paired, the seesaw is
// faster than the lockstep kernel and is the default there. Alone (33-64 rows) it wins only
// where each CTA's share of keys is long, and is the default only there (seesaw_alone_pays,
// heuristics.h).
//
// A segment's output rows (or float32 partial) leave through shared memory: staged over both
// key stages once no key is read any more, then one bulk copy (TMA engine) a row; the producer
// holds the next segment's copies until the rows have been read out (outputs_stored).
// 4.7% faster at b=128 h_q=128 than each thread storing its fragments (measured on an H200).
//
// Masking as in the lockstep kernel (key_masking.h: which keys exist, here a 64-bit mask a
// tile, and a key limit per row); keys past the segment inside a valid TMA box are zeroed,
// value columns [0, 512), by the warpgroup that scored their tile, after its S and before any
// P V reads them.
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>

#include <cstdint>
#include <type_traits>

#include "../common/split_kv.h"
#include "instance_ladder.h"
#include "kernels.h"
#include "key_masking.h"
#include "key_tile_copies.h"
#include "key_tile_lookup.h"
#include "once_per_device.h"
#include "paged_kv_tensor_map.h"
#include "pipeline_sync.h"
#include "pipeline_traits.h"
#include "query_row_copies.h"
#include "query_tensor_map.h"
#include "row_softmax.h"
#include "segment_output.h"
#include "wgmma_ops.h"

namespace jax_flash_mla {
namespace {

using namespace cute;
using namespace sm90;

constexpr int kBlockM = kRowBlock;  // query rows per CTA: one wgmma M
constexpr int kHeadDim = 576;
constexpr int kMathWarpGroups = 2;
constexpr int kMathThreads = 128 * kMathWarpGroups;
constexpr int kThreads = kProducerThreads + kMathThreads;
// setmaxnreg: 128 (168 - p) >= 256 (m - 168), i.e. p + 2m <= 504. The producer only waits,
// looks up pages and issues copies; the math warpgroups hold O (128), S (32) and P (16).
constexpr uint32_t kProducerRegisters = 56;
constexpr uint32_t kMathRegisters = 224;

// A stage's column pieces: [0, kLeftPieces) hold V_L, the rest V_R and the rope.
constexpr int kPieceColumns = 64;
constexpr int kPieces = kHeadDim / kPieceColumns;
constexpr int kSplitColumn = kHeadDimV / kMathWarpGroups;
constexpr int kLeftPieces = kSplitColumn / kPieceColumns;
// A stage's two refill groups: pieces [0, kLeftPieces) (last read by A's P V) and the rest
// (last read by B's), each with its own "empty" mbarrier.
constexpr int kGroups = 2;
constexpr int kStepsPerPiece = kPieceColumns / 16;  // S's k-steps (16 columns) per piece

template <typename Element>
struct Layouts : RowBlockLayouts<Element, kHeadDim> {
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
  // Which keys of a tile exist (bit k: key k), per stage and pair parity: a tile's are
  // written while the previous pair's (same stage) may still be read.
  uint64_t key_mask[kStages][2];
  float row_max[kBlockM];  // the running max: m0 after A's step, m1 after B's
  float scale0[kBlockM];
  float scale1[kBlockM];
  float row_sum[kMathWarpGroups][kBlockM];  // each warpgroup's denominator, at the end
  uint64_t k_full[kStages][kPieces];
  uint64_t k_empty[kStages][kGroups];
  uint64_t q_full;
  uint64_t q_empty;
  // A segment's rows are staged over both key stages and stored from there by bulk copies;
  // this completes once the copies have read them (in both CTAs of a pair), and the producer
  // holds the next segment's copies until then.
  uint64_t outputs_stored;
};

static_assert(kStagedRowsBytes <= sizeof(SharedStorage<cutlass::bfloat16_t>::k),
              "the staged output rows fit over both key stages");

// The mbarrier parity of each stage, flipped by the producer after each use of the stage.
struct StagePhases {
  uint32_t bits = 0;
  __device__ uint32_t parity(int stage) const { return (bits >> stage) & 1u; }
  __device__ void flip(int stage) { bits ^= 1u << stage; }
};

// `ptr`, as a value the compiler must assume changes at each call: S's operand descriptors
// are loop-invariant, and hoisted out of the pair loop they held 36 k-steps x 2 x 64 bits
// live across it, and spilled.
template <typename T>
__device__ __forceinline__ T* opaque(T* ptr) {
  asm volatile("" : "+l"(ptr));
  return ptr;
}

template <typename Element>
__device__ __forceinline__ Element* p0_buffer(SharedStorage<Element>& smem) {
  return smem.k[0] + kBlockN * kHeadDimV;  // stage 0's rope block: 64 x 64, the size of P
}

__device__ __forceinline__ int key_mask_slot(int tile) { return (tile / kStages) % 2; }

// The loading warp's lookups as a 64-bit mask for the math warpgroups, written before (and
// released by) the warp's first arrival on the tile's pieces. One 8-byte load a thread then
// replaces 32 byte loads in the mask step.
__device__ __forceinline__ void publish_key_mask(const TmaTileLookup& lookup, uint64_t* mask) {
  static_assert(kBlockN == 64, "two keys a lane");
  const uint32_t low = __ballot_sync(0xffffffffu, lookup.key_valid[0]);
  const uint32_t high = __ballot_sync(0xffffffffu, lookup.key_valid[1]);
  if (threadIdx.x % 32 == 0) *mask = (static_cast<uint64_t>(high) << 32) | low;
  __syncwarp();
}

// Key (column) of element i of a thread's m64n64 C fragment, less the thread's first key
// ((thread % 4) * 2): pairs of adjacent keys, 8 apart (the layout row_half describes).
__host__ __device__ constexpr int key_offset(int i) { return i % 2 + 8 * (i / 4); }

// With more than 64 query rows per KV head, row blocks 2i and 2i + 1 of a (schedule piece, KV
// head) read the same key tiles. kPaired: they run as a cluster of two CTAs, and each CTA's
// producer issues every other piece of each group with TMA multicast to both, so that each
// SM's copy engine issues half the boxes and L2 serves each key once for the pair. Every CTA's
// producer still expects all of a piece's bytes on its own "full" barrier, and a group refills
// only once both CTAs' readers have released it: each releasing warp arrives on the "empty"
// barrier of both CTAs.
template <bool kPaired>
struct KeySharing {
  static constexpr int kCtas = kPaired ? 2 : 1;
  static constexpr uint16_t kMulticastMask = kPaired ? 0b11 : 0;
  uint32_t rank = 0;  // this CTA's rank in its cluster

  __device__ KeySharing() {
    if constexpr (kPaired) rank = cute::block_rank_in_cluster();
  }
  // This CTA copies `piece` (for both CTAs when paired).
  __device__ bool issues(int piece) const {
    return !kPaired || piece % 2 == static_cast<int>(rank);
  }
  // Once per warp, after the warp's own wgmmas on the group have completed.
  __device__ void release(uint64_t* empty) const {
    if constexpr (kPaired) {
      __syncwarp();
      const uint32_t lane = threadIdx.x % 32;
      if (lane < 2) ClusterBarrier::arrive(empty, rank ^ lane, 1u);  // lane 0 here, 1 the peer
    } else {
      warp_release(empty);
    }
  }
};

// An issuing producer warp: group `group` of a tile (its lookup made ahead) into `stage`, once
// the group's last reader has released it; each piece completes on its own barrier. With
// `publish`, the tile's key mask first (released by the first piece's arrival).
template <typename Element, bool kPaired>
__device__ __forceinline__ void load_group(const DecodeParams& p, const CUtensorMap& k_map,
                                           const TmaTileLookup& lookup, int kv_head, int tile,
                                           int stage, int group, uint32_t parity, bool publish,
                                           const KeySharing<kPaired>& sharing,
                                           SharedStorage<Element>& smem,
                                           WarpgroupTrace& trace) {
  using L = Layouts<Element>;
  Barrier::wait(&smem.k_empty[stage][group], parity ^ 1);
  trace.mark(kTraceStageFree, tile);
  if (publish) publish_key_mask(lookup, &smem.key_mask[stage][key_mask_slot(tile)]);
  Tensor s_k = make_tensor(make_smem_ptr(smem.k[stage]), typename L::K{});
  const int first = group == 0 ? 0 : kLeftPieces;
  const int end = group == 0 ? kLeftPieces : kPieces;
#pragma unroll 1
  for (int piece = first; piece < end; ++piece)
    load_piece_tma<Element>(p, k_map, lookup, kv_head, piece * kPieceColumns,
                            &smem.k_full[stage][piece], s_k, sharing.issues(piece),
                            sharing.kMulticastMask);
  trace.mark(kTraceKeysIssued, tile);
}

// The producer: warp s issues the tiles of stage s (both math warpgroups' refills would
// otherwise queue behind each other in one warp). Per pair, its tile's lookup from block-table
// entries fetched a pair earlier (under the key traffic an entry can take an HBM round trip),
// then each group as it frees: stage 0's [0, 4) (A's P0 V0_L) then [4, 9) (B's P0 V0_R);
// stage 1's [4, 9) (B's P1 V1_R) then [0, 4) (A's P1 V1_L). The first pair's first group of
// stage 0 goes before the query rows (warp 0), whose buffer frees only after the previous
// segment's last scores. (Issuing the copies from the math warpgroups themselves, at each
// release, cost the issuing warpgroup 1 300-1 500 cycles a refill: a TMA issue waits while
// earlier boxes drain.)
template <typename Element, bool kPaired>
__device__ void produce_segment(const DecodeParams& p, const CUtensorMap& k_map,
                                const CUtensorMap& q_map, const Segment& seg, int kv_head,
                                int row_base, const KeySharing<kPaired>& sharing,
                                SharedStorage<Element>& smem, StagePhases& phases,
                                uint32_t& q_phase, uint32_t& stored_phase, bool first_segment,
                                WarpgroupTrace& trace) {
  const int num_tiles = num_tiles_of(seg);
  const bool loads = num_tiles > 0 && threadIdx.x < 32 * kStages;
  const int stage = threadIdx.x / 32;
  // The query rows and the first tiles' block-table entries do not touch the key stages, so
  // they go before the hold below: the rows land, and the entries' round trip to memory is
  // over, while the previous segment's staged rows are read out (and at the kernel's start the
  // rows no longer wait behind the first key group's issue). The query buffer is free once
  // the previous segment's last S is done, which comes before its epilogue.
  if (num_tiles > 0 && threadIdx.x == 0)
    stage_query_rows<Element, kHeadDim, kBlockM>(p, q_map, true, seg, kv_head, row_base, smem,
                                                 q_phase, trace);
  // The next pair's entries (-1 past the segment, not read).
  TilePages pages;
  if (loads) pages = fetch_tile_pages(p, seg, tile_begin_of(seg, stage));
  // Held until the previous segment's rows, staged over the key stages, have been read out.
  if (!first_segment) {
    if (threadIdx.x < 32 * kStages) Barrier::wait(&smem.outputs_stored, stored_phase);
    stored_phase ^= 1;
  }
  if (!loads) return;
  const int early_group = stage == 0 ? 0 : 1;  // the group its stage's readers free first
  for (int first = 0; first < num_tiles; first += kStages) {
    const int tile = first + stage;
    if (tile >= num_tiles) break;
    const TmaTileLookup lookup =
        resolve_tile_lookup(p, seg, tile_begin_of(seg, tile), pages,
                            tokens_per_key_box<KeyTileOrder::kColumnBlocks>(p));
    pages = fetch_tile_pages(p, seg, tile_begin_of(seg, tile + kStages));
    load_group(p, k_map, lookup, kv_head, tile, stage, early_group, phases.parity(stage), true,
               sharing, smem, trace);
    load_group(p, k_map, lookup, kv_head, tile, stage, 1 - early_group, phases.parity(stage),
               false, sharing, smem, trace);
    phases.flip(stage);
  }
  q_phase ^= 1;
}

// S's pieces [kFirst, kEnd) of the tile in `stage`, each issued as its own batch as soon as
// it has landed; not waited for.
template <int kFirst, int kEnd, typename Element, typename TiledMma, typename FragQ,
          typename FragK, typename FragS>
__device__ __forceinline__ void issue_score_pieces(SharedStorage<Element>& smem, int stage,
                                                   uint32_t parity, TiledMma& mma,
                                                   const FragQ& frag_q, const FragK& frag_k,
                                                   FragS& acc_s) {
  CUTE_UNROLL
  for (int piece = kFirst; piece < kEnd; ++piece) {
    Barrier::wait(&smem.k_full[stage][piece], parity);
    warpgroup_arrive();
    CUTE_UNROLL
    for (int k = piece * kStepsPerPiece; k < (piece + 1) * kStepsPerPiece; ++k) {
      cute::gemm(mma, frag_q(_, _, k), frag_k(_, _, k), acc_s);
      mma.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
  }
}

// Masks S (to -inf where a key is absent or out of the row's reach), scales it into the log2
// domain and returns the row maxima of this thread's two rows over the quad (the whole row).
// A tile both rows see whole skips the per-key tests: this step is on the pair's critical path
// (A's max gates B's softmax), and skipping them took 4-8% off the h_q = 128 rows.
template <typename FragS>
__device__ __forceinline__ void mask_and_max(FragS& acc_s, uint64_t key_mask, int tile_begin,
                                             const int (&key_limit)[2], float scale_log2,
                                             float (&tile_max)[2]) {
  tile_max[0] = tile_max[1] = -INFINITY;
  if (key_mask == ~uint64_t{0} && tile_begin + kBlockN <= min(key_limit[0], key_limit[1])) {
    // Both rows see every key of the tile (all but a segment's edges): no per-key tests.
    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) {
      const float s = acc_s(i) * scale_log2;
      acc_s(i) = s;
      tile_max[row_half(i)] = fmaxf(tile_max[row_half(i)], s);
    }
  } else {
    const int first_key = threadIdx.x % 4 * 2;
    const uint64_t mine = key_mask >> first_key;
    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) {
      const int half = row_half(i);
      const int key = first_key + key_offset(i);
      const float s = masked_log2_score(acc_s(i), mine >> key_offset(i) & 1, tile_begin + key,
                                        key_limit[half], scale_log2);
      acc_s(i) = s;
      tile_max[half] = fmaxf(tile_max[half], s);
    }
  }
  for (int h = 0; h < 2; ++h) tile_max[h] = quad_max(tile_max[h]);
}

// P = 2^(S - reference) in place; returns each row half's sum of this thread's P.
template <typename FragS>
__device__ __forceinline__ void exponentiate(FragS& acc_s, const float (&reference)[2],
                                             float (&sum)[2]) {
  sum[0] = sum[1] = 0.f;
  CUTE_UNROLL
  for (int i = 0; i < size(acc_s); ++i) {
    const float prob = exp2_flush_subnormal(acc_s(i) - reference[row_half(i)]);
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

template <typename Element, bool kPaired>
__device__ __forceinline__ void attend_segment(const DecodeParams& p, const Segment& seg,
                                               int kv_head, int row_base,
                                               const KeySharing<kPaired>& sharing,
                                               SharedStorage<Element>& smem, uint32_t& phase,
                                               uint32_t& q_phase, WarpgroupTrace& trace) {
  using L = Layouts<Element>;
  const int wg = (threadIdx.x - kProducerThreads) / 128;  // 0: A, 1: B
  const int wg_thread = threadIdx.x % 128;
  const int stage = wg;  // the stage of the tiles this warpgroup scores
  const int num_tiles = num_tiles_of(seg);
  // Every warp of this warpgroup is done with a group of a stage (its wgmmas waited for).
  const auto release = [&](int s, int group) { sharing.release(&smem.k_empty[s][group]); };

  // The previous segment's row sums may still be read by the other warpgroup.
  named_barrier_sync(NamedBarrier::kSeesawMath, kMathThreads);
  trace.mark(kTraceSegmentBegin, num_tiles);

  typename L::MmaS mma_s;
  typename L::MmaOwnP mma_own;
  typename L::MmaSharedP mma_shared;
  auto thr_s = mma_s.get_thread_slice(wg_thread);
  auto thr_own = mma_own.get_thread_slice(wg_thread);
  auto thr_shared = mma_shared.get_thread_slice(wg_thread);

  Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
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
  const auto p_buffer = [&](int which) {
    return make_tensor(make_smem_ptr(opaque(which == 0 ? p0_buffer(smem) : smem.p1)),
                       typename L::P{});
  };
  // O half += P V half with the P of stage `s`'s tile from its buffer; not waited for.
  const auto issue_values_shared_p = [&](int s) {
    Tensor frag_p = thr_shared.partition_fragment_A(p_buffer(s));
    Tensor frag_v = thr_shared.partition_fragment_B(value_half(s));
    warpgroup_fence_operand(acc_o);
    issue_steps<0, kBlockN / 16>(mma_shared, frag_p, frag_v, acc_o);
  };
  // S = Q K^T of the tile in this warpgroup's stage, waited for: A's pieces 0-3 first (its
  // stage's first refill group), B's 4-8 first.
  const auto score_fragments = [&] {
    Tensor s_q = make_tensor(make_smem_ptr(opaque(smem.q)), typename L::Q{});
    Tensor s_k = make_tensor(make_smem_ptr(opaque(smem.k[stage])), typename L::K{});
    return cute::make_tuple(thr_s.partition_fragment_A(s_q), thr_s.partition_fragment_B(s_k));
  };
  const auto score_whole_tile = [&](int tile) __attribute__((always_inline)) {
    auto [frag_q, frag_k] = score_fragments();
    warpgroup_fence_operand(acc_s);
    mma_s.accumulate_ = GMMA::ScaleOut::Zero;
    // Each batch waited for in the branch that issued it (C7511/C7514 otherwise).
    if (wg == 0) {
      issue_score_pieces<0, kPieces>(smem, 0, phase, mma_s, frag_q, frag_k, acc_s);
      trace.mark(kTraceGroupLanded, tile);
      warpgroup_wait<0>();
    } else {
      issue_score_pieces<kLeftPieces, kPieces>(smem, 1, phase, mma_s, frag_q, frag_k, acc_s);
      trace.mark(kTraceGroupLanded, tile);
      issue_score_pieces<0, kLeftPieces>(smem, 1, phase, mma_s, frag_q, frag_k, acc_s);
      trace.mark(kTraceGroupLanded, tile);
      warpgroup_wait<0>();
    }
    warpgroup_fence_operand(acc_s);
    phase ^= 1;
    trace.mark(kTraceScoresDone, tile);
  };

  const int my_row[2] = {(wg_thread / 32) * 16 + (wg_thread % 32) / 4,
                         (wg_thread / 32) * 16 + (wg_thread % 32) / 4 + 8};
  const int seqlen = clamped_seqlen(p, seg.batch_idx);
  int key_limit[2];
  for (int h = 0; h < 2; ++h)
    key_limit[h] = segment_key_limit(p, seg, seqlen, row_base + my_row[h]);
  const float scale_log2 = p.softmax_scale * kLog2e;
  float row_sum[2] = {0.f, 0.f};  // this thread's share, measured from the running max
  float running_max[2] = {-INFINITY, -INFINITY};  // B's m1 after each pair (B only)

  if (num_tiles > 0) {
    Barrier::wait(&smem.q_full, q_phase);
    q_phase ^= 1;
    trace.mark(kTraceQueryLanded, -1);
    if (stage < num_tiles) score_whole_tile(stage);
  }

  // One pair of tiles (first, first + 1); kHasNext: the segment goes on after it (so both
  // tiles exist, and this pair scores the next); kHasSecond: tile first + 1
  // exists. Compile-time, so that every wgmma batch is waited for in the code that issued it
  // (ptxas serialized every wgmma of the kernel otherwise, C7511/C7514).
  const auto attend_pair = [&](int first, auto has_next,
                               auto has_second) __attribute__((always_inline)) {
    constexpr bool kHasNext = decltype(has_next)::value;
    constexpr bool kHasSecond = decltype(has_second)::value;
    const bool next_has_second = first + 3 < num_tiles;
    // The segment's last pair: every S is done (each tile's S runs a pair ahead).
    if constexpr (!kHasNext) warp_release(&smem.q_empty);
    if (wg == 0) {
      // ---- A: tile `first`, stage 0 ----
      const int tile_begin = tile_begin_of(seg, first);
      Tensor s_k0 = make_tensor(make_smem_ptr(smem.k[0]), typename L::K{});
      if (seg.token_end - tile_begin < kBlockN)
        zero_value_rows(s_k0, seg.token_end - tile_begin, kBlockN, wg_thread);
      float tile_max[2];
      mask_and_max(acc_s, smem.key_mask[0][key_mask_slot(first)], tile_begin, key_limit,
                   scale_log2, tile_max);
      float reference[2], scale0[2];
      for (int h = 0; h < 2; ++h) {
        const float previous = first == 0 ? -INFINITY : smem.row_max[my_row[h]];
        const MaxStep m0 = step_running_max(previous, tile_max[h]);
        reference[h] = m0.reference;
        scale0[h] = m0.rescale;
        __syncwarp();  // every lane of the quad has read row_max
        if (wg_thread % 4 == 0) {
          smem.row_max[my_row[h]] = m0.max;
          smem.scale0[my_row[h]] = scale0[h];
        }
      }
      named_barrier_arrive(NamedBarrier::kMax0Ready, kMathThreads);
      trace.mark(kTraceMaxShared, first);
      float tile_sum[2];
      exponentiate(acc_s, reference, tile_sum);
      for (int h = 0; h < 2; ++h) row_sum[h] = row_sum[h] * scale0[h] + tile_sum[h];
      CUTE_UNROLL
      for (int i = 0; i < size(acc_s); ++i) p_regs(i) = static_cast<Element>(acc_s(i));
      rescale_output(acc_o, scale0);
      // Zeroed value rows (generic proxy) must be visible to the wgmmas (async proxy).
      cutlass::arch::fence_view_async_shared();
      {  // O_L += P0 V0_L, P0 from registers; then V0_L's pieces are free.
        Tensor frag_v0 = thr_own.partition_fragment_B(value_half(0));
        warpgroup_fence_operand(p_regs);
        warpgroup_fence_operand(acc_o);
        issue_steps<0, kBlockN / 16>(mma_own, p_regs, frag_v0, acc_o);
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc_o);
        warpgroup_fence_operand(p_regs);
      }
      release(0, 0);
      trace.mark(kTraceValuesDone, first);
      // P0 scale1 for B over stage 0's rope.
      named_barrier_sync(NamedBarrier::kScale1Ready, kMathThreads);
      trace.mark(kTraceHandoffIn, first);
      float scale1[2];
      for (int h = 0; h < 2; ++h) scale1[h] = smem.scale1[my_row[h]];
      Tensor p0_out = thr_s.partition_C(p_buffer(0));
      store_probs<Element>(acc_s, scale1, p0_out);
      cutlass::arch::fence_view_async_shared();
      named_barrier_arrive(NamedBarrier::kP0Ready, kMathThreads);
      trace.mark(kTraceProbsShared, first);
      for (int h = 0; h < 2; ++h) row_sum[h] *= scale1[h];
      rescale_output(acc_o, scale1);
      if constexpr (kHasSecond) {  // O_L += P1 V1_L, P1 from B's buffer
        named_barrier_sync(NamedBarrier::kP1Ready, kMathThreads);
        trace.mark(kTraceHandoffIn, first + 1);
        issue_values_shared_p(1);
      }
      if constexpr (kHasNext) {
        // The next S0 under P1 V1_L: pieces 0-3 (released above), then, once P1 V1_L is done
        // with stage 1's pieces 0-3 (released), pieces 4-8 (released by B's P0 V0_R).
        auto [frag_q, frag_k] = score_fragments();
        warpgroup_fence_operand(acc_s);
        mma_s.accumulate_ = GMMA::ScaleOut::Zero;
        issue_score_pieces<0, kLeftPieces>(smem, 0, phase, mma_s, frag_q, frag_k, acc_s);
        trace.mark(kTraceGroupLanded, first + 2);
        warpgroup_wait<kLeftPieces>();
        warpgroup_fence_operand(acc_o);
        release(1, 0);
        trace.mark(kTraceValuesDone, first + 1);
        issue_score_pieces<kLeftPieces, kPieces>(smem, 0, phase, mma_s, frag_q, frag_k, acc_s);
        trace.mark(kTraceGroupLanded, first + 2);
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc_s);
        phase ^= 1;
        trace.mark(kTraceScoresDone, first + 2);
      } else {
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc_o);
        if constexpr (kHasSecond) release(1, 0);
        trace.mark(kTraceValuesDone, first + 1);
      }
    } else {
      // ---- B: tile `first + 1`, stage 1 ----
      const int tile_begin = tile_begin_of(seg, first + 1);
      float tile_max[2] = {-INFINITY, -INFINITY};
      if constexpr (kHasSecond) {
        Tensor s_k1 = make_tensor(make_smem_ptr(smem.k[1]), typename L::K{});
        if (seg.token_end - tile_begin < kBlockN)
          zero_value_rows(s_k1, seg.token_end - tile_begin, kBlockN, wg_thread);
        mask_and_max(acc_s, smem.key_mask[1][key_mask_slot(first + 1)], tile_begin, key_limit,
                     scale_log2, tile_max);
      }
      named_barrier_sync(NamedBarrier::kMax0Ready, kMathThreads);
      trace.mark(kTraceHandoffIn, first);
      float reference[2], output_scale[2];
      for (int h = 0; h < 2; ++h) {
        const float m0 = smem.row_max[my_row[h]];
        const float scale0 = smem.scale0[my_row[h]];
        const MaxStep m1 = step_running_max(m0, tile_max[h]);
        reference[h] = m1.reference;
        const float scale1 = m1.rescale;
        running_max[h] = m1.max;
        output_scale[h] = scale0 * scale1;
        __syncwarp();  // every lane of the quad has read row_max
        if (wg_thread % 4 == 0) {
          smem.row_max[my_row[h]] = m1.max;
          smem.scale1[my_row[h]] = scale1;
        }
      }
      named_barrier_arrive(NamedBarrier::kScale1Ready, kMathThreads);
      trace.mark(kTraceMaxShared, first + 1);
      for (int h = 0; h < 2; ++h) row_sum[h] *= output_scale[h];
      rescale_output(acc_o, output_scale);
      if constexpr (kHasSecond) {
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
        trace.mark(kTraceProbsShared, first + 1);
        Tensor frag_v1 = thr_own.partition_fragment_B(value_half(1));
        warpgroup_fence_operand(p_regs);
        warpgroup_fence_operand(acc_o);
        issue_steps<0, kBlockN / 16>(mma_own, p_regs, frag_v1, acc_o);
      }
      // O_R += (P0 scale1) V0_R, P0 from A.
      named_barrier_sync(NamedBarrier::kP0Ready, kMathThreads);
      trace.mark(kTraceHandoffIn, first);
      issue_values_shared_p(0);
      if constexpr (kHasSecond) named_barrier_arrive(NamedBarrier::kP1Ready, kMathThreads);
      if constexpr (kHasNext) {
        // P1 V1_R done: stage 1's pieces 4-8 are free; P0 V0_R done: stage 0's pieces 4-8
        // (P0's buffer included).
        warpgroup_wait<1>();
        release(1, 1);
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc_o);
        warpgroup_fence_operand(p_regs);
        release(0, 1);
        trace.mark(kTraceValuesDone, first + 1);
        if (next_has_second) score_whole_tile(first + 3);
      } else {
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc_o);
        warpgroup_fence_operand(p_regs);
        if constexpr (kHasSecond) release(1, 1);
        release(0, 1);
        trace.mark(kTraceValuesDone, first + 1);
      }
    }
  };

  int first = 0;
#pragma unroll 1
  for (; first + kStages < num_tiles; first += kStages)
    attend_pair(first, std::true_type{}, std::true_type{});
  if (first + 1 < num_tiles)
    attend_pair(first, std::false_type{}, std::true_type{});
  else if (first < num_tiles)
    attend_pair(first, std::false_type{}, std::false_type{});

  // Denominators: each warpgroup's quad partial sums, then the other warpgroup's.
  for (int h = 0; h < 2; ++h) {
    const float quad_total = quad_sum(row_sum[h]);
    if (wg_thread % 4 == 0) smem.row_sum[wg][my_row[h]] = quad_total;
  }
  named_barrier_sync(NamedBarrier::kSeesawMath, kMathThreads);
  RowResult result[2];
  for (int h = 0; h < 2; ++h) {
    const float total = smem.row_sum[0][my_row[h]] + smem.row_sum[1][my_row[h]];
    // A row that saw a key has a denominator of at least 1 (its max's own term); A keeps no
    // running max, so the denominator says it.
    result[h] = finish_row(total > 0.f, running_max[h], total);
  }
  trace.mark(kTraceRowsReady, num_tiles);
  const SegmentOutput output(p, seg, kv_head);
  if (wg == 1 && wg_thread % 4 == 0) {  // B holds the final running max
    for (int h = 0; h < 2; ++h) output.store_lse(p, row_base + my_row[h], result[h]);
  }
  // The rows through shared memory: every math thread writes its scaled fragment into rows
  // over both key stages (no key is read any more, and the producer holds the next segment's
  // copies), then the first kStoringWarps warps store one row each by a bulk copy (the TMA
  // engine, asynchronous), in place of 32 16-byte stores a thread, 8 rows each (the
  // mid-kernel epilogue took 11 400-14 700 cycles that way). FlashMLA stages its output over
  // its key buffers too.
  void* staging = smem.k[0];
  stage_output_rows<Element>(acc_o, result, my_row, seg.is_only_split, wg * kSplitColumn,
                             staging);
  cutlass::arch::fence_view_async_shared();  // the staged rows, for the bulk copies
  named_barrier_sync(NamedBarrier::kSeesawMath, kMathThreads);
  if (threadIdx.x < kProducerThreads + kStoringWarps * 32) {
    store_staged_row<Element>(p, output, row_base, threadIdx.x - kProducerThreads,
                              seg.is_only_split, staging);
    sharing.release(&smem.outputs_stored);  // read out: the key stages may be refilled
  }
  trace.mark(kTraceSegmentEnd, num_tiles);
}

template <typename Element, bool kPaired>
__device__ __forceinline__ void init_barriers(SharedStorage<Element>& smem) {
  for (int s = 0; s < kStages; ++s) {
    // One arrival each (the loading warp's lane 0, with the piece's bytes).
    for (int piece = 0; piece < kPieces; ++piece) ClusterBarrier::init(&smem.k_full[s][piece], 1);
  }
  for (int s = 0; s < kStages; ++s) {
    // The 4 warps of the group's last reader, in each CTA that reads the keys.
    for (int g = 0; g < kGroups; ++g)
      ClusterBarrier::init(&smem.k_empty[s][g], 4 * KeySharing<kPaired>::kCtas);
  }
  ClusterBarrier::init(&smem.q_full, 1);
  ClusterBarrier::init(&smem.q_empty, kMathThreads / 32);
  ClusterBarrier::init(&smem.outputs_stored, kStoringWarps * KeySharing<kPaired>::kCtas);
  cutlass::arch::fence_barrier_init();
}

template <typename Element, bool kPaired>
__global__ void __launch_bounds__(kThreads, 1)
    split_kv_seesaw_kernel(const __grid_constant__ DecodeParams params,
                                  const __grid_constant__ CUtensorMap k_map,
                                  const __grid_constant__ CUtensorMap q_map) {
  extern __shared__ __align__(1024) unsigned char smem_bytes[];
  auto& smem = *reinterpret_cast<SharedStorage<Element>*>(smem_bytes);
  start_pipeline(k_map, true, q_map, true, [&] { init_barriers<Element, kPaired>(smem); });
  // Both CTAs of a pair, before the first copy: the peer's multicast and arrivals must find
  // this CTA's barriers initialized.
  if constexpr (kPaired) cluster_arrive_and_wait();

  const int32_t* piece =
      params.tile_scheduler_metadata + static_cast<int64_t>(blockIdx.x) * kMetadataInts;
  uint32_t q_phase = 0;
  WarpgroupTrace trace;
  const int kv_head = blockIdx.y;
  const int row_base = blockIdx.z * kBlockM;
  const KeySharing<kPaired> sharing;
  // Every role walks the same segments in the same order (both CTAs of a pair too: they share
  // blockIdx.x, so the schedule piece), so the phases agree.
  if (threadIdx.x < kProducerThreads) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegisters>();
    StagePhases phases;
    uint32_t stored_phase = 0;
    bool first_segment = true;
    for_each_segment(params, piece, [&](const Segment& seg) __attribute__((always_inline)) {
      produce_segment<Element>(params, k_map, q_map, seg, kv_head, row_base, sharing, smem,
                               phases, q_phase, stored_phase, first_segment, trace);
      first_segment = false;
    });
  } else {
    cutlass::arch::warpgroup_reg_alloc<kMathRegisters>();
    uint32_t phase = 0;  // of this warpgroup's stage's "full" barriers
    // Inlined (as are attend_segment and its lambdas): a wgmma pipeline crossing a call made
    // ptxas serialize every wgmma (C7510), and a call passed the accumulators on the stack.
    for_each_segment(params, piece, [&](const Segment& seg) __attribute__((always_inline)) {
      attend_segment<Element>(params, seg, kv_head, row_base, sharing, smem, phase, q_phase,
                              trace);
    });
  }
  trace.publish();
  // And before exit: no copy or arrival of the peer's may still be on its way to this CTA's
  // shared memory.
  if constexpr (kPaired) cluster_arrive_and_wait();
}

template <typename Element, bool kPaired>
constexpr auto kSeesawKernel = split_kv_seesaw_kernel<Element, kPaired>;

}  // namespace

int seesaw_resident_pairs() {
  // The bf16 kernel stands for both element types: same shared memory, same threads.
  return once_per_device([] {
    return max_active_clusters<kSeesawKernel<cutlass::bfloat16_t, true>,
                               sizeof(SharedStorage<cutlass::bfloat16_t>)>(kThreads,
                                                                           dim3(1, 1, 2));
  });
}

cudaError_t launch_split_kv_seesaw(const DecodeParams& params, const SplitKvMaps& maps,
                                   bool paired, cudaStream_t stream) {
  const dim3 grid(params.num_sm_parts, params.num_heads_k,
                  static_cast<unsigned>(row_blocks_per_kv_head(params.rows_per_kv)));
  return with_element_type(params.dtype, [&](auto element) {
    using Element = decltype(element);
    constexpr size_t kSmemBytes = sizeof(SharedStorage<Element>);
    if (paired)
      return launch_decode_kernel_in_clusters<kSeesawKernel<Element, true>, kSmemBytes>(
          grid, dim3(1, 1, 2), kThreads, stream, params, maps.keys, maps.query);
    return launch_decode_kernel<kSeesawKernel<Element, false>, kSmemBytes>(
        grid, kThreads, stream, params, maps.keys, maps.query);
  });
}

}  // namespace jax_flash_mla
