// Combine step: merges the float32 partials of split requests into (out, lse), and for sparse
// prefill their largest scaled scores into max_logits.
//
// Split requests: out = sum_j exp(lse_j - lse) * o_j with lse = log(sum_j exp(lse_j)), taken
// relative to the largest lse_j so that no exp overflows. Requests with no keys (or whose
// splits all saw none): out = 0, lse = +inf. Requests with one split were finished by the
// attention kernel and are left alone.
//
// The work is a few microseconds of loads at any batch, so what it costs is latency: how many
// dependent round trips to memory a row waits for, and how many rows are in flight. Two ways
// to spread it, chosen on the host from the schedule's shape:
//   row per warp   (a few splits a request, b >~ num_sm_parts / 8): one warp merges a whole
//                  row, 4 float4 columns a lane. No block barrier, and the loads of every split
//                  are independent of its weight, so a row is about two round trips (its lse
//                  values, then its partials). The earlier layout, a CTA per row, waited on
//                  4 block reductions a row with 2 of its 8 warps busy at b = 64.
//   quarter per CTA (many splits, small batches): a CTA of 8 warps merges one 128-column
//                  quarter of a row, warp w taking splits w, w + 8, ..., one float4 a lane; the
//                  warps' sums meet in shared memory. At b = 1, where one request is split over
//                  the whole chip and only a few rows exist, every split's loads are in flight
//                  at once, spread over 4 times as many SMs as rows.
// Each warp computes the row's lse itself from the (L1-resident) lse values, so neither layout
// needs a block-wide reduction for it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../common/split_kv.h"
#include "kernels.h"
#include "once_per_device.h"

namespace jax_flash_mla {
namespace {

constexpr int kHeadDimV = 512;
constexpr int kVecs = kHeadDimV / 4;  // float4 columns of a row
constexpr int kRowVecsPerLane = kVecs / 32;
constexpr int kQuarters = 4;  // quarter per CTA: 128 columns, one float4 a lane
constexpr int kCombineWarps = 8;
constexpr int kCombineThreads = kCombineWarps * 32;
// Row per warp when a request has at most this many splits on average (by the schedule's
// bound: batch + num_sm_parts split slots over batch requests).
constexpr int64_t kRowPerWarpMaxSplits = 8;
// Rows (or row quarters) whose warps exit at once are most of the work at large batch: a
// grid-stride loop over at most this many CTAs keeps their launch cost bounded.
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

// The larger of a and b, a NaN in either kept (fmaxf would drop it).
__device__ __forceinline__ float nan_max(float a, float b) {
  return isnan(a) || a > b ? a : b;
}

template <bool kMax>
__device__ __forceinline__ float warp_reduce(float x) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const float y = __shfl_xor_sync(0xffffffffu, x, offset);
    x = kMax ? fmaxf(x, y) : x + y;
  }
  return x;
}

// One row of the combine, as a warp sees it: where its splits and its outputs are, and its
// merged log-sum-exp.
struct CombineRow {
  int batch_idx, kv_head, row;
  int slot_begin, slot_end, splits;
  float first_lse;  // lane i: the lse of split slot_begin + i (-inf past the row's splits)
  float lse;        // log of the merged denominator; +inf when no split saw a key
  float out_scale = 1.f;  // the attention sink's factor on the merged output (split_kv.h)
  float max_logit = -INFINITY;  // the splits' largest scaled score, NaN kept (max_logits only)

  __device__ __forceinline__ CombineRow(const DecodeParams& p, int64_t global_row) {
    const int64_t rows_per_request = static_cast<int64_t>(p.num_heads_k) * p.rows_per_kv;
    batch_idx = static_cast<int>(global_row / rows_per_request);
    kv_head = static_cast<int>(global_row % rows_per_request / p.rows_per_kv);
    row = static_cast<int>(global_row % p.rows_per_kv);
    split_slot_range(p, batch_idx, &slot_begin, &slot_end, &splits);
  }

  __device__ __forceinline__ float lse_of(const DecodeParams& p, int slot) const {
    return p.lse_accum[accum_row_index(p, slot, kv_head, row)];
  }

