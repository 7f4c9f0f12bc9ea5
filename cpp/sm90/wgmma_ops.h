// Chains of wgmma issued by one warpgroup: C (+)= A B over a run of k-steps (16 columns of the
// reduction dimension each). The k-step bounds are compile-time so that a chain unrolls (a
// run-time trip count made ptxas serialize it, warning C7515).
#pragma once

#include <cute/tensor.hpp>

namespace jax_flash_mla {
namespace sm90 {

using namespace cute;

// k-steps [kFirst, kEnd) of a chain, issued and committed as one batch; not waited for. C
// accumulates onto itself unless mma.accumulate_ says otherwise for the first step.
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

// C = A B over k-steps [kFirst, kEnd) of the operands only (a part of the reduction
// dimension), waited for.
template <int kFirst, int kEnd, typename TiledMma, typename FragA, typename FragB, typename FragC>
__device__ __forceinline__ void warpgroup_gemm_steps(TiledMma& mma, const FragA& a,
                                                     const FragB& b, FragC& c) {
  warpgroup_fence_operand(c);
  mma.accumulate_ = GMMA::ScaleOut::Zero;
  issue_steps<kFirst, kEnd>(mma, a, b, c);
  warpgroup_wait<0>();
  warpgroup_fence_operand(c);
}

// C (+)= A B over every k-step, waited for.
template <bool kZeroInit, typename TiledMma, typename FragA, typename FragB, typename FragC>
__device__ __forceinline__ void warpgroup_gemm(TiledMma& mma, const FragA& a, const FragB& b,
                                               FragC& c) {
  warpgroup_fence_operand(c);
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  issue_steps<0, decltype(size<2>(a))::value>(mma, a, b, c);
  warpgroup_wait<0>();
  warpgroup_fence_operand(c);
}

}  // namespace sm90
}  // namespace jax_flash_mla
