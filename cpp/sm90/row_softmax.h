// The online softmax of one query row over a segment's tiles, as every sm90 split-KV kernel
// keeps it: scores in the log2 domain (masked by key_masking.h), a running maximum shared by
// every thread holding the row, and each thread's own share of the denominator (summed across
// threads at the segment's end).
#pragma once

#include <cmath>

namespace jax_flash_mla {
namespace sm90 {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Which of a thread's two accumulator rows element i of a wgmma C fragment is on; a
// compile-time function of i, so per-row arrays stay in registers.
__host__ __device__ constexpr int row_half(int i) { return (i / 2) % 2; }

// 2^x for a tile's probabilities: the special-function unit's instruction alone, results under
// 2^-126 flushed to 0. exp2f keeps subnormal results, which costs three more instructions an
// element around it (a range test and two scalings); a probability under 2^-126 of its row's
// largest term (which is 1) changes no float32 row sum and no output.
__device__ __forceinline__ float exp2_flush_subnormal(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// The reference a tile's probabilities are measured from: the row's new running max, or 0
// while the row has seen no key (so that 2^(-inf - reference) is 0, not the NaN of
// -inf - -inf).
__device__ __forceinline__ float reference_of(float new_max) {
  return new_max == -INFINITY ? 0.f : new_max;
}

// A row's running max moved on to a tile whose largest score (over every thread of the row) is
// tile_max.
struct MaxStep {
  float max;        // the new running max
  float reference;  // what the tile's probabilities are measured from (reference_of(max))
  float rescale;    // takes what was measured from the old max (sums, output) to reference
};

__device__ __forceinline__ MaxStep step_running_max(float running_max, float tile_max) {
  const float new_max = fmaxf(running_max, tile_max);
  const float reference = reference_of(new_max);
  return {new_max, reference, exp2f(running_max - reference)};
}

// What a segment's row ends with: its weight for the output, its log-sum-exp (natural log) and
// its largest scaled score (sparse prefill's max_logits).
struct RowResult {
  bool saw_key;     // some key was visible to the row
  float inv_sum;    // 1 / denominator (0 when no key was seen)
  float lse;
  float max_logit;  // -inf when no key was seen; NaN when a score was (the running max skips
                    // NaN, the denominator does not)
};

// `max`: the row's final running max; `total`: its denominator, every thread's share added up.
__device__ __forceinline__ RowResult finish_row(bool saw_key, float max, float total) {
  return {saw_key, saw_key ? 1.f / total : 0.f, (max + log2f(total)) * kLn2,
          isnan(total) ? total : max * kLn2};
}

struct RowSoftmax {
  float max = -INFINITY;  // the largest score seen so far
  float sum = 0.f;        // this thread's probabilities so far, measured from `max`

  // Moves to a tile whose largest score (over every thread of the row) is tile_max. Returns
  // the reference the tile's probabilities are measured from; `rescale` takes the output
  // accumulated so far to it (the running sum is rescaled here).
  __device__ __forceinline__ float advance(float tile_max, float& rescale) {
    const MaxStep step = step_running_max(max, tile_max);
    rescale = step.rescale;
    max = step.max;
    sum *= rescale;
    return step.reference;
  }

  // `total`: the row's denominator, every thread's `sum` added up.
  __device__ __forceinline__ RowResult finish(float total) const {
    return finish_row(max != -INFINITY, max, total);
  }
};

}  // namespace sm90
}  // namespace jax_flash_mla
