"""DeepSeek-V3.2's FP8 latent cache: 656 bytes per token, the layout FlashMLA's sparse decode
reads, so that a cache quantized here reads the same in FlashMLA and the other way round.

One token of latent [576] (512 NoPE columns, then 64 RoPE columns) is stored as
  bytes [0, 512)    the NoPE columns as float8_e4m3fn, column c divided by scale[c // 128]
  bytes [512, 528)  scale[0..3], float32, little-endian (CUDA GPUs', x86's and Arm's order)
  bytes [528, 656)  the RoPE columns as bfloat16, not quantized: rotary phases need the bits
and reads back as fp8 value * scale for the NoPE columns, the bfloat16 value for the RoPE ones.

Both conversions work on any leading shape ([..., 576] <-> [..., 656]), compose with jit and
vmap, and are jitted themselves (one compile per shape when called eagerly): a page pool
[num_blocks, page_block_size, 1, 576] quantizes in one call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

LATENT_DIM = 576
NOPE_DIM = 512
ROPE_DIM = LATENT_DIM - NOPE_DIM
COLUMNS_PER_SCALE = 128
NUM_SCALES = NOPE_DIM // COLUMNS_PER_SCALE
SCALES_OFFSET = NOPE_DIM
ROPE_OFFSET = SCALES_OFFSET + 4 * NUM_SCALES
FP8_BYTES_PER_TOKEN = ROPE_OFFSET + 2 * ROPE_DIM  # 656

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
# FlashMLA's quantizer floors amax / 448 here, so an all-zero tile still gets a finite scale.
SCALE_FLOOR = 1e-4
# The dtypes a packed cache may come in: bytes, or FlashMLA's own quantizer's float8 view of them.
PACKED_DTYPES = (np.dtype(np.uint8), np.dtype(jnp.float8_e4m3fn))


def _dtype_name(x) -> str:
    return np.dtype(x.dtype).name


def _bytes_of(x) -> jax.Array:
    """The bytes of each element of x [..., n] in memory order, as [..., n * itemsize]."""
    as_bytes = jax.lax.bitcast_convert_type(x, jnp.uint8)  # [..., n, itemsize]
    return as_bytes.reshape(*x.shape[:-1], -1)


def _from_bytes(data, dtype) -> jax.Array:
    """The inverse of _bytes_of: bytes [..., n * itemsize] as [..., n] of `dtype`."""
    grouped = data.reshape(*data.shape[:-1], -1, np.dtype(dtype).itemsize)
    return jax.lax.bitcast_convert_type(grouped, dtype)


def power_of_two_scales(amax) -> jax.Array:
    """The smallest power of two s with s >= max(amax / 448, 1e-4), elementwise, float32.

    This is FlashMLA's `2 ** ceil(log2(max(amax / 448, 1e-4)))` computed exactly (frexp instead
    of a float32 log2, which rounds within an ulp of a power of two): amax / s <= 448, so no
    value of the tile overflows e4m3, and amax / s > 224 unless the floor applies, so the tile
    uses e4m3's top binade. A non-finite amax (a tile holding NaN or +-inf) gives a NaN or inf
    scale, and the whole tile reads back NaN, as it does with FlashMLA's quantizer.
    """
    ratio = jnp.maximum(jnp.asarray(amax, jnp.float32) / E4M3_MAX, jnp.float32(SCALE_FLOOR))
    mantissa, exponent = jnp.frexp(ratio)  # ratio = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = jnp.where(mantissa == 0.5, exponent - 1, exponent)  # ratio is a power of two
    return jnp.where(jnp.isfinite(ratio), jnp.ldexp(jnp.float32(1.0), exponent), ratio)


@jax.jit
def quantize_fp8_kvcache(latents) -> jax.Array:
    """Packs latents [..., 576] (any floating dtype) into the 656-byte FP8 layout, uint8
    [..., 656].

    Each group of 128 NoPE columns gets its scale from power_of_two_scales(max |x| over the
    group), and x / scale (exact: the scale is a power of two) is rounded to the nearest e4m3
    value, ties to even. The RoPE columns are rounded to bfloat16 (kept bit for bit when
    latents are bfloat16). For bfloat16 or float16 latents the bytes of finite tiles are those
    FlashMLA's quantizer writes (no such amax / 448 lies within a float32 ulp of a power of
    two, where its log2 could round).
    """
    if not hasattr(latents, "dtype") or not jnp.issubdtype(latents.dtype, jnp.floating):
        got = _dtype_name(latents) if hasattr(latents, "dtype") else type(latents).__name__
        raise TypeError(f"latents: expected a floating array [..., {LATENT_DIM}], got {got}")
    if np.ndim(latents) < 1 or latents.shape[-1] != LATENT_DIM:
        raise ValueError(f"latents: expected shape [..., {LATENT_DIM}] ({NOPE_DIM} NoPE and "
                         f"{ROPE_DIM} RoPE columns), got {tuple(np.shape(latents))}")
    leading = latents.shape[:-1]
    nope = latents[..., :NOPE_DIM].astype(jnp.float32).reshape(
        *leading, NUM_SCALES, COLUMNS_PER_SCALE)
    scales = power_of_two_scales(jnp.max(jnp.abs(nope), axis=-1))  # [..., NUM_SCALES]
    codes = (nope / scales[..., None]).astype(jnp.float8_e4m3fn).reshape(*leading, NOPE_DIM)
    rope = latents[..., NOPE_DIM:].astype(jnp.bfloat16)
    return jnp.concatenate([jax.lax.bitcast_convert_type(codes, jnp.uint8),
                            _bytes_of(scales), _bytes_of(rope)], axis=-1)


def check_packed(name: str, packed) -> None:
    """TypeError or ValueError naming `name` unless packed is uint8 or float8_e4m3fn
    [..., 656]."""
    if not hasattr(packed, "dtype") or np.dtype(packed.dtype) not in PACKED_DTYPES:
        got = _dtype_name(packed) if hasattr(packed, "dtype") else type(packed).__name__
        raise TypeError(f"{name}: expected dtype uint8 or float8_e4m3fn (the "
                        f"{FP8_BYTES_PER_TOKEN}-byte FP8 layout), got {got}")
    if np.ndim(packed) < 1 or packed.shape[-1] != FP8_BYTES_PER_TOKEN:
        raise ValueError(f"{name}: expected shape [..., {FP8_BYTES_PER_TOKEN}] (bytes per token "
                         f"of the FP8 layout), got {tuple(np.shape(packed))}")


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize_fp8_kvcache(packed, dtype=jnp.bfloat16) -> jax.Array:
    """Reads the 656-byte FP8 layout, uint8 or float8_e4m3fn [..., 656], back into latents
    [..., 576] of `dtype`.

    The product fp8 value * scale is taken in float32 and rounded once to `dtype`. With the
    power-of-two scales quantize_fp8_kvcache writes it is exact in bfloat16 too (an e4m3 value
    has 4 significant bits), so the default loses nothing; pass float32 to read caches written
    with other scales (FlashMLA's kernels round the scale to bfloat16 and multiply in
    bfloat16).
    """
    check_packed("packed", packed)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype: expected a floating dtype, got {np.dtype(dtype).name}")
    data = jax.lax.bitcast_convert_type(packed, jnp.uint8)
    leading = data.shape[:-1]
    codes = jax.lax.bitcast_convert_type(data[..., :NOPE_DIM], jnp.float8_e4m3fn)
    codes = codes.astype(jnp.float32).reshape(*leading, NUM_SCALES, COLUMNS_PER_SCALE)
    scales = _from_bytes(data[..., SCALES_OFFSET:ROPE_OFFSET], jnp.float32)
    nope = (codes * scales[..., None]).reshape(*leading, NOPE_DIM)
    rope = _from_bytes(data[..., ROPE_OFFSET:], jnp.bfloat16).astype(jnp.float32)
    return jnp.concatenate([nope, rope], axis=-1).astype(dtype)
