// CPU split-KV decode and combine. One piece of the schedule at a time, one (request, KV head)
// segment at a time: the segment's keys are widened to float once and shared by all its
// query rows.
#include "decode_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common/split_kv.h"
#include "element_types.h"

namespace jax_flash_mla {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// Sixteen independent partial sums, so the compiler can vectorize without reassociating
// a single float sum (no -ffast-math needed).
float dot(const float* a, const float* b, int n) {
  constexpr int kLanes = 16;
  float partial[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) partial[l] += a[i + l] * b[i + l];
  }
  float sum = 0.f;
  for (int l = 0; l < kLanes; ++l) sum += partial[l];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// The larger of a and b, NaN if either is (std::max drops a NaN second argument).
float nan_max(float a, float b) {
  if (std::isnan(a)) return a;
  return std::isnan(b) || b > a ? b : a;
}

// Keys of one segment that may be read: inside the length and on a valid page.
struct SegmentKeys {
  std::vector<int> token;     // token index in the request, ascending
  std::vector<float> values;  // [token.size(), head_dim]
};

void load_segment_keys(const DecodeParams& p, const Segment& seg, int kv_head, SegmentKeys* keys) {
  keys->token.clear();
  keys->values.clear();
  for (int t = seg.token_begin; t < seg.token_end; ++t) {
    const int page = page_of_token(p, seg.batch_idx, t);
    if (page < 0) continue;
    keys->token.push_back(t);
    if (p.key_format == KeyFormat::kFp8Packed) {  // 656-byte rows, one KV head
      const size_t at = keys->values.size();
      keys->values.resize(at + p.head_dim);
      const int64_t token = pool_token_of(p, seg.batch_idx, t);
      dequantize_fp8_token(
          static_cast<const uint8_t*>(p.k_cache) + token * kFp8BytesPerToken, &keys->values[at]);
      continue;
    }
    const int64_t base = k_offset(p, page, t, kv_head);
    for (int c = 0; c < p.head_dim; ++c)
      keys->values.push_back(load_element(p.k_cache, base + c, p.dtype));
  }
}

// Softmax attention of one query row over the segment's keys, then the row's output: final
// (out, lse) when the segment is the request's only split, a float32 partial otherwise.
void attend_row(const DecodeParams& p, const Segment& seg, int kv_head, int row, int seqlen,
                const SegmentKeys& keys, std::vector<float>& q, std::vector<float>& scores,
                std::vector<float>& acc) {
  const int64_t q_base = q_offset(p, seg.batch_idx, kv_head, row);
  for (int c = 0; c < p.head_dim; ++c) q[c] = load_element(p.q, q_base + c, p.dtype);
  const int limit = key_limit_for_row(p, seqlen, row);
  const size_t visible = static_cast<size_t>(
      std::lower_bound(keys.token.begin(), keys.token.end(), limit) - keys.token.begin());

  float max_score = -kInf;
  float max_logit = -kInf;  // as max_score, but NaN sticks (sparse prefill's max_logits)
  for (size_t k = 0; k < visible; ++k) {
    scores[k] = dot(q.data(), &keys.values[k * p.head_dim], p.head_dim) * p.softmax_scale;
    max_score = std::max(max_score, scores[k]);
    max_logit = nan_max(max_logit, scores[k]);
  }
  std::fill(acc.begin(), acc.end(), 0.f);
  float sum = 0.f;
  for (size_t k = 0; k < visible; ++k) {
    const float weight = std::exp(scores[k] - max_score);
    sum += weight;
    const float* v = &keys.values[k * p.head_dim];
    for (int c = 0; c < p.head_dim_v; ++c) acc[c] += weight * v[c];
  }
  const bool saw_key = visible > 0;
  const float inv_sum = saw_key ? 1.f / sum : 0.f;
  const float lse = saw_key ? max_score + std::log(sum) : -kInf;

  if (seg.is_only_split) {
    const int64_t out_base = out_offset(p, seg.batch_idx, kv_head, row);
    const float scale = saw_key ? inv_sum * sink_scale(p, kv_head, row, lse) : 0.f;
    for (int c = 0; c < p.head_dim_v; ++c)
      store_element(p.out, out_base + c, acc[c] * scale, p.dtype);
    p.lse[lse_offset(p, seg.batch_idx, kv_head, row)] = saw_key ? lse : kInf;
    if (p.max_logits) p.max_logits[lse_offset(p, seg.batch_idx, kv_head, row)] = max_logit;
  } else if (slot_in_range(p, seg.slot)) {
    const int64_t accum_row = accum_row_index(p, seg.slot, kv_head, row);
    float* o = p.o_accum + accum_row * p.head_dim_v;
    for (int c = 0; c < p.head_dim_v; ++c) o[c] = acc[c] * inv_sum;
    p.lse_accum[accum_row] = lse;
    if (p.max_accum) p.max_accum[accum_row] = max_logit;
  }
}

void write_empty_row(const DecodeParams& p, int batch_idx, int kv_head, int row) {
  const int64_t out_base = out_offset(p, batch_idx, kv_head, row);
  for (int c = 0; c < p.head_dim_v; ++c) store_element(p.out, out_base + c, 0.f, p.dtype);
  p.lse[lse_offset(p, batch_idx, kv_head, row)] = kInf;
  if (p.max_logits) p.max_logits[lse_offset(p, batch_idx, kv_head, row)] = -kInf;
}

}  // namespace

