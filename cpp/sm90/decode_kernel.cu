// Split-KV MLA decode, first version: CUDA cores and shared memory, no tensor cores yet.
//
// Grid (num_sm_parts, num_heads_k, ceil(rows_per_kv / kRowsPerCta)): one CTA per (piece of the
// schedule, KV head, group of kRowsPerCta query rows). The CTA walks its piece's requests in
// order. For each (piece, request) segment it stages its query rows once, then the segment's
// keys kTileTokens at a time, and runs an online softmax, so any segment length fits in a
// fixed amount of shared memory.
//
// 256 threads = kRowGroups x 64. A thread always serves the same kRowsPerThread rows (its row
// group), which lets the score and P@V steps share the row-dependent state:
//   - score step: one token of the tile per thread, kRowsPerThread dot products over head_dim;
//   - P@V step: 8 of the 512 output columns per thread, a 4 x 8 float accumulator in registers;
//   - softmax step: each warp owns kRowsPerWarp whole rows (64 scores = 2 per lane), so row
//     statistics need only warp shuffles.
//
// Keys that must not be read (past the segment, or on an invalid page: their block-table entry
// or their data may be garbage or NaN) are never loaded. Their shared-memory rows are
// zero-filled and their scores are -inf, so neither exp() nor 0 * NaN can let them in.
// Keys hidden only by the causal limit are real data: they are loaded and their scores masked.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../common/split_kv.h"
#include "kernels.h"