  // By every lane of a warp (uniform control flow): the first 32 splits' lse stay in
  // registers, the rest (more than 32 splits only at small batch) are read twice.
  __device__ __forceinline__ void merge_lse(const DecodeParams& p) {
    const int lane = threadIdx.x % 32;
    first_lse = slot_begin + lane < slot_end ? lse_of(p, slot_begin + lane) : -INFINITY;
    float max_lse = first_lse;
    for (int s = slot_begin + 32 + lane; s < slot_end; s += 32) max_lse = fmaxf(max_lse, lse_of(p, s));
    max_lse = warp_reduce<true>(max_lse);
    if (max_lse == -INFINITY) {
      lse = INFINITY;
      return;
    }
    float sum = expf(first_lse - max_lse);
    for (int s = slot_begin + 32 + lane; s < slot_end; s += 32) sum += expf(lse_of(p, s) - max_lse);
    lse = max_lse + logf(warp_reduce<false>(sum));
    out_scale = sink_scale(p, kv_head, row, lse);
  }

  // Sparse prefill's max_logits: the largest of the splits' (a NaN in any stays NaN, as the
  // CPU path keeps it). By every lane of a warp; read only where the call asks for it.
  __device__ __forceinline__ void merge_max_logit(const DecodeParams& p) {
    const int lane = threadIdx.x % 32;
    float m = -INFINITY;
    for (int s = slot_begin + lane; s < slot_end; s += 32)
      m = nan_max(m, p.max_accum[accum_row_index(p, s, kv_head, row)]);
    for (int offset = 16; offset > 0; offset /= 2)
      m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, offset));
    max_logit = m;
  }

  // Weight of split `slot` in the merged output (0 when no split saw a key). Uniform `slot`.
  __device__ __forceinline__ float weight(const DecodeParams& p, int slot) const {
    const int i = slot - slot_begin;
    const float split_lse = i < 32 ? __shfl_sync(0xffffffffu, first_lse, i) : lse_of(p, slot);
    return lse == INFINITY ? 0.f : expf(split_lse - lse) * out_scale;
  }

  __device__ __forceinline__ const float4* partial(const DecodeParams& p, int slot) const {
    return reinterpret_cast<const float4*>(p.o_accum +
                                           accum_row_index(p, slot, kv_head, row) * kHeadDimV);
  }

  template <typename Element>
  __device__ __forceinline__ Element* out(const DecodeParams& p) const {
    return static_cast<Element*>(p.out) + out_offset(p, batch_idx, kv_head, row);
  }

  __device__ __forceinline__ void store_lse(const DecodeParams& p) const {
    const int64_t at = lse_offset(p, batch_idx, kv_head, row);
    p.lse[at] = lse;
    if (p.max_logits != nullptr) p.max_logits[at] = max_logit;
  }
};

template <typename Element>
__device__ void combine_row_per_warp(const DecodeParams& params, int64_t global_row) {
  const int lane = threadIdx.x % 32;
  CombineRow r(params, global_row);
  if (r.splits == 1) return;  // uniform over the warp
  r.merge_lse(params);
  if (params.max_logits != nullptr) r.merge_max_logit(params);
  float4 o[kRowVecsPerLane];
#pragma unroll
  for (int k = 0; k < kRowVecsPerLane; ++k) o[k] = make_float4(0.f, 0.f, 0.f, 0.f);
  // Unrolled so that several splits' loads are in flight at once (each is an L2 round trip).
#pragma unroll 4
  for (int s = r.slot_begin; s < r.slot_end; ++s) {
    const float4* partial = r.partial(params, s);
    float4 v[kRowVecsPerLane];
#pragma unroll
    for (int k = 0; k < kRowVecsPerLane; ++k) v[k] = partial[k * 32 + lane];
    const float w = r.weight(params, s);
#pragma unroll
    for (int k = 0; k < kRowVecsPerLane; ++k) o[k] = fma4(w, v[k], o[k]);
  }
  Element* out = r.out<Element>(params);
#pragma unroll
  for (int k = 0; k < kRowVecsPerLane; ++k) store_vec4(out + (k * 32 + lane) * 4, o[k]);
  if (lane == 0) r.store_lse(params);
}

