// The FP8 key tile: DeepSeek-V3.2's 656-byte tokens (jax_flash_mla/fp8_cache.py: the 512 NoPE
// columns as e4m3 in four groups of 128, each group's float32 scale at bytes 512-527, the 64
// RoPE columns as bf16 at bytes 528-655), gathered and dequantized by the producer warpgroup
// into the same bf16 tile the math warpgroups read from a bf16 cache. Dequantizing here moves
// 656 bytes a selected token through HBM, where a dequantized copy of the selected tokens
// moved 656 + 2 x 1152.
//
// Neither TMA nor cp.async converts, so the bytes go through registers: 16-byte global loads,
// conversion, 16-byte shared-memory stores into the tile's 128-byte swizzle. Which thread
// holds which bytes, and where its chunks go in the tile, is fp8_tile_slots.h's.
//
// A round's loads do not touch shared memory, so a tile's first rounds are loaded before its
// stage frees (their HBM round trip overlaps the math on that stage) and only stored after: as
// many as the producer's registers hold (kRoundsAhead: one in the lockstep kernel, whose
// producer gives registers to the math warpgroups; both in the transposed kernel, which is
// bound by how many bytes are in flight).
//
// Dequantization: e4m3 -> f16 (exact) -> float, times the float scale, rounded once to bf16:
// the rounding of jax_flash_mla.dequantize_fp8_kvcache, exact for the power-of-two scales
// quantize_fp8_kvcache writes. A key that must not be read (past the segment, or an index
// outside the pool) is never loaded and is stored as zeros, as the cp.async gather zero-fills
// (a masked key's value row must be finite: P = 0 times NaN is NaN).
#pragma once

#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cute/tensor.hpp>

#include <cstdint>

#include "../common/params.h"
#include "../common/split_kv.h"
#include "fp8_tile_slots.h"
#include "pipeline_traits.h"

namespace jax_flash_mla {
namespace sm90 {

// One thread's share of one token, as loaded.
struct Fp8TokenShare {
  uint4 nope[8];  // 16 e4m3 codes of each 64-column block
  float4 scales;  // of columns 0-127, 128-255, 256-383, 384-511
  uint4 rope[2];  // 8 bf16 each
};

// 16 bytes from global memory that no kernel writes while this one runs: the non-coherent path,
// not kept in L1 (no CTA reads a token twice), with the rest of the 256-byte span prefetched
// into L2 (a token spans 656 bytes).
__device__ __forceinline__ uint4 load_stream_16(const void* address) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(address));
  return v;
}

// The pool token each key of this thread's rounds reads (through the block table, whose pages
// are one token long in sparse calls); -1 for a key that must not be read.
struct Fp8TileSources {
  int32_t token[kFp8Rounds];
};

__device__ __forceinline__ Fp8TileSources lookup_fp8_tile(const DecodeParams& p, const Segment& seg,
                                                          int tile_begin, int thread) {
  Fp8TileSources sources;
  CUTE_UNROLL
  for (int r = 0; r < kFp8Rounds; ++r) {
    const int token = tile_begin + fp8_key_of(thread, r);
    sources.token[r] = token < seg.token_end ? pool_token_of(p, seg.batch_idx, token) : -1;
  }
  return sources;
}

// This thread's share of pool token `token` (zeros for -1, nothing read).
__device__ __forceinline__ Fp8TokenShare load_fp8_share(const DecodeParams& p, int32_t token,
                                                        int quarter) {
  Fp8TokenShare share;
  if (token < 0) {
    CUTE_UNROLL
    for (int c = 0; c < 8; ++c) share.nope[c] = make_uint4(0, 0, 0, 0);
    share.scales = make_float4(0.f, 0.f, 0.f, 0.f);
    share.rope[0] = share.rope[1] = make_uint4(0, 0, 0, 0);
    return share;
  }
  const uint8_t* bytes =
      static_cast<const uint8_t*>(p.k_cache) + static_cast<int64_t>(token) * kFp8BytesPerToken;
  CUTE_UNROLL
  for (int c = 0; c < 8; ++c) share.nope[c] = load_stream_16(bytes + 64 * c + 16 * quarter);
  const uint4 scales = load_stream_16(bytes + kFp8NopeColumns);
  share.scales = make_float4(__uint_as_float(scales.x), __uint_as_float(scales.y),
                             __uint_as_float(scales.z), __uint_as_float(scales.w));
  CUTE_UNROLL
  for (int i = 0; i < 2; ++i)
    share.rope[i] = load_stream_16(bytes + kFp8RopeOffset + 16 * (quarter + 4 * i));
  return share;
}