namespace jax_flash_mla {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerCta = 16;
constexpr int kTileTokens = 64;
constexpr int kMaxHeadDim = 576;
constexpr int kHeadDimV = 512;
constexpr int kVecElems = 8;  // 2-byte elements per 16-byte vector access
constexpr int kRowsPerThread = 4;
constexpr int kRowGroups = kRowsPerCta / kRowsPerThread;
constexpr int kColumnSlices = kHeadDimV / kVecElems;
constexpr int kRowsPerWarp = kRowsPerCta / kWarps;
// One extra vector per staged key row makes the row pitch an odd number of 16-byte units, so
// the 8 lanes of a 128-bit shared load phase (consecutive tokens, same column) hit 8 distinct
// bank groups in the score step.
constexpr int kKvPitch = kMaxHeadDim + kVecElems;

static_assert(kThreads == kTileTokens * kRowGroups, "score step: one token per thread and group");
static_assert(kThreads == kColumnSlices * kRowGroups, "P@V step: one column slice per thread");
static_assert(kTileTokens == 64, "softmax step: two scores per lane");
static_assert(kRowsPerCta == kWarps * kRowsPerWarp, "softmax step: whole rows per warp");

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename Element>
struct SharedStorage {
  alignas(16) Element q[kRowsPerCta * kMaxHeadDim];
  alignas(16) Element kv[kTileTokens * kKvPitch];
  float p[kRowsPerCta][kTileTokens];  // log2-domain scores, then unnormalized probabilities
  int64_t token_offset[kTileTokens];  // k_cache element offset of each tile token, -1: masked
  float row_rescale[kRowsPerCta];     // exp2(old max - new max) of the current tile
  float row_inv_sum[kRowsPerCta];     // 1 / softmax denominator, 0 for a row that saw no key
};

template <typename Element>
__device__ __forceinline__ void unpack(uint4 packed, float (&f)[kVecElems]) {
  const Element* e = reinterpret_cast<const Element*>(&packed);
#pragma unroll
  for (int i = 0; i < kVecElems; ++i) f[i] = static_cast<float>(e[i]);
}

template <typename Element>
__device__ __forceinline__ uint4 pack(const float (&f)[kVecElems]) {
  uint4 packed;
  Element* e = reinterpret_cast<Element*>(&packed);
#pragma unroll
  for (int i = 0; i < kVecElems; ++i) e[i] = Element(f[i]);
  return packed;
}

template <typename Element>
__device__ __forceinline__ uint4 load_smem_vec(const Element* src) {
  return *reinterpret_cast<const uint4*>(src);
}

template <typename Element>
__device__ __forceinline__ void store_smem_vec(Element* dst, uint4 value) {
  *reinterpret_cast<uint4*>(dst) = value;
}

template <typename Element>
__device__ __forceinline__ uint4 load_global_vec(const Element* src) {
  return __ldg(reinterpret_cast<const uint4*>(src));
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Rows past rows_per_kv (the last row block of a KV head) are zero-filled and then ignored.
template <typename Element>
__device__ void stage_query_rows(const DecodeParams& p, int batch_idx, int kv_head, int row_base,
                                 SharedStorage<Element>& smem) {
  const Element* q = static_cast<const Element*>(p.q);
  const int head_vecs = p.head_dim / kVecElems;
  for (int i = threadIdx.x; i < kRowsPerCta * head_vecs; i += kThreads) {
    const int r = i / head_vecs;
    const int v = i % head_vecs;
    const int row = row_base + r;
    uint4 value = make_uint4(0, 0, 0, 0);
    if (row < p.rows_per_kv)
      value = load_global_vec(q + q_offset(p, batch_idx, kv_head, row) + v * kVecElems);
    store_smem_vec(&smem.q[r * kMaxHeadDim + v * kVecElems], value);
  }
}

// Tokens [tile_begin, tile_begin + tile_len) of the segment; only their block-table entries
// and, for valid pages, their cache rows are read.
template <typename Element>
__device__ void stage_key_tile(const DecodeParams& p, int batch_idx, int kv_head, int tile_begin,
                               int tile_len, SharedStorage<Element>& smem) {
  if (threadIdx.x < kTileTokens) {
    int64_t offset = -1;
    if (static_cast<int>(threadIdx.x) < tile_len) {
      const int token = tile_begin + threadIdx.x;
      const int page = page_of_token(p, batch_idx, token);
      if (page >= 0) offset = k_offset(p, page, token, kv_head);
    }
    smem.token_offset[threadIdx.x] = offset;
  }
  __syncthreads();
  const Element* k_cache = static_cast<const Element*>(p.k_cache);
  const int head_vecs = p.head_dim / kVecElems;
  for (int i = threadIdx.x; i < tile_len * head_vecs; i += kThreads) {
    const int t = i / head_vecs;
    const int v = i % head_vecs;
    const int64_t offset = smem.token_offset[t];
    uint4 value = make_uint4(0, 0, 0, 0);
    if (offset >= 0) value = load_global_vec(k_cache + offset + v * kVecElems);
    store_smem_vec(&smem.kv[t * kKvPitch + v * kVecElems], value);
  }
}

// Scores of this thread's token for its rows, in the log2 domain (scale_log2 folds log2(e) into
// softmax_scale so that the softmax can use exp2).
template <typename Element>
__device__ void score_tile(const DecodeParams& p, int tile_begin, int row_group,
                           const int (&key_limit)[kRowsPerThread], float scale_log2,
                           SharedStorage<Element>& smem) {
  const int t = threadIdx.x % kTileTokens;
  float score[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) score[i] = -INFINITY;
  if (smem.token_offset[t] >= 0) {
    float dot[kRowsPerThread] = {};
    const Element* k_row = &smem.kv[t * kKvPitch];
    const Element* q_rows = &smem.q[row_group * kRowsPerThread * kMaxHeadDim];
    const int head_vecs = p.head_dim / kVecElems;
    for (int v = 0; v < head_vecs; ++v) {
      float k[kVecElems];
      unpack<Element>(load_smem_vec(k_row + v * kVecElems), k);
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        float q[kVecElems];
        unpack<Element>(load_smem_vec(q_rows + i * kMaxHeadDim + v * kVecElems), q);
#pragma unroll
        for (int e = 0; e < kVecElems; ++e) dot[i] = fmaf(q[e], k[e], dot[i]);
      }
    }
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
      if (tile_begin + t < key_limit[i]) score[i] = dot[i] * scale_log2;
  }
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) smem.p[row_group * kRowsPerThread + i][t] = score[i];
}