template <typename Element>
__device__ void combine_quarter_per_cta(const DecodeParams& params, int64_t item,
                                        float4 (&sums)[kCombineWarps][32]) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int quarter = static_cast<int>(item % kQuarters);
  CombineRow r(params, item / kQuarters);
  if (r.splits == 1) return;  // uniform over the CTA
  r.merge_lse(params);
  if (params.max_logits != nullptr && warp == 0) r.merge_max_logit(params);
  const int vec = quarter * 32 + lane;
  float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
  for (int s = r.slot_begin + warp; s < r.slot_end; s += kCombineWarps) {
    const float4 v = r.partial(params, s)[vec];
    o = fma4(r.weight(params, s), v, o);
  }
  sums[warp][lane] = o;
  __syncthreads();
  if (warp == 0) {
    float4 total = sums[0][lane];
#pragma unroll
    for (int w = 1; w < kCombineWarps; ++w) total = fma4(1.f, sums[w][lane], total);
    store_vec4(r.out<Element>(params) + vec * 4, total);
    if (quarter == 0 && lane == 0) r.store_lse(params);
  }
  __syncthreads();  // `sums` is reused by the CTA's next item
}

template <typename Element, bool kRowPerWarp>
__global__ void __launch_bounds__(kCombineThreads)
    combine_kernel(const __grid_constant__ DecodeParams params, int64_t total_rows) {
  __shared__ float4 sums[kCombineWarps][32];
  // Launched as a programmatic dependent of the split-KV kernel: the CTAs may start while it
  // drains, and wait here until its writes (the partials) are visible.
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  if constexpr (kRowPerWarp) {
    const int warp = threadIdx.x / 32;
    for (int64_t row = static_cast<int64_t>(blockIdx.x) * kCombineWarps + warp; row < total_rows;
         row += static_cast<int64_t>(gridDim.x) * kCombineWarps)
      combine_row_per_warp<Element>(params, row);
  } else {
    for (int64_t item = blockIdx.x; item < total_rows * kQuarters; item += gridDim.x)
      combine_quarter_per_cta<Element>(params, item, sums);
  }
}

template <typename Element>
cudaError_t launch_for_element(const DecodeParams& params, int64_t total_rows,
                               cudaStream_t stream) {
  const bool row_per_warp =
      params.batch + static_cast<int64_t>(params.num_sm_parts) <=
      kRowPerWarpMaxSplits * params.batch;
  const int64_t items = row_per_warp ? (total_rows + kCombineWarps - 1) / kCombineWarps
                                     : total_rows * kQuarters;
  const auto kernel = row_per_warp ? combine_kernel<Element, true> : combine_kernel<Element, false>;
  // The split-KV kernel runs with the largest shared-memory carveout; asking the same here
  // spares the SMs a reconfiguration of the L1/shared split between the two kernels.
  const cudaError_t carveout = once_per_device([] {
    for (const auto k : {combine_kernel<Element, true>, combine_kernel<Element, false>}) {
      const cudaError_t err = cudaFuncSetAttribute(
          k, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  });
  if (carveout != cudaSuccess) return carveout;
  // Programmatic dependent launch: the launch and the CTAs' start overlap the split-KV
  // kernel's tail (at b = 1 the whole call is a few microseconds of latency).
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(items < kMaxCombineBlocks ? items : kMaxCombineBlocks));
  config.blockDim = dim3(kCombineThreads);
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, params, total_rows);
}

}  // namespace

cudaError_t launch_combine(const DecodeParams& params, cudaStream_t stream) {
  if (params.head_dim_v != kHeadDimV || params.num_heads_k <= 0) return cudaErrorInvalidValue;
  const int64_t total_rows =
      static_cast<int64_t>(params.batch) * params.num_heads_k * params.rows_per_kv;
  if (total_rows <= 0) return cudaSuccess;
  return params.dtype == ElementType::kBF16
             ? launch_for_element<__nv_bfloat16>(params, total_rows, stream)
             : launch_for_element<__half>(params, total_rows, stream);
}

}  // namespace jax_flash_mla
