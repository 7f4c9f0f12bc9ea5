// The run-time to compile-time ladder every kernel launcher climbs: the element type and the
// head dim of a call become template arguments, written once here instead of as a chain of
// launch_for_element / launch_instance functions in each kernel file. The dispatch has checked
// both (bf16 or fp16; d = 576 or 512).
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

}  // namespace jax_flash_mla
