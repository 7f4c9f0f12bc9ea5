"""Registers every XLA FFI target of the compiled extension with JAX, once, at import.

The handlers carry the XLA FFI API version of the jaxlib headers they were built against. A
newer runtime loads them (the FFI is backward compatible); an older one rejects them when a
computation first runs, and the failed backend then takes every later JAX call in the process
down with it. So the import checks first and refuses with one clear error.
"""

import re

import jax
import jaxlib.version

from . import _jax_flash_mla

METADATA_TARGET = "jax_flash_mla_get_mla_metadata"
DECODE_TARGET = "jax_flash_mla_decode"
SPARSE_DECODE_TARGET = "jax_flash_mla_sparse_decode"
SPARSE_PREFILL_TARGET = "jax_flash_mla_sparse_prefill"


def version_tuple(version: str) -> tuple[int, ...]:
    """The leading numeric fields of a version string: '0.12.0.1' -> (0, 12, 0, 1),
    '0.8.0.dev20250101' -> (0, 8, 0)."""
    fields = []
    for field in version.split("."):
        match = re.match(r"\d+", field)
        if match is None:
            break
        fields.append(int(match.group()))
        if match.end() != len(field):
            break
    return tuple(fields)


def check_runtime_jaxlib(built_with: str, running: str, ffi_api: tuple[int, int]) -> None:
    """Raises ImportError when the running jaxlib is older than the one whose FFI headers the
    handlers were built against."""
    if version_tuple(running) >= version_tuple(built_with):
        return
    raise ImportError(
        f"jax_flash_mla's XLA FFI handlers were built against jaxlib {built_with} (XLA FFI API "
        f"{ffi_api[0]}.{ffi_api[1]}), but jaxlib {running} is running: a runtime older than the "
        f"handlers' headers rejects them. Install jaxlib>={built_with}, or rebuild jax-flash-mla "
        f"for this JAX (`pip install .` builds against the oldest supported jaxlib's headers; "
        f"`pip install --no-build-isolation .` against the installed one).")


def _register_all() -> None:
    for platform, targets in _jax_flash_mla.registrations().items():
        for name, capsule in targets.items():
            jax.ffi.register_ffi_target(name, capsule, platform=platform)


BUILT_WITH_JAXLIB: str = _jax_flash_mla.BUILT_WITH_JAXLIB
check_runtime_jaxlib(BUILT_WITH_JAXLIB, jaxlib.version.__version__,
                     tuple(_jax_flash_mla.XLA_FFI_API_VERSION))
_register_all()
BUILT_WITH_CUDA: bool = _jax_flash_mla.built_with_cuda()
