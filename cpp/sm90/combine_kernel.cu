// Combine step: one warp per (request, KV head, row), kCombineWarps rows per CTA, so the grid
// is one flat dimension whatever the batch, head count and seqlen_q.
//
// Split requests: out = sum_j exp(lse_j - lse) * o_j with lse = log(sum_j exp(lse_j)), taken
// relative to the largest lse_j so that no exp overflows. Requests with no keys (or whose
// splits all saw none): out = 0, lse = +inf. Requests with one split were finished by the
// attention kernel and are left alone.
//
// The number of splits per request is small (a request is cut at piece boundaries only), so
// each lane walks all of a row's slots itself: the lse values are warp-wide broadcast loads,
// and no cross-lane reduction is needed. Lane l owns the float4 columns l, l + 32, l + 64 and
// l + 96 so that every load and store of the warp is contiguous.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../common/split_kv.h"
#include "kernels.h"

namespace jax_flash_mla {
namespace {

constexpr int kCombineWarps = 4;
constexpr int kHeadDimV = 512;
constexpr int kVecsPerLane = kHeadDimV / 4 / 32;

template <typename Element>
__device__ __forceinline__ void store_vec4(Element* dst, float4 v) {
  uint2 packed;
  Element* e = reinterpret_cast<Element*>(&packed);
  e[0] = Element(v.x);
  e[1] = Element(v.y);
  e[2] = Element(v.z);
  e[3] = Element(v.w);
  *reinterpret_cast<uint2*>(dst) = packed;
}

template <typename Element>
__global__ void __launch_bounds__(kCombineWarps * 32)
    combine_kernel(const __grid_constant__ DecodeParams params) {
  const int lane = threadIdx.x % 32;
  const int64_t rows_per_request = static_cast<int64_t>(params.num_heads_k) * params.rows_per_kv;
  const int64_t global_row = static_cast<int64_t>(blockIdx.x) * kCombineWarps + threadIdx.x / 32;
  if (global_row >= params.batch * rows_per_request) return;
  const int batch_idx = static_cast<int>(global_row / rows_per_request);
  const int kv_head = static_cast<int>(global_row % rows_per_request / params.rows_per_kv);
  const int row = static_cast<int>(global_row % params.rows_per_kv);

  int slot_begin, slot_end, splits;
  split_slot_range(params, batch_idx, &slot_begin, &slot_end, &splits);
  if (splits == 1) return;

  float max_lse = -INFINITY;
  for (int s = slot_begin; s < slot_end; ++s)
    max_lse = fmaxf(max_lse, params.lse_accum[accum_row_index(params, s, kv_head, row)]);

  float4 o[kVecsPerLane];
#pragma unroll
  for (int k = 0; k < kVecsPerLane; ++k) o[k] = make_float4(0.f, 0.f, 0.f, 0.f);
  float lse = INFINITY;
  if (max_lse != -INFINITY) {
    float sum = 0.f;
    for (int s = slot_begin; s < slot_end; ++s)
      sum += expf(params.lse_accum[accum_row_index(params, s, kv_head, row)] - max_lse);
    lse = max_lse + logf(sum);
    for (int s = slot_begin; s < slot_end; ++s) {
      const int64_t accum_row = accum_row_index(params, s, kv_head, row);
      const float weight = expf(params.lse_accum[accum_row] - lse);
      const float4* partial =
          reinterpret_cast<const float4*>(params.o_accum + accum_row * kHeadDimV);
#pragma unroll
      for (int k = 0; k < kVecsPerLane; ++k) {
        const float4 v = partial[k * 32 + lane];
        o[k].x = fmaf(weight, v.x, o[k].x);
        o[k].y = fmaf(weight, v.y, o[k].y);
        o[k].z = fmaf(weight, v.z, o[k].z);
        o[k].w = fmaf(weight, v.w, o[k].w);
      }
    }
  }

  Element* out = static_cast<Element*>(params.out) + out_offset(params, batch_idx, kv_head, row);
#pragma unroll
  for (int k = 0; k < kVecsPerLane; ++k) store_vec4(out + (k * 32 + lane) * 4, o[k]);
  if (lane == 0) params.lse[lse_offset(params, batch_idx, kv_head, row)] = lse;
}

template <typename Element>
cudaError_t launch_for_element(const DecodeParams& params, unsigned blocks, cudaStream_t stream) {
  combine_kernel<Element><<<blocks, kCombineWarps * 32, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_combine(const DecodeParams& params, cudaStream_t stream) {
  if (params.head_dim_v != kHeadDimV || params.num_heads_k <= 0) return cudaErrorInvalidValue;
  const int64_t total_rows =
      static_cast<int64_t>(params.batch) * params.num_heads_k * params.rows_per_kv;
  if (total_rows <= 0) return cudaSuccess;
  const int64_t blocks = (total_rows + kCombineWarps - 1) / kCombineWarps;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return params.dtype == ElementType::kBF16
             ? launch_for_element<__nv_bfloat16>(params, static_cast<unsigned>(blocks), stream)
             : launch_for_element<__half>(params, static_cast<unsigned>(blocks), stream);
}

}  // namespace jax_flash_mla
