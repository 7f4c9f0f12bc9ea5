// Combine step: merges the float32 partials of split requests into (out, lse).
//
// Split requests: out = sum_j exp(lse_j - lse) * o_j with lse = log(sum_j exp(lse_j)), taken
// relative to the largest lse_j so that no exp overflows. Requests with no keys (or whose
// splits all saw none): out = 0, lse = +inf. Requests with one split were finished by the
// attention kernel and are left alone.
//
// One CTA of kCombineWarps warps per (request, KV head, row), looping over rows when there are
// more rows than CTAs. A row's splits are spread over the warps (warp w sums splits w, w + 8,
// ...) and its 512 columns over the lanes, so that at b = 1, where one request is split across
// the whole chip and only a few rows exist, every row still has 8 warps' worth of loads in
// flight instead of one lane walking 64+ splits serially (39 us for 2 MiB in the first
// version). The warps' partial sums then meet in shared memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../common/split_kv.h"
#include "kernels.h"
#include "once_per_device.h"

namespace jax_flash_mla {
namespace {

constexpr int kCombineWarps = 8;
constexpr int kCombineThreads = kCombineWarps * 32;
constexpr int kHeadDimV = 512;
constexpr int kVecs = kHeadDimV / 4;            // float4 columns of a row
constexpr int kVecsPerLane = kVecs / 32;
// Rows whose CTA exits at once (one split) are most rows at large batch: a grid-stride loop
// over at most this many CTAs keeps their launch cost bounded.
constexpr int64_t kMaxCombineBlocks = 2048;

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

__device__ __forceinline__ float4 fma4(float w, float4 v, float4 acc) {
  return make_float4(fmaf(w, v.x, acc.x), fmaf(w, v.y, acc.y), fmaf(w, v.z, acc.z),
                     fmaf(w, v.w, acc.w));
}

// Every thread gets the reduction over the CTA; `scratch` holds one value per warp.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float x, float* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const float y = __shfl_xor_sync(0xffffffffu, x, offset);
    x = kMax ? fmaxf(x, y) : x + y;
  }
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
  __syncthreads();
  float total = scratch[0];
  for (int w = 1; w < kCombineWarps; ++w) total = kMax ? fmaxf(total, scratch[w]) : total + scratch[w];
  __syncthreads();  // scratch is reused by the next reduction
  return total;
}

struct CombineSmem {
  float4 partial[kCombineWarps][kVecs];
  float reduce[kCombineWarps];
};

template <typename Element>
__device__ void combine_row(const DecodeParams& params, int64_t global_row, CombineSmem& smem) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t rows_per_request = static_cast<int64_t>(params.num_heads_k) * params.rows_per_kv;
  const int batch_idx = static_cast<int>(global_row / rows_per_request);
  const int kv_head = static_cast<int>(global_row % rows_per_request / params.rows_per_kv);
  const int row = static_cast<int>(global_row % params.rows_per_kv);

  int slot_begin, slot_end, splits;
  split_slot_range(params, batch_idx, &slot_begin, &slot_end, &splits);
  if (splits == 1) return;  // uniform over the CTA

  float max_lse = -INFINITY;
  for (int s = slot_begin + threadIdx.x; s < slot_end; s += kCombineThreads)
    max_lse = fmaxf(max_lse, params.lse_accum[accum_row_index(params, s, kv_head, row)]);
  max_lse = block_reduce<true>(max_lse, smem.reduce);

  float lse = INFINITY;
  float4 o[kVecsPerLane];
#pragma unroll
  for (int k = 0; k < kVecsPerLane; ++k) o[k] = make_float4(0.f, 0.f, 0.f, 0.f);
  if (max_lse != -INFINITY) {
    float sum = 0.f;
    for (int s = slot_begin + threadIdx.x; s < slot_end; s += kCombineThreads)
      sum += expf(params.lse_accum[accum_row_index(params, s, kv_head, row)] - max_lse);
    lse = max_lse + logf(block_reduce<false>(sum, smem.reduce));
    // Unrolled so that several splits' loads are in flight at once (each is an L2 round trip).
#pragma unroll 4
    for (int s = slot_begin + warp; s < slot_end; s += kCombineWarps) {
      const int64_t accum_row = accum_row_index(params, s, kv_head, row);
      const float weight = expf(params.lse_accum[accum_row] - lse);
      const float4* partial =
          reinterpret_cast<const float4*>(params.o_accum + accum_row * kHeadDimV);
#pragma unroll
      for (int k = 0; k < kVecsPerLane; ++k) o[k] = fma4(weight, partial[k * 32 + lane], o[k]);
    }
  }
#pragma unroll
  for (int k = 0; k < kVecsPerLane; ++k) smem.partial[warp][k * 32 + lane] = o[k];
  __syncthreads();
  Element* out = static_cast<Element*>(params.out) + out_offset(params, batch_idx, kv_head, row);
  for (int v = threadIdx.x; v < kVecs; v += kCombineThreads) {
    float4 total = smem.partial[0][v];
    for (int w = 1; w < kCombineWarps; ++w) total = fma4(1.f, smem.partial[w][v], total);
    store_vec4(out + v * 4, total);
  }
  if (threadIdx.x == 0) params.lse[lse_offset(params, batch_idx, kv_head, row)] = lse;
  __syncthreads();  // smem.partial is reused by the CTA's next row
}

template <typename Element>
__global__ void __launch_bounds__(kCombineThreads)
    combine_kernel(const __grid_constant__ DecodeParams params, int64_t total_rows) {
  __shared__ CombineSmem smem;
  // Launched as a programmatic dependent of the split-KV kernel: the CTAs may start while it
  // drains, and wait here until its writes (the partials) are visible.
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  for (int64_t row = blockIdx.x; row < total_rows; row += gridDim.x)
    combine_row<Element>(params, row, smem);
}

}  // namespace

cudaError_t launch_combine(const DecodeParams& params, cudaStream_t stream) {
  if (params.head_dim_v != kHeadDimV || params.num_heads_k <= 0) return cudaErrorInvalidValue;
  const int64_t total_rows =
      static_cast<int64_t>(params.batch) * params.num_heads_k * params.rows_per_kv;
  if (total_rows <= 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(total_rows < kMaxCombineBlocks ? total_rows
                                                                               : kMaxCombineBlocks);
  // The split-KV kernel runs with the largest shared-memory carveout; asking the same here
  // spares the SMs a reconfiguration of the L1/shared split between the two kernels.
  const auto kernel = params.dtype == ElementType::kBF16 ? combine_kernel<__nv_bfloat16>
                                                        : combine_kernel<__half>;
  const cudaError_t carveout = once_per_device([] {
    const cudaError_t bf16 = cudaFuncSetAttribute(combine_kernel<__nv_bfloat16>,
                                                  cudaFuncAttributePreferredSharedMemoryCarveout,
                                                  cudaSharedmemCarveoutMaxShared);
    return bf16 != cudaSuccess ? bf16
                               : cudaFuncSetAttribute(combine_kernel<__half>,
                                                      cudaFuncAttributePreferredSharedMemoryCarveout,
                                                      cudaSharedmemCarveoutMaxShared);
  });
  if (carveout != cudaSuccess) return carveout;
  // Programmatic dependent launch: the launch and the CTAs' start overlap the split-KV
  // kernel's tail (at b = 1 the whole call is a few microseconds of latency).
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(kCombineThreads);
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, params, total_rows);
}

}  // namespace jax_flash_mla
