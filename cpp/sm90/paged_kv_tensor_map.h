// The TMA descriptor of the paged latent cache, built on the host for each call.
//
// k_cache [num_blocks, page_block_size, num_heads_k, head_dim] is seen as a 3-D tensor
// (head_dim, num_heads_k, num_blocks * page_block_size): a box of (64 columns, 1 head,
// `tokens_per_box` consecutive token slots) is 64 x 128-byte rows that land in shared memory
// already in the 128-byte swizzled layout wgmma reads. A box never crosses a page (it starts
// on a multiple of tokens_per_box, which divides the page), so a 64-key tile is gathered
// through the block table with 64 / tokens_per_box boxes per 64 columns (the seesaw kernel's
// map). The transposed and lockstep kernels use a second view of the same bytes
// (make_paged_kv_key_group_tensor_map): one box per 8 keys with all their columns, 8 boxes a
// tile whatever the page size.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "../common/host_device.h"
#include "../common/params.h"

namespace jax_flash_mla {

// Token slots per box: the largest power of two dividing both the page and the 64-key tile.
// Boxes of fewer than 8 rows would start inside a 1024-byte swizzle period, which the
// shared-memory layout does not allow; such page sizes use the cp.async gather instead.
FMLA_HOST_DEVICE int tma_tokens_per_box(int page_block_size) {
  int tokens = 64;
  while (tokens > 1 && page_block_size % tokens != 0) tokens /= 2;
  return tokens;
}

// Keys a key-group box holds (make_paged_kv_key_group_tensor_map): one 1 KiB swizzle atom's
// rows, so the smallest run tma_tokens_per_box accepts, and a divisor of every page it accepts.
constexpr int kKeyGroup = 8;

// Token slots of the cache: the coordinate a box's first key is addressed by.
inline int64_t paged_kv_token_slots(const DecodeParams& p) {
  return static_cast<int64_t>(p.num_blocks) * p.page_block_size;
}

// The driver function's own type (cuda.h declares it; the entry point avoids linking libcuda).
using TensorMapEncoder = decltype(&cuTensorMapEncodeTiled);

inline TensorMapEncoder tensor_map_encoder() {
  static const TensorMapEncoder encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &status) != cudaSuccess ||
        status != cudaDriverEntryPointSuccess)
      return static_cast<TensorMapEncoder>(nullptr);
    return reinterpret_cast<TensorMapEncoder>(fn);
  }();
  return encode;
}

// A refusal of a tensor map whose parameters the caller has checked is unexpected: the kernels
// then take the cp.async path, correct but slower, and a timing would pass for the TMA path's
// (a new map's layout, say). Said once per process on stderr; with JAX_FLASH_MLA_EXPECT_TMA set
// (the device scripts' test and A/B steps) the process stops there instead.
inline void report_refused_tensor_map(int rank, int result) {
  static const bool expect_tma = std::getenv("JAX_FLASH_MLA_EXPECT_TMA") != nullptr;
  static bool reported = false;
  if (!reported || expect_tma)
    std::fprintf(stderr,
                 "jax_flash_mla: the driver refused a %d-D TMA tensor map (CUresult %d, -1: no "
                 "entry point); the cp.async path runs instead\n",
                 rank, result);
  reported = true;
  if (expect_tma) std::abort();
}

