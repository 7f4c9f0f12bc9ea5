// Which bytes of a 64-key FP8 tile each of the producer warpgroup's threads gathers, and where
// its 16-byte chunks of bf16 go in the tile's 128-byte-swizzled shared-memory layout
// (key_tile_dequant.h does the loads, the conversion and the stores). Host and device code:
// the module's host check (fp8_tile_slot_mismatches) walks every chunk of a tile through these
// functions and compares each address with the one CuTe's tensor over the layout gives.
//
// Four threads share a token and a warp takes eight (32 a round of the warpgroup, two rounds a
// tile). Thread `quarter` of a token holds
//   NoPE bytes [64 c + 16 quarter, +16), c = 0..7: columns 64 c + 16 quarter .. +15,
//   the four scales (bytes 512-527),
//   RoPE bytes [528 + 16 (quarter + 4 i), +16), i = 0, 1: columns 512 + 8 (quarter + 4 i) .. +7.
// One store instruction of a warp then writes eight keys (eight swizzle rows) by four quarters:
// each 16-byte bank group four times, the fewest a 512-byte store can take.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include <cstdint>

#include "../common/host_device.h"
#include "../common/params.h"
#include "pipeline_traits.h"

namespace jax_flash_mla {
namespace sm90 {

constexpr int kFp8ThreadsPerToken = 4;
constexpr int kFp8TokensPerRound = kProducerThreads / kFp8ThreadsPerToken;  // 32
constexpr int kFp8Rounds = kBlockN / kFp8TokensPerRound;                     // 2
constexpr int kFp8NopeColumns = 512;  // one byte a column, so also the scales' offset
constexpr int kFp8ScaleBytes = 16;
constexpr int kFp8RopeOffset = kFp8NopeColumns + kFp8ScaleBytes;  // 528
constexpr int kFp8ColumnsPerScale = 128;
static_assert(kFp8RopeOffset + 64 * 2 == kFp8BytesPerToken, "the V3.2 token layout");

// The key of the tile that thread `thread` loads in `round`, and its quarter of the token.
FMLA_HOST_DEVICE int fp8_key_of(int thread, int round) {
  return round * kFp8TokensPerRound + (thread / 32) * 8 + thread % 8;
}
FMLA_HOST_DEVICE int fp8_quarter_of(int thread) { return (thread % 32) / 8; }

// Where a thread's 16-byte chunks go in a stage, as byte offsets from the stage's start, for
// its first round's key: its two NoPE chunks of column block 0 and its two RoPE chunks. Every
// other chunk is a constant step away (fp8_step_bytes): the 128-byte swizzle permutes a row's
// chunks by bits 7-9 of the byte address (the key's row in its 8-key atom), and the steps from
// column block to column block and from round to round are multiples of the 1 KiB atom, which
// leave those bits alone.
struct Fp8StoreSlots {
  uint32_t nope[2];  // columns 16 quarter and 16 quarter + 8
  uint32_t rope[2];  // columns 512 + 8 quarter and 512 + 8 (quarter + 4)
};

// The slots, read off the tile's layout as the math warpgroups see it: a tensor over `stage`
// (any stage: they all start on 1 KiB boundaries), whose swizzle acts on the byte address
// (CuTe applies a GMMA atom's swizzle through the shared-memory pointer, so the layout must be
// evaluated through a tensor, not on its own: on its own it swizzles element offsets).
template <typename KLayout>
FMLA_HOST_DEVICE Fp8StoreSlots fp8_store_slots(cutlass::bfloat16_t* stage, int thread) {
  Tensor tile = make_tensor(make_smem_ptr(stage), KLayout{});
  const int key = fp8_key_of(thread, 0);
  const int quarter = fp8_quarter_of(thread);
  const auto bytes = [&](int column) {
    return static_cast<uint32_t>(reinterpret_cast<const char*>(&tile(key, column)) -
                                 reinterpret_cast<const char*>(stage));
  };
  return {{bytes(16 * quarter), bytes(16 * quarter + kChunkElems)},
          {bytes(kFp8NopeColumns + kChunkElems * quarter),
           bytes(kFp8NopeColumns + kChunkElems * (quarter + 4))}};
}

// The byte step from (0, 0) to (key, column) of a tile, from the layout without its swizzle:
// the same as with it for the steps used here, multiples of the 1 KiB swizzle atom (checked).
template <typename KLayout, int kKey, int kColumn>
constexpr uint32_t fp8_step_bytes() {
  constexpr int step = KLayout{}.layout_b()(Int<kKey>{}, Int<kColumn>{}) *
                       static_cast<int>(sizeof(cutlass::bfloat16_t));
  static_assert(step % 1024 == 0, "a step the swizzle does not commute with");
  return step;
}

// Byte offsets in a stage of this thread's chunks of `round`: NoPE chunk `half` of column block
// `block` (columns 64 block + 16 quarter + 8 half ..), and RoPE chunk `i`.
template <typename KLayout>
FMLA_HOST_DEVICE uint32_t fp8_nope_chunk_offset(const Fp8StoreSlots& slots, int round,
                                                int block, int half) {
  return slots.nope[half] + block * fp8_step_bytes<KLayout, 0, 64>() +
         round * fp8_step_bytes<KLayout, kFp8TokensPerRound, 0>();
}

template <typename KLayout>
FMLA_HOST_DEVICE uint32_t fp8_rope_chunk_offset(const Fp8StoreSlots& slots, int round, int i) {
  return slots.rope[i] + round * fp8_step_bytes<KLayout, kFp8TokensPerRound, 0>();
}

}  // namespace sm90
}  // namespace jax_flash_mla
