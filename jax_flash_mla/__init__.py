"""jax-flash-mla: paged Multi-head Latent Attention decode for JAX, as XLA FFI custom calls."""

from . import batching, reference, sharding  # the vmap rules and the decode's lowering
from ._registration import BUILT_WITH_CUDA
from .api import MLAMetadata, flash_mla_with_kvcache, get_mla_metadata
from .fp8_cache import dequantize_fp8_kvcache, quantize_fp8_kvcache
from .sparse_prefill import flash_mla_sparse_fwd

__all__ = [
    "BUILT_WITH_CUDA",
    "MLAMetadata",
    "dequantize_fp8_kvcache",
    "flash_mla_sparse_fwd",
    "flash_mla_with_kvcache",
    "get_mla_metadata",
    "quantize_fp8_kvcache",
    "reference",
]
__version__ = "0.1.0"