// Encodes a tensor map over bf16/fp16 `base` (the innermost dimension contiguous, `strides`
// of the outer ones in bytes) whose boxes land in shared memory 128-byte swizzled, the layout
// wgmma reads; out-of-range elements of a box read as zeros. False when the driver refuses it
// or has no entry point.
template <int kRank>
inline bool encode_swizzled_tensor_map(ElementType dtype, const void* base,
                                       const cuuint64_t (&sizes)[kRank],
                                       const cuuint64_t (&strides)[kRank - 1],
                                       const cuuint32_t (&box)[kRank], CUtensorMap* map) {
  const TensorMapEncoder encode = tensor_map_encoder();
  if (encode == nullptr) {
    report_refused_tensor_map(kRank, -1);
    return false;
  }
  cuuint32_t element_strides[kRank];
  for (int i = 0; i < kRank; ++i) element_strides[i] = 1;
  const CUtensorMapDataType type = dtype == ElementType::kBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                               : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const CUresult result =
      encode(map, type, kRank, const_cast<void*>(base), sizes, strides, box, element_strides,
             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (result != CUDA_SUCCESS) report_refused_tensor_map(kRank, static_cast<int>(result));
  return result == CUDA_SUCCESS;
}

// Whether TMA can box this cache at all: a page a multiple of 8 tokens, token slots an int32
// coordinate reaches, and a 16-byte aligned cache (XLA's buffers are; a caller's view may not
// be). Otherwise the caller gathers with cp.async.
inline bool paged_kv_fits_tma(const DecodeParams& p) {
  const int64_t token_slots = paged_kv_token_slots(p);
  // FP8 tokens need converting on their way in (key_tile_dequant.h), which TMA cannot do.
  return p.key_format == KeyFormat::kSameAsQuery &&
         tma_tokens_per_box(p.page_block_size) >= kKeyGroup && token_slots < INT32_MAX &&
         token_slots > 0 && reinterpret_cast<uintptr_t>(p.k_cache) % 16 == 0;
}

// False when TMA cannot express this cache (paged_kv_fits_tma) or the driver has no entry
// point: the caller gathers with cp.async.
inline bool make_paged_kv_tensor_map(const DecodeParams& p, CUtensorMap* map) {
  if (!paged_kv_fits_tma(p)) return false;
  const int tokens_per_box = tma_tokens_per_box(p.page_block_size);
  const int64_t token_slots = paged_kv_token_slots(p);
  const cuuint64_t sizes[3] = {static_cast<cuuint64_t>(p.head_dim),
                               static_cast<cuuint64_t>(p.num_heads_k),
                               static_cast<cuuint64_t>(token_slots)};
  const cuuint64_t row_bytes = static_cast<cuuint64_t>(p.head_dim) * 2;
  const cuuint64_t strides[2] = {row_bytes, row_bytes * p.num_heads_k};  // dims 1 and 2
  const cuuint32_t box[3] = {64, 1, static_cast<cuuint32_t>(tokens_per_box)};
  // Out-of-range boxes (invalid pages, keys past the request) read as zeros: the tile's rows
  // are then finite, so P (0 for them) times V adds nothing.
  return encode_swizzled_tensor_map(p.dtype, p.k_cache, sizes, strides, box, map);
}

// The same cache for key-group tiles (KeyTileOrder::kKeyGroups, pipeline_traits.h): seen as
// (64 columns, token slots, head_dim / 64 column blocks, num_heads_k), the column blocks a
// dimension of their own (stride 128 bytes) after the tokens, so that a box of (64, kKeyGroup
// tokens, every column block, 1 head) lands as its column blocks one after another, each 8
// keys x 128 bytes: one 1 KiB swizzle atom per column block, the atoms of 8 keys' whole rows
// contiguous.
// A box starts on a multiple of 8 tokens, which divides the page, so it never crosses one.
inline bool make_paged_kv_key_group_tensor_map(const DecodeParams& p, CUtensorMap* map) {
  if (!paged_kv_fits_tma(p)) return false;
  const int64_t token_slots = paged_kv_token_slots(p);
  const cuuint64_t row_bytes = static_cast<cuuint64_t>(p.head_dim) * 2;
  const cuuint64_t sizes[4] = {64, static_cast<cuuint64_t>(token_slots),
                               static_cast<cuuint64_t>(p.head_dim / 64),
                               static_cast<cuuint64_t>(p.num_heads_k)};
  const cuuint64_t strides[3] = {row_bytes * p.num_heads_k, 128, row_bytes};  // dims 1, 2, 3
  const cuuint32_t box[4] = {64, kKeyGroup, static_cast<cuuint32_t>(p.head_dim / 64), 1};
  return encode_swizzled_tensor_map(p.dtype, p.k_cache, sizes, strides, box, map);
}

}  // namespace jax_flash_mla
