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
// A segment's tiles are one stream of rounds through each producer thread's registers
// (Fp8KeyStream): a round's bytes are loaded kAhead rounds before the round is stored, each
// 16-byte chunk as soon as the chunk before it in the same registers is stored, across tile
// boundaries, and the pool tokens a tile reads (the block table's or the sparse indices'
// entries) are looked up a tile before its bytes are loaded. So no table read sits between two
// tiles and a tile's gather overlaps the conversion of the one before (kAhead: one round, in
// the lockstep kernel's one producer warpgroup and in each of the transposed kernel's two,
// every one of which gives registers to the math warpgroups). What bounds the FP8 rows is
// each producer warp working through this stream, ~1 100 instructions a tile with its loads'
// latency exposed inside it (docs/design.md): more bytes in flight (L2 prefetches, a raw tile
// in shared memory) and fewer conversion instructions measured no faster, more converting
// warps (the transposed kernel's second producer warpgroup) 12% faster.
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

// The pool token the key of this thread's round `round` of the tile at `tile_begin` reads
// (through the block table, whose pages are one token long in sparse calls); -1 for a key that
// must not be read.
__device__ __forceinline__ int32_t lookup_fp8_key(const DecodeParams& p, const Segment& seg,
                                                  int tile_begin, int round, int thread) {
  const int token = tile_begin + fp8_key_of(thread, round);
  return token < seg.token_end ? pool_token_of(p, seg.batch_idx, token) : -1;
}