// Online softmax over one tile for the warp's rows: turns scores into probabilities relative
// to the running max and publishes how much the accumulators must shrink.
template <typename Element>
__device__ void softmax_tile(float (&row_max)[kRowsPerWarp], float (&row_sum)[kRowsPerWarp],
                             SharedStorage<Element>& smem) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = warp * kRowsPerWarp + i;
    const float s0 = smem.p[r][lane];
    const float s1 = smem.p[r][lane + 32];
    const float new_max = fmaxf(row_max[i], warp_max(fmaxf(s0, s1)));
    // Until a row sees a key its max is -inf; measuring from 0 then keeps exp2 of masked
    // scores (and of the old max) at 0 instead of the NaN of -inf - -inf.
    const float reference = new_max == -INFINITY ? 0.f : new_max;
    const float p0 = exp2f(s0 - reference);
    const float p1 = exp2f(s1 - reference);
    const float rescale = exp2f(row_max[i] - reference);
    row_sum[i] = row_sum[i] * rescale + warp_sum(p0 + p1);
    row_max[i] = new_max;
    smem.p[r][lane] = p0;
    smem.p[r][lane + 32] = p1;
    if (lane == 0) smem.row_rescale[r] = rescale;
  }
}

template <typename Element>
__device__ void accumulate_tile(int tile_len, int row_group, int column,
                                float (&acc)[kRowsPerThread][kVecElems],
                                SharedStorage<Element>& smem) {
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const float rescale = smem.row_rescale[row_group * kRowsPerThread + i];
#pragma unroll
    for (int e = 0; e < kVecElems; ++e) acc[i][e] *= rescale;
  }
  for (int t = 0; t < tile_len; ++t) {
    float v[kVecElems];
    unpack<Element>(load_smem_vec(&smem.kv[t * kKvPitch + column]), v);
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const float weight = smem.p[row_group * kRowsPerThread + i][t];
#pragma unroll
      for (int e = 0; e < kVecElems; ++e) acc[i][e] = fmaf(weight, v[e], acc[i][e]);
    }
  }
}

// The softmax warps write lse (they hold the row statistics) and publish 1/sum; after the
// barrier every thread writes its output slice. A final output and a split partial differ
// only in where they go and in the lse of a row that saw no key (+inf final, -inf partial so
// that the combine gives it zero weight).
template <typename Element>
__device__ void write_segment_output(const DecodeParams& p, const Segment& seg, int kv_head,
                                     int row_base, int row_group, int column,
                                     const float (&row_max)[kRowsPerWarp],
                                     const float (&row_sum)[kRowsPerWarp],
                                     const float (&acc)[kRowsPerThread][kVecElems],
                                     SharedStorage<Element>& smem) {
  const bool write_partial = !seg.is_only_split && slot_in_range(p, seg.slot);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int r = warp * kRowsPerWarp + i;
      const int row = row_base + r;
      const bool saw_key = row_max[i] != -INFINITY;
      smem.row_inv_sum[r] = saw_key ? 1.f / row_sum[i] : 0.f;
      if (row >= p.rows_per_kv) continue;
      const float lse = row_max[i] * kLn2 + logf(row_sum[i]);
      if (seg.is_only_split)
        p.lse[lse_offset(p, seg.batch_idx, kv_head, row)] = saw_key ? lse : INFINITY;
      else if (write_partial)
        p.lse_accum[accum_row_index(p, seg.slot, kv_head, row)] = saw_key ? lse : -INFINITY;
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int r = row_group * kRowsPerThread + i;
    const int row = row_base + r;
    if (row >= p.rows_per_kv) continue;
    const float inv_sum = smem.row_inv_sum[r];
    float o[kVecElems];
#pragma unroll
    for (int e = 0; e < kVecElems; ++e) o[e] = inv_sum == 0.f ? 0.f : acc[i][e] * inv_sum;
    if (seg.is_only_split) {
      Element* out = static_cast<Element*>(p.out) + out_offset(p, seg.batch_idx, kv_head, row);
      *reinterpret_cast<uint4*>(out + column) = pack<Element>(o);
    } else if (write_partial) {
      float* o_accum =
          p.o_accum + accum_row_index(p, seg.slot, kv_head, row) * p.head_dim_v + column;
      reinterpret_cast<float4*>(o_accum)[0] = make_float4(o[0], o[1], o[2], o[3]);
      reinterpret_cast<float4*>(o_accum)[1] = make_float4(o[4], o[5], o[6], o[7]);
    }
  }
}