// Two e4m3 codes (the low and high byte of `codes`) times `scale`, as a bf16 pair.
__device__ __forceinline__ uint32_t dequantize_pair(uint32_t codes, float scale) {
  const __half2_raw halves =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(codes), __NV_E4M3);
  const float2 values = __half22float2(__half2(halves));
  const __nv_bfloat162 pair = __floats2bfloat162_rn(values.x * scale, values.y * scale);
  return *reinterpret_cast<const uint32_t*>(&pair);
}

// Four e4m3 codes (a word) times `scale`: four bf16, half a 16-byte chunk.
__device__ __forceinline__ uint2 dequantize_quad(uint32_t codes, float scale) {
  return make_uint2(dequantize_pair(codes & 0xFFFFu, scale), dequantize_pair(codes >> 16, scale));
}

__device__ __forceinline__ void store_shared_16(uint32_t address, uint2 low, uint2 high) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(address), "r"(low.x),
               "r"(low.y), "r"(high.x), "r"(high.y)
               : "memory");
}

// This thread's share of one key of `round`, dequantized into the stage at shared-memory
// address `stage`.
template <typename KLayout>
__device__ __forceinline__ void store_fp8_share(const Fp8TokenShare& share,
                                                const Fp8StoreSlots& slots, uint32_t stage,
                                                int round) {
  const float scales[4] = {share.scales.x, share.scales.y, share.scales.z, share.scales.w};
  CUTE_UNROLL
  for (int c = 0; c < 8; ++c) {
    const float scale = scales[c * 64 / kFp8ColumnsPerScale];
    const uint4 codes = share.nope[c];
    store_shared_16(stage + fp8_nope_chunk_offset<KLayout>(slots, round, c, 0),
                    dequantize_quad(codes.x, scale), dequantize_quad(codes.y, scale));
    store_shared_16(stage + fp8_nope_chunk_offset<KLayout>(slots, round, c, 1),
                    dequantize_quad(codes.z, scale), dequantize_quad(codes.w, scale));
  }
  CUTE_UNROLL
  for (int i = 0; i < 2; ++i)
    store_shared_16(stage + fp8_rope_chunk_offset<KLayout>(slots, round, i),
                    make_uint2(share.rope[i].x, share.rope[i].y),
                    make_uint2(share.rope[i].z, share.rope[i].w));
}

// The shares of a tile's first kRoundsAhead rounds, loaded before its stage frees.
template <int kRoundsAhead>
struct Fp8RoundsAhead {
  Fp8TokenShare round[kRoundsAhead];
};

template <int kRoundsAhead>
__device__ __forceinline__ Fp8RoundsAhead<kRoundsAhead> load_fp8_rounds_ahead(
    const DecodeParams& p, const Fp8TileSources& sources, int thread) {
  static_assert(kRoundsAhead >= 1 && kRoundsAhead <= kFp8Rounds, "rounds of one tile");
  Fp8RoundsAhead<kRoundsAhead> ahead;
  CUTE_UNROLL
  for (int r = 0; r < kRoundsAhead; ++r)
    ahead.round[r] = load_fp8_share(p, sources.token[r], fp8_quarter_of(thread));
  return ahead;
}

// A tile by every producer thread into the stage at shared-memory address `stage`: the rounds
// loaded before the stage freed (`ahead`), then the others, each stored as it is converted;
// which keys exist goes to key_valid for the math warpgroups' masks. The caller publishes the
// stores.
template <typename KLayout, int kRoundsAhead>
__device__ __forceinline__ void load_tile_fp8(const DecodeParams& p, const Fp8TileSources& sources,
                                              const Fp8RoundsAhead<kRoundsAhead>& ahead,
                                              const Fp8StoreSlots& slots, uint32_t stage,
                                              uint8_t* key_valid, int thread) {
  const int quarter = fp8_quarter_of(thread);
  CUTE_UNROLL
  for (int r = 0; r < kRoundsAhead; ++r) store_fp8_share<KLayout>(ahead.round[r], slots, stage, r);
  CUTE_UNROLL
  for (int r = kRoundsAhead; r < kFp8Rounds; ++r)
    store_fp8_share<KLayout>(load_fp8_share(p, sources.token[r], quarter), slots, stage, r);
  if (quarter == 0) {
    CUTE_UNROLL
    for (int r = 0; r < kFp8Rounds; ++r) key_valid[fp8_key_of(thread, r)] = sources.token[r] >= 0;
  }
}

}  // namespace sm90
}  // namespace jax_flash_mla