__device__ __forceinline__ const uint8_t* fp8_token_bytes(const DecodeParams& p, int32_t token) {
  return static_cast<const uint8_t*>(p.k_cache) + static_cast<int64_t>(token) * kFp8BytesPerToken;
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
  const uint8_t* bytes = fp8_token_bytes(p, token);
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

// This thread's share of one key of `round` (`share`), dequantized into the stage at
// shared-memory address `stage`, while the same registers take the share of pool token `next`
// (zeros for -1, nothing read): each 16-byte chunk's load goes out as soon as the chunk it
// replaces is stored, so the next round's gather overlaps this round's conversion. The scales
// go last: every NoPE chunk of this round needs them.
template <typename KLayout>
__device__ __forceinline__ void store_and_refill(Fp8TokenShare& share, const Fp8StoreSlots& slots,
                                                 uint32_t stage, int round, const DecodeParams& p,
                                                 int32_t next, int quarter) {
  const bool reads = next >= 0;
  const uint8_t* bytes = fp8_token_bytes(p, reads ? next : 0);
  const uint4 zero = make_uint4(0, 0, 0, 0);
  const float scales[4] = {share.scales.x, share.scales.y, share.scales.z, share.scales.w};
  CUTE_UNROLL
  for (int c = 0; c < 8; ++c) {
    const float scale = scales[c * 64 / kFp8ColumnsPerScale];
    const uint4 codes = share.nope[c];
    store_shared_16(stage + fp8_nope_chunk_offset<KLayout>(slots, round, c, 0),
                    dequantize_quad(codes.x, scale), dequantize_quad(codes.y, scale));
    store_shared_16(stage + fp8_nope_chunk_offset<KLayout>(slots, round, c, 1),
                    dequantize_quad(codes.z, scale), dequantize_quad(codes.w, scale));
    share.nope[c] = reads ? load_stream_16(bytes + 64 * c + 16 * quarter) : zero;
  }
  CUTE_UNROLL
  for (int i = 0; i < 2; ++i) {
    store_shared_16(stage + fp8_rope_chunk_offset<KLayout>(slots, round, i),
                    make_uint2(share.rope[i].x, share.rope[i].y),
                    make_uint2(share.rope[i].z, share.rope[i].w));
    share.rope[i] = reads ? load_stream_16(bytes + kFp8RopeOffset + 16 * (quarter + 4 * i)) : zero;
  }
  const uint4 next_scales = reads ? load_stream_16(bytes + kFp8NopeColumns) : zero;
  share.scales = make_float4(__uint_as_float(next_scales.x), __uint_as_float(next_scales.y),
                             __uint_as_float(next_scales.z), __uint_as_float(next_scales.w));
}

// A segment's FP8 key tiles through one producer thread's registers, as a stream of rounds in
// tile order: kRoundsMine of each tile's kFp8Rounds (every one with one producer warpgroup;
// with several, warpgroup `part` takes rounds part, part + kFp8Rounds / kRoundsMine, ...). The
// stream's round g is in the registers of slot g % kAhead, loaded while round g - kAhead was
// stored; the pool tokens of the tile after the current one are looked up when the current
// one's are first used, a tile before their loads.
template <int kAhead, int kRoundsMine = kFp8Rounds>
class Fp8KeyStream {
  static_assert(kFp8Rounds % kRoundsMine == 0, "each producer warpgroup the same rounds a tile");
  static_assert(kAhead >= 1 && kAhead <= kRoundsMine && kRoundsMine % kAhead == 0,
                "whole tiles of rounds in flight, at most one tile");
  static constexpr int kRoundStep = kFp8Rounds / kRoundsMine;

 public:
  // Tile 0's tokens (looked up), tile 1's (in flight) and tile 0's first kAhead rounds (in
  // flight): the segment's one exposed table read.
  __device__ __forceinline__ Fp8KeyStream(const DecodeParams& p, const Segment& seg, int thread,
                                          int part = 0)
      : first_round_(part) {
    CUTE_UNROLL
    for (int i = 0; i < kRoundsMine; ++i) {
      token_[i] = lookup_fp8_key(p, seg, tile_begin_of(seg, 0), round_of(i), thread);
      next_token_[i] = lookup_fp8_key(p, seg, tile_begin_of(seg, 1), round_of(i), thread);
    }
    CUTE_UNROLL
    for (int k = 0; k < kAhead; ++k) share_[k] = load_fp8_share(p, token_[k], fp8_quarter_of(thread));
  }

  // Tile `tile` (the stream's next) into the stage at shared-memory address `stage`, free:
  // the caller waited. Each round is stored as it is converted while its registers take the
  // round kAhead after it (a round of the next tile, zeros past the segment); which keys exist
  // goes to key_valid for the math warpgroups' masks; then the tile after next is looked up.
  // The caller publishes the stores.
  template <typename KLayout>
  __device__ __forceinline__ void store_tile(const DecodeParams& p, const Segment& seg, int tile,
                                             const Fp8StoreSlots& slots, uint32_t stage,
                                             uint8_t* key_valid, int thread) {
    const int quarter = fp8_quarter_of(thread);
    CUTE_UNROLL
    for (int i = 0; i < kRoundsMine; ++i) {
      const int refill = i + kAhead;  // rounds of this tile, then the next tile's
      const int32_t next =
          refill < kRoundsMine ? token_[refill] : next_token_[refill - kRoundsMine];
      store_and_refill<KLayout>(share_[i % kAhead], slots, stage, round_of(i), p, next, quarter);
    }
    if (quarter == 0) {
      CUTE_UNROLL
      for (int i = 0; i < kRoundsMine; ++i)
        key_valid[fp8_key_of(thread, round_of(i))] = token_[i] >= 0;
    }
    CUTE_UNROLL
    for (int i = 0; i < kRoundsMine; ++i) {
      token_[i] = next_token_[i];
      next_token_[i] = lookup_fp8_key(p, seg, tile_begin_of(seg, tile + 2), round_of(i), thread);
    }
  }

 private:
  // Compile-time where one warpgroup takes every round, as before there were several.
  __device__ __forceinline__ int round_of(int i) const {
    return kRoundStep == 1 ? i : first_round_ + i * kRoundStep;
  }

  int first_round_;
  Fp8TokenShare share_[kAhead];
  int32_t token_[kRoundsMine];       // the pool tokens of the tile stored next
  int32_t next_token_[kRoundsMine];  // of the tile after it
};

}  // namespace sm90
}  // namespace jax_flash_mla