template <typename Element>
__device__ void attend_segment(const DecodeParams& p, const Segment& seg, int kv_head,
                               int row_base, SharedStorage<Element>& smem) {
  const int row_group = threadIdx.x / kTileTokens;
  const int column = (threadIdx.x % kColumnSlices) * kVecElems;
  const int seqlen = clamped_seqlen(p, seg.batch_idx);
  const float scale_log2 = p.softmax_scale * kLog2e;

  int key_limit[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int row = row_base + row_group * kRowsPerThread + i;
    key_limit[i] = row < p.rows_per_kv ? key_limit_for_row(p, seqlen, row) : 0;
  }
  float acc[kRowsPerThread][kVecElems] = {};
  float row_max[kRowsPerWarp];
  float row_sum[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.f;
  }

  // The previous segment's output step may still be reading row_inv_sum.
  __syncthreads();
  stage_query_rows(p, seg.batch_idx, kv_head, row_base, smem);
  for (int tile_begin = seg.token_begin; tile_begin < seg.token_end; tile_begin += kTileTokens) {
    const int tile_len = min(kTileTokens, seg.token_end - tile_begin);
    stage_key_tile(p, seg.batch_idx, kv_head, tile_begin, tile_len, smem);
    __syncthreads();
    score_tile(p, tile_begin, row_group, key_limit, scale_log2, smem);
    __syncthreads();
    softmax_tile(row_max, row_sum, smem);
    __syncthreads();
    accumulate_tile(tile_len, row_group, column, acc, smem);
    // The next tile overwrites token_offset, kv and p.
    __syncthreads();
  }
  write_segment_output(p, seg, kv_head, row_base, row_group, column, row_max, row_sum, acc, smem);
}

template <typename Element>
__global__ void __launch_bounds__(kThreads, 2)
    split_kv_decode_kernel(const __grid_constant__ DecodeParams params) {
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  auto& smem = *reinterpret_cast<SharedStorage<Element>*>(smem_bytes);
  const int32_t* piece =
      params.tile_scheduler_metadata + static_cast<int64_t>(blockIdx.x) * kMetadataInts;
  for_each_segment(params, piece, [&](const Segment& seg) {
    attend_segment(params, seg, blockIdx.y, blockIdx.z * kRowsPerCta, smem);
  });
}

template <typename Element>
cudaError_t launch_for_element(const DecodeParams& params, dim3 grid, cudaStream_t stream) {
  constexpr size_t smem_bytes = sizeof(SharedStorage<Element>);
  // Above the 48 KiB default. Set on every launch rather than once per process: the attribute
  // belongs to the current device, and one process may drive several.
  const cudaError_t err = cudaFuncSetAttribute(
      split_kv_decode_kernel<Element>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  split_kv_decode_kernel<Element><<<grid, kThreads, smem_bytes, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_split_kv_decode(const DecodeParams& params, cudaStream_t stream) {
  if ((params.head_dim != kMaxHeadDim && params.head_dim != kHeadDimV) ||
      params.head_dim_v != kHeadDimV || params.num_sm_parts <= 0 || params.num_heads_k <= 0)
    return cudaErrorInvalidValue;
  if (params.batch <= 0 || params.rows_per_kv <= 0) return cudaSuccess;
  const int64_t row_blocks =
      (static_cast<int64_t>(params.rows_per_kv) + kRowsPerCta - 1) / kRowsPerCta;
  if (params.num_heads_k > 65535 || row_blocks > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(params.num_sm_parts, params.num_heads_k, static_cast<unsigned>(row_blocks));
  return params.dtype == ElementType::kBF16
             ? launch_for_element<__nv_bfloat16>(params, grid, stream)
             : launch_for_element<__half>(params, grid, stream);
}

}  // namespace jax_flash_mla
