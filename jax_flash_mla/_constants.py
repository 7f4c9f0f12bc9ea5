"""The numbers the C++ side fixes, read from the extension in one place instead of copied.

The tile schedule (cpp/common/tile_scheduler.h) and the split-KV kernels (cpp/sm90/heuristics.h)
own them; every Python module and test that needs one imports it from here.
"""

from __future__ import annotations

from . import _jax_flash_mla

# int32 of one row of tile_scheduler_metadata, and the field each of the first ones holds.
METADATA_INTS: int = _jax_flash_mla.METADATA_INTS
METADATA_FIELDS: dict[str, int] = dict(_jax_flash_mla.METADATA_FIELDS)
# Keys a tile; what the scheduler charges a (piece, request) segment on top of its tiles.
TOKENS_PER_TILE: int = _jax_flash_mla.TOKENS_PER_TILE
FIXED_OVERHEAD_TILES: int = _jax_flash_mla.FIXED_OVERHEAD_TILES
# Query rows a CTA of the lockstep and seesaw kernels takes per KV head (a row block).
ROWS_PER_CTA: int = _jax_flash_mla.ROWS_PER_CTA
# {name: value} of the decode target's `kernel` attribute ("dispatch" lets the rules pick).
SPLIT_KV_KERNELS: dict[str, int] = dict(_jax_flash_mla.split_kv_kernels())
DISPATCH: int = SPLIT_KV_KERNELS["dispatch"]


def max_split_slots(batch: int, num_sm_parts: int) -> int:
    """Split slots (rows of the float32 partials) any schedule of this shape may use."""
    return _jax_flash_mla.max_split_slots(batch, num_sm_parts)
