// The run-time to compile-time ladder every kernel launcher climbs: the element type, the head
// dim and the key format of a call become template arguments, written once here instead of as
// a chain of launch_for_element / launch_instance functions in each kernel file. The dispatch
// has checked them (bf16 or fp16; d = 576 or 512; FP8 keys only with bf16, d = 576 and one KV
// head).
#pragma once

#include <cutlass/numeric_types.h>

#include <type_traits>

#include "../common/params.h"

namespace jax_flash_mla {

// f(cutlass::bfloat16_t{}) or f(cutlass::half_t{}): the element as a value of its type.
template <typename F>
auto with_element_type(ElementType dtype, F&& f) {
  return dtype == ElementType::kBF16 ? f(cutlass::bfloat16_t{}) : f(cutlass::half_t{});
}

template <int kValue>
using IntConstant = std::integral_constant<int, kValue>;

// f(IntConstant<576>{}) or f(IntConstant<512>{}).
template <typename F>
auto with_head_dim(int head_dim, F&& f) {
  return head_dim == 576 ? f(IntConstant<576>{}) : f(IntConstant<512>{});
}

template <KeyFormat kFormat>
using KeyFormatConstant = std::integral_constant<KeyFormat, kFormat>;

// f(element, head dim, key format) for a call of the kernels that gather through the key
// producer (key_tile_producer.h). FP8 keys come only with bf16 queries of 576 columns, so
// they add one instance, not four: an instance of its own, so that the producer's
// FP8 path and its other paths do not share one register budget.
template <typename F>
auto with_key_instance(const DecodeParams& p, F&& f) {
  if (p.key_format == KeyFormat::kFp8Packed)
    return f(cutlass::bfloat16_t{}, IntConstant<576>{},
             KeyFormatConstant<KeyFormat::kFp8Packed>{});
  return with_element_type(p.dtype, [&](auto element) {
    return with_head_dim(p.head_dim, [&](auto head_dim) {
      return f(element, head_dim, KeyFormatConstant<KeyFormat::kSameAsQuery>{});
    });
  });
}

}  // namespace jax_flash_mla
