// Which keys of a tile a query row sees, as every sm90 split-KV kernel applies it: the scores
// of keys hidden from a row (absent, or past the row's segment_key_limit of split_kv.h)
// become -inf, so that their probabilities are 0; and the value rows of keys past the segment
// that a TMA box read anyway are zeroed, because P = 0 times NaN is NaN (the math side's half
// of the producer's masking contract, key_tile_producer.h).
#pragma once

#include <cute/tensor.hpp>

#include <cmath>
#include <cstdint>

#include "../common/split_kv.h"
#include "pipeline_traits.h"

namespace jax_flash_mla {
namespace sm90 {

// A score of key `token` for one row, into the log2 domain (scale_log2: the softmax scale
// times log2 e), or -inf where the key is hidden from the row: a key is visible when it
// exists (in the segment, on a valid page) and is below the row's segment_key_limit.
// (The test and the select stay in one function: split into a bool predicate they compiled to
// inverted comparisons, and a walk over the fragment shared through lambdas reordered the
// kernels' code; each kernel walks its own fragment layout.)
__device__ __forceinline__ float masked_log2_score(float score, bool key_exists, int token,
                                                   int key_limit, float scale_log2) {
  const bool visible = key_exists && token < key_limit;
  return visible ? score * scale_log2 : -INFINITY;
}

// Zeroes the value columns of keys [first_key, end_key) of a landed tile, spread over the 128
// threads of one warpgroup (thread 0..127). Keys past the segment inside a valid TMA box hold
// whatever the cache holds, NaN included.
template <typename SmemTensor>
__device__ __forceinline__ void zero_value_rows(SmemTensor& s_k, int first_key, int end_key,
                                                int thread) {
  constexpr int chunks_per_row = kHeadDimV / kChunkElems;
  for (int c = first_key * chunks_per_row + thread; c < end_key * chunks_per_row; c += 128) {
    *reinterpret_cast<uint4*>(&s_k(c / chunks_per_row, c % chunks_per_row * kChunkElems)) =
        make_uint4(0, 0, 0, 0);
  }
}

}  // namespace sm90
}  // namespace jax_flash_mla
