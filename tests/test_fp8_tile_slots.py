"""The FP8 key producer's shared-memory arithmetic (cpp/sm90/fp8_tile_slots.h) on the host:
every 16-byte chunk of a 64-key tile, placed through the producer's slots and constant steps
as the kernels compose them, must land where CuTe's tensor over the tile's swizzled layout puts
it, and every chunk must be stored by some thread. A wrong swizzle (evaluating the layout on
its own, which swizzles element offsets instead of byte addresses, misplaced 3456 of the 4608)
corrupts keys without any error. CUDA builds only (the layout is CuTe's); CI builds them."""

import pytest

from jax_flash_mla import BUILT_WITH_CUDA
from jax_flash_mla._registration import _jax_flash_mla


@pytest.mark.skipif(not BUILT_WITH_CUDA, reason="the check is compiled with the CUDA kernels")
def test_every_fp8_chunk_lands_where_the_layout_says():
    check = _jax_flash_mla.fp8_tile_slot_check()
    assert check == {"mismatches": 0, "uncovered": 0, "chunks": 64 * 576 // 8}, check
