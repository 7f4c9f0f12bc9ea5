#include "../common/tile_scheduler.h"
#include "decode_cpu.h"

namespace jax_flash_mla {

void tile_schedule_cpu(const int32_t* cache_seqlens, int batch, int num_sm_parts,
                       int32_t* tile_scheduler_metadata, int32_t* num_splits) {
  build_tile_schedule(cache_seqlens, batch, num_sm_parts, tile_scheduler_metadata, num_splits);
}

}  // namespace jax_flash_mla
