// The TMA descriptor of the query, built on the host for each call, so that one producer thread
// stages a CTA's query rows with a few bulk copies instead of 128 threads issuing 16-byte
// cp.async copies (36 each for 64 rows at d = 576; a device trace measured ~7 us just to issue
// them under load, while the math warpgroups waited ~9 us for the rows of every segment).
//
// q [batch, seqlen_q, num_heads_q, head_dim] is seen as a 5-D tensor
//     (head_dim, heads_per_kv, num_heads_k, seqlen_q, batch)
// so that query row r of KV head g (token r / heads_per_kv, head g * heads_per_kv +
// r % heads_per_kv, as q_offset in split_kv.h) is the 2-D index (r % heads_per_kv,
// r / heads_per_kv) of that head's (heads_per_kv, seqlen_q) slice. A box of (64 columns,
// box_heads, 1, box_tokens, 1) lands as box_heads x box_tokens = query_rows consecutive
// 128-byte rows, heads fastest, which is the order of the rows in shared memory; with the
// 128-byte swizzle they are exactly the layout the cp.async path writes (TileLayouts::Q in
// pipeline_traits.h, whose 64-column blocks each hold the query_rows rows contiguously).
//
// A CTA stages rows [row_base, row_base + query_rows), row_base a multiple of query_rows. A
// box is one rectangle of that (heads, tokens) slice, so TMA can express the rows only when
//   - heads_per_kv % query_rows == 0: box (64, query_rows, 1, 1, 1), a run of heads of one
//     token (never past rows_per_kv: it is a multiple of heads_per_kv, so of query_rows), or
//   - query_rows % heads_per_kv == 0: box (64, heads_per_kv, 1, query_rows / heads_per_kv, 1),
//     whole tokens; tokens past seqlen_q are out of range and TMA writes zeros for them, the
//     zero rows past rows_per_kv that the cp.async path fills.
// In both cases the box starts at (column, row_base % heads_per_kv, kv_head,
// row_base / heads_per_kv, batch) (the head coordinate is 0 in the second), so the kernel does
// not need to know which one the map holds. Other head counts (48, 63, ...) would need several
// boxes of different shapes: they keep the cp.async path.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "../common/params.h"
#include "paged_kv_tensor_map.h"

namespace jax_flash_mla {

// Box heads and tokens that cover query_rows rows, or false when no single box does.
inline bool query_box(int heads_per_kv, int query_rows, int* box_heads, int* box_tokens) {
  if (heads_per_kv <= 0 || query_rows <= 0) return false;
  if (heads_per_kv % query_rows == 0) {
    *box_heads = query_rows;
    *box_tokens = 1;
  } else if (query_rows % heads_per_kv == 0) {
    *box_heads = heads_per_kv;
    *box_tokens = query_rows / heads_per_kv;
  } else {
    return false;
  }
  return true;
}

// Dimension strides of q in bytes (dims 1-4: a head, a KV head's group of heads, a token, a
// request; dense, so each stride is the previous one times that dimension's size).
struct QueryStrides {
  cuuint64_t bytes[4];
};

inline QueryStrides query_strides(const DecodeParams& p) {
  const cuuint64_t row_bytes = static_cast<cuuint64_t>(p.head_dim) * 2;
  return {{row_bytes, row_bytes * p.heads_per_kv, row_bytes * p.num_heads_q,
           row_bytes * p.num_heads_q * p.seqlen_q}};
}

// Whether one TMA box covers query_rows rows of this q: a head count a single box covers, and
// sizes, strides and an address cuTensorMapEncodeTiled accepts. Otherwise the kernel copies the
// rows with cp.async.
inline bool query_fits_tma(const DecodeParams& p, int query_rows) {
  int box_heads = 0, box_tokens = 0;
  if (!query_box(p.heads_per_kv, query_rows, &box_heads, &box_tokens)) return false;
  // Every box dimension is at most 256 elements, the 64 columns are 128 bytes (the swizzle
  // span, and a multiple of 16 bytes), and the rows the box lands as must fill whole 1024-byte
  // swizzle periods (8 rows) so that each 64-column block starts on one.
  if (box_heads > 256 || box_tokens > 256 || query_rows % 8 != 0) return false;
  if (p.head_dim % 64 != 0 || p.num_heads_k <= 0 || p.seqlen_q <= 0 || p.batch <= 0 ||
      static_cast<int64_t>(p.heads_per_kv) * p.num_heads_k != p.num_heads_q)
    return false;
  // The global address must be 16-byte aligned, the strides multiples of 16 bytes below 2^40.
  if (reinterpret_cast<uintptr_t>(p.q) % 16 != 0) return false;
  for (cuuint64_t stride : query_strides(p).bytes)
    if (stride % 16 != 0 || stride >= (cuuint64_t{1} << 40)) return false;
  return true;
}

// False when TMA cannot stage query_rows rows of this q (query_fits_tma) or the driver refuses
// the map: the caller copies the rows with cp.async.
inline bool make_query_tensor_map(const DecodeParams& p, int query_rows, CUtensorMap* map) {
  if (!query_fits_tma(p, query_rows)) return false;
  int box_heads = 0, box_tokens = 0;
  query_box(p.heads_per_kv, query_rows, &box_heads, &box_tokens);
  const QueryStrides strides = query_strides(p);
  const cuuint64_t sizes[5] = {
      static_cast<cuuint64_t>(p.head_dim), static_cast<cuuint64_t>(p.heads_per_kv),
      static_cast<cuuint64_t>(p.num_heads_k), static_cast<cuuint64_t>(p.seqlen_q),
      static_cast<cuuint64_t>(p.batch)};
  const cuuint32_t box[5] = {64, static_cast<cuuint32_t>(box_heads), 1,
                             static_cast<cuuint32_t>(box_tokens), 1};
  // Out-of-range tokens (past seqlen_q) read as zeros: rows that no query owns stay finite, so
  // their scores are finite and masked like any other row past rows_per_kv.
  return encode_swizzled_tensor_map(p.dtype, p.q, sizes, strides.bytes, box, map);
}

}  // namespace jax_flash_mla
