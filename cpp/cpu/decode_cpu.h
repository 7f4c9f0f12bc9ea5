// The CPU implementation of the split-KV schedule: correct, not fast. It walks the same
// metadata, writes the same partials and merges them with the same combine as the CUDA path.
#pragma once

#include <cstdint>

#include "../common/params.h"

namespace jax_flash_mla {

void split_kv_decode_cpu(const DecodeParams& params);
void combine_cpu(const DecodeParams& params);

}  // namespace jax_flash_mla
