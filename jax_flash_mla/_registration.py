"""Registers every XLA FFI target of the compiled extension with JAX, once, at import."""

import jax

from . import _jax_flash_mla

METADATA_TARGET = "jax_flash_mla_get_mla_metadata"
DECODE_TARGET = "jax_flash_mla_decode"


def _register_all() -> None:
    for platform, targets in _jax_flash_mla.registrations().items():
        for name, capsule in targets.items():
            jax.ffi.register_ffi_target(name, capsule, platform=platform)


_register_all()
BUILT_WITH_CUDA: bool = _jax_flash_mla.built_with_cuda()
