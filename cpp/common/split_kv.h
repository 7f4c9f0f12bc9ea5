// Indexing and masking rules of one split-KV step, shared by the CPU and CUDA paths.
//
// Rules for out-of-contract indices (any int32 is accepted, none is ever dereferenced out of
// bounds):
//   - a request's length is clamped to [0, max_blocks_per_seq * page_block_size];
//   - a block_table entry outside [0, num_blocks) inside a request's length makes that page's
//     tokens masked (they contribute nothing, as if absent);
//   - a split slot outside [0, num_split_slots) (metadata built from other seqlens) is skipped.
// A query row that sees no key gets out = 0 and lse = +inf.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"
#include "params.h"
#include "tile_scheduler.h"

namespace jax_flash_mla {

FMLA_HOST_DEVICE int clamped_seqlen(const DecodeParams& p, int batch_idx) {
  const int64_t capacity = static_cast<int64_t>(p.max_blocks_per_seq) * p.page_block_size;
  int64_t len = p.cache_seqlens[batch_idx];
  if (len < 0) len = 0;
  if (len > capacity) len = capacity;
  return static_cast<int>(len);
}

// Keys [0, key_limit) are visible to row `row` (0 <= row < rows_per_kv) of a request of
// length `seqlen`. Causal: query j of s_q sees keys [0, seqlen - s_q + j].
FMLA_HOST_DEVICE int key_limit_for_row(const DecodeParams& p, int seqlen, int row) {
  if (!p.causal) return seqlen;
  const int query_idx = row / p.heads_per_kv;
  const int limit = seqlen - p.seqlen_q + query_idx + 1;
  return limit < 0 ? 0 : (limit > seqlen ? seqlen : limit);
}

// The block-table entry of token `token` of request `batch_idx`, as stored (any int32).
FMLA_HOST_DEVICE int32_t block_table_entry(const DecodeParams& p, int batch_idx, int token) {
  return p.block_table[static_cast<int64_t>(batch_idx) * p.max_blocks_per_seq +
                       token / p.page_block_size];
}

// Whether a block-table entry names a page of the cache.
FMLA_HOST_DEVICE bool is_valid_page(const DecodeParams& p, int32_t entry) {
  return entry >= 0 && entry < p.num_blocks;
}

// Page holding token `token` of request `batch_idx`, or -1 when the table entry is invalid.
FMLA_HOST_DEVICE int page_of_token(const DecodeParams& p, int batch_idx, int token) {
  const int32_t page = block_table_entry(p, batch_idx, token);
  return is_valid_page(p, page) ? page : -1;
}

// Token `token` of request `batch_idx` as a token of the whole pool (page * page_block_size +
// its slot in the page), or -1 when its table entry is invalid: how the FP8 cache, one 656-byte
// row a token and one KV head, is addressed. Sparse calls have one-token pages, so there the
// table entry is the pool token itself.
FMLA_HOST_DEVICE int32_t pool_token_of(const DecodeParams& p, int batch_idx, int token) {
  const int page = page_of_token(p, batch_idx, token);
  return page < 0 ? -1 : page * p.page_block_size + token % p.page_block_size;
}

FMLA_HOST_DEVICE int64_t k_offset(const DecodeParams& p, int page, int token, int kv_head) {
  const int slot = token % p.page_block_size;
  return ((static_cast<int64_t>(page) * p.page_block_size + slot) * p.num_heads_k + kv_head) *
         p.head_dim;
}

// Row `row` of KV head `kv_head` is query token row / heads_per_kv of head
// kv_head * heads_per_kv + row % heads_per_kv.
FMLA_HOST_DEVICE int q_head_of_row(const DecodeParams& p, int kv_head, int row) {
  return kv_head * p.heads_per_kv + row % p.heads_per_kv;
}

FMLA_HOST_DEVICE int64_t q_offset(const DecodeParams& p, int batch_idx, int kv_head, int row) {
  const int query_idx = row / p.heads_per_kv;
  return ((static_cast<int64_t>(batch_idx) * p.seqlen_q + query_idx) * p.num_heads_q +
          q_head_of_row(p, kv_head, row)) *
         p.head_dim;
}

FMLA_HOST_DEVICE int64_t out_offset(const DecodeParams& p, int batch_idx, int kv_head, int row) {
  const int query_idx = row / p.heads_per_kv;
  return ((static_cast<int64_t>(batch_idx) * p.seqlen_q + query_idx) * p.num_heads_q +
          q_head_of_row(p, kv_head, row)) *
         p.head_dim_v;
}

FMLA_HOST_DEVICE int64_t lse_offset(const DecodeParams& p, int batch_idx, int kv_head, int row) {
  const int query_idx = row / p.heads_per_kv;
  return (static_cast<int64_t>(batch_idx) * p.num_heads_q + q_head_of_row(p, kv_head, row)) *
             p.seqlen_q +
         query_idx;
}

// attn_sink (sparse decode): one more logit per query head that joins the softmax's
// denominator only, so a row's final output is scaled by exp(lse) / (exp(lse) + exp(sink)) =
// 1 / (1 + exp(sink - lse)); lse itself is unchanged. 1 without a sink. Only for a row that saw
// a key (finite or NaN lse): a row that saw none stays out = 0.
FMLA_HOST_DEVICE float sink_scale(const DecodeParams& p, int kv_head, int row, float lse) {
  if (p.attn_sink == nullptr) return 1.f;
  return 1.f / (1.f + expf(p.attn_sink[q_head_of_row(p, kv_head, row)] - lse));
}

FMLA_HOST_DEVICE int64_t accum_row_index(const DecodeParams& p, int slot, int kv_head, int row) {
  return (static_cast<int64_t>(slot) * p.num_heads_k + kv_head) * p.rows_per_kv + row;
}

// One (piece, request) segment of the schedule: tiles [tile_begin, tile_end) of request
// `batch_idx`, written to split slot `slot`; `is_only_split` means it writes the final output.
struct Segment {
  int batch_idx;
  int token_begin;
  int token_end;
  int slot;
  bool is_only_split;
};

// Keys [0, limit) of the segment that row `row` (of its KV head) may see: the row's own limit
// cut at the segment's end; 0 for a row past rows_per_kv (a kernel's padding rows).
FMLA_HOST_DEVICE int segment_key_limit(const DecodeParams& p, const Segment& seg, int seqlen,
                                       int row) {
  if (row >= p.rows_per_kv) return 0;
  const int limit = key_limit_for_row(p, seqlen, row);
  return limit < seg.token_end ? limit : seg.token_end;
}

FMLA_HOST_DEVICE bool slot_in_range(const DecodeParams& p, int slot) {
  return slot >= 0 && slot < p.num_split_slots;
}

// Requests a piece touches, validated against the batch so that fabricated metadata cannot
// send a CTA outside the buffers.
FMLA_HOST_DEVICE void piece_request_range(const DecodeParams& p, const int32_t* row, int* first,
                                          int* last) {
  int begin = row[kBeginReq];
  int end = row[kEndReq];
  if (begin < 0) begin = 0;
  if (end > p.batch - 1) end = p.batch - 1;
  *first = begin;
  *last = end;
}

// A request with no split owns no slot (its first slot is the next request's): the split-KV
// step skips it, the combine writes its empty output.
FMLA_HOST_DEVICE bool request_has_splits(const DecodeParams& p, int batch_idx) {
  return p.num_splits[batch_idx + 1] - p.num_splits[batch_idx] > 0;
}

FMLA_HOST_DEVICE Segment segment_of_piece(const DecodeParams& p, const int32_t* row,
                                          int batch_idx) {
  const int seqlen = clamped_seqlen(p, batch_idx);
  const int64_t tiles = num_tiles_for_length(seqlen);
  int64_t tile_begin = batch_idx == row[kBeginReq] ? row[kBeginTile] : 0;
  int64_t tile_end = batch_idx == row[kEndReq] ? row[kEndTile] : tiles;
  // Clamped to 0 <= tile_begin <= tile_end <= tiles in 64 bits, before scaling to tokens: a
  // fabricated kBeginTile or kEndTile must not wrap a token index when it is cast to int
  // (page_of_token would then index outside the block table).
  if (tile_begin < 0) tile_begin = 0;
  if (tile_begin > tiles) tile_begin = tiles;
  if (tile_end > tiles) tile_end = tiles;
  if (tile_end < tile_begin) tile_end = tile_begin;
  Segment s;
  s.batch_idx = batch_idx;
  const int64_t token_begin = tile_begin * kTokensPerTile;
  const int64_t token_end = tile_end * kTokensPerTile;
  s.token_begin = static_cast<int>(token_begin < seqlen ? token_begin : seqlen);
  s.token_end = static_cast<int>(token_end < seqlen ? token_end : seqlen);
  const int first_slot = p.num_splits[batch_idx];
  const int splits = p.num_splits[batch_idx + 1] - first_slot;
  s.slot = first_slot + (batch_idx == row[kBeginReq] ? row[kBeginSplit] : 0);
  s.is_only_split = splits == 1;
  return s;
}

// Calls visit(segment) for each segment of the piece whose metadata row is `row`, in request
// order: the one walk over a piece, shared by the CPU path and every kernel (and both roles of
// the warp-specialized one, whose pipelines stay in step because they visit the same list).
template <typename Visit>
FMLA_HOST_DEVICE void for_each_segment(const DecodeParams& p, const int32_t* row, Visit&& visit) {
  int first, last;
  piece_request_range(p, row, &first, &last);
  for (int b = first; b <= last; ++b)
    if (request_has_splits(p, b)) visit(segment_of_piece(p, row, b));
}

// Split slots of request `batch_idx` that may be read, clamped to the buffer whatever
// num_splits holds; `splits` is the unclamped count (0: empty request, 1: no combine needed).
FMLA_HOST_DEVICE void split_slot_range(const DecodeParams& p, int batch_idx, int* begin, int* end,
                                       int* splits) {
  const int first = p.num_splits[batch_idx];
  const int next = p.num_splits[batch_idx + 1];
  *splits = next - first;
  *begin = first < 0 ? 0 : (first > p.num_split_slots ? p.num_split_slots : first);
  *end = next < *begin ? *begin : (next > p.num_split_slots ? p.num_split_slots : next);
}

}  // namespace jax_flash_mla
