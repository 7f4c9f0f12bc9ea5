// The one struct passed from the FFI handlers to the CPU implementation and the CUDA kernels.
// Every buffer is dense row-major (XLA's default layout), so offsets follow from the sizes.
#pragma once

#include <cstdint>

namespace jax_flash_mla {

enum class ElementType : int { kBF16 = 0, kFP16 = 1 };

// How a key row is stored: in the dtype of q (head_dim elements), or as DeepSeek-V3.2's
// 656-byte FP8 token (bf16 queries of 576 columns, one KV head; jax_flash_mla/fp8_cache.py has
// the layout).
enum class KeyFormat : int { kSameAsQuery = 0, kFp8Packed = 1 };

// DeepSeek-V3.2's latent, what sparse decode and the FP8 cache take: 576 columns (V the first
// 512), stored in 656 bytes a token in the FP8 layout.
constexpr int kSparseHeadDim = 576;
constexpr int kFp8BytesPerToken = 656;

// The value head dim every path supports: V is the first 512 columns of a latent key row.
constexpr int kSupportedHeadDimV = 512;

struct DecodeParams {
  // Sizes.
  int batch;
  int seqlen_q;
  int num_heads_q;
  int num_heads_k;
  int heads_per_kv;         // num_heads_q / num_heads_k
  int rows_per_kv;          // seqlen_q * heads_per_kv: the M dimension of one KV head's matmuls
  int head_dim;             // 576 (or 512): length of q and k rows
  int head_dim_v;           // 512: V is the first head_dim_v columns of the cache
  int num_blocks;           // pages in the pool
  int page_block_size;      // tokens per page
  int max_blocks_per_seq;   // block_table columns
  int num_sm_parts;         // rows of tile_scheduler_metadata
  int num_split_slots;      // first dimension of o_accum / lse_accum
  ElementType dtype;        // of q, k_cache and out
  float softmax_scale;
  bool causal;

  // Sparse decode (DeepSeek-V3.2) runs on the same schedule and the same rules: each query
  // token is a request of its own (batch = b * s_q, seqlen_q = 1), its indices are its block
  // table over pages of one token (page_block_size = 1, num_blocks = the pool's tokens, so an
  // index outside the pool is an invalid page) and its topk_length is its cache_seqlens.
  KeyFormat key_format;
  const float* attn_sink;  // [num_heads_q], or nullptr: no sink

  // Inputs.
  const void* q;                           // [batch, seqlen_q, num_heads_q, head_dim]
  const void* k_cache;                     // [num_blocks, page_block_size, num_heads_k, head_dim]
  const int32_t* block_table;              // [batch, max_blocks_per_seq]
  const int32_t* cache_seqlens;            // [batch]
  const int32_t* tile_scheduler_metadata;  // [num_sm_parts, kMetadataInts]
  const int32_t* num_splits;               // [batch + 1]

  // Outputs.
  void* out;         // [batch, seqlen_q, num_heads_q, head_dim_v]
  float* lse;        // [batch, num_heads_q, seqlen_q]
  float* o_accum;    // [num_split_slots, num_heads_k, rows_per_kv, head_dim_v]
  float* lse_accum;  // [num_split_slots, num_heads_k, rows_per_kv]
  // Sparse prefill only (nullptr otherwise): each row's largest scaled score, laid out as lse,
  // and each split's, laid out as lse_accum. CPU path only so far.
  float* max_logits;
  float* max_accum;
};

}  // namespace jax_flash_mla