void split_kv_decode_cpu(const DecodeParams& p) {
  SegmentKeys keys;
  std::vector<float> q(p.head_dim), acc(p.head_dim_v), scores;
  for (int part = 0; part < p.num_sm_parts; ++part) {
    const int32_t* row_meta = p.tile_scheduler_metadata + static_cast<int64_t>(part) * kMetadataInts;
    for_each_segment(p, row_meta, [&](const Segment& seg) {
      const int seqlen = clamped_seqlen(p, seg.batch_idx);
      for (int kv_head = 0; kv_head < p.num_heads_k; ++kv_head) {
        load_segment_keys(p, seg, kv_head, &keys);
        scores.resize(keys.token.size());
        for (int row = 0; row < p.rows_per_kv; ++row)
          attend_row(p, seg, kv_head, row, seqlen, keys, q, scores, acc);
      }
    });
  }
}

void combine_cpu(const DecodeParams& p) {
  std::vector<float> acc(p.head_dim_v);
  for (int b = 0; b < p.batch; ++b) {
    int slot_begin, slot_end, splits;
    split_slot_range(p, b, &slot_begin, &slot_end, &splits);
    if (splits == 1) continue;  // the split-KV step wrote the final output
    for (int kv_head = 0; kv_head < p.num_heads_k; ++kv_head) {
      for (int row = 0; row < p.rows_per_kv; ++row) {
        // A split that saw a key has a finite lse, or NaN when a key held NaN: that NaN must
        // reach the output, so emptiness is "every lse is -inf", not "the max is -inf".
        float max_lse = -kInf;
        bool saw_key = false;
        for (int s = slot_begin; s < slot_end; ++s) {
          const float split_lse = p.lse_accum[accum_row_index(p, s, kv_head, row)];
          saw_key |= split_lse != -kInf;
          max_lse = std::max(max_lse, split_lse);
        }
        if (!saw_key) {  // no split, or no split saw a key
          write_empty_row(p, b, kv_head, row);
          continue;
        }
        float sum = 0.f;
        for (int s = slot_begin; s < slot_end; ++s)
          sum += std::exp(p.lse_accum[accum_row_index(p, s, kv_head, row)] - max_lse);
        const float lse = max_lse + std::log(sum);
        const float scale = sink_scale(p, kv_head, row, lse);
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int s = slot_begin; s < slot_end; ++s) {
          const int64_t accum_row = accum_row_index(p, s, kv_head, row);
          const float weight = std::exp(p.lse_accum[accum_row] - lse);
          const float* o = p.o_accum + accum_row * p.head_dim_v;
          for (int c = 0; c < p.head_dim_v; ++c) acc[c] += weight * o[c];
        }
        const int64_t out_base = out_offset(p, b, kv_head, row);
        for (int c = 0; c < p.head_dim_v; ++c)
          store_element(p.out, out_base + c, acc[c] * scale, p.dtype);
        p.lse[lse_offset(p, b, kv_head, row)] = lse;
        if (p.max_logits) {
          float max_logit = -kInf;
          for (int s = slot_begin; s < slot_end; ++s)
            max_logit = nan_max(max_logit, p.max_accum[accum_row_index(p, s, kv_head, row)]);
          p.max_logits[lse_offset(p, b, kv_head, row)] = max_logit;
        }
      }
    }
  }
}

}  // namespace jax_flash_mla
