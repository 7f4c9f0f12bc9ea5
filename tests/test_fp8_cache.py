"""The 656-byte FP8 latent cache of DeepSeek-V3.2: exact bytes against an independent NumPy
quantizer written from FlashMLA's formula (tests/quant.py upstream: scale = 2 **
ceil(log2(max(amax / 448, 1e-4))) per 128 NoPE columns, e4m3(x / scale), RoPE as bfloat16),
the round-trip error bound, and FP8 pages in the paged cache.

The bound: a scale s is a power of two, so x / s is exact and the only error is e4m3's rounding
of v = x / s, |v| <= 448, to nearest. e4m3 keeps 3 mantissa bits: a normal v in [2^e, 2^(e+1))
(e >= -6) sits on a grid of 2^(e-3), so its error is at most 2^(e-4) <= 2^-4 |v|; below 2^-6 the
subnormal grid is 2^-9, error at most 2^-10. Scaled back by s (exact again):
    |dequantize(quantize(x)) - x| <= max(2^-4 |x|, 2^-10 s)    for every element x.
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_flash_mla
from jax_flash_mla import cache as paged
from jax_flash_mla import fp8_cache

D = 576
BYTES = 656
SCALE_FLOOR_POWER = 2.0 ** -13  # the power of two FlashMLA's 1e-4 floor rounds up to


def numpy_quantize(latents):
    """FlashMLA's quantizer in NumPy: float32 amax / 448 (as its torch code divides), the power
    of two from a float64 log2 (exact for float32 input), ml_dtypes' e4m3 rounding."""
    x = np.asarray(latents).astype(np.float32)
    lead = x.shape[:-1]
    tiles = x[..., :512].reshape(*lead, 4, 128)
    ratio = np.maximum(np.abs(tiles).max(axis=-1) / np.float32(448), np.float32(1e-4))
    with np.errstate(invalid="ignore", divide="ignore"):
        scales = np.exp2(np.ceil(np.log2(ratio.astype(np.float64)))).astype(np.float32)
        codes = (tiles / scales[..., None]).astype(ml_dtypes.float8_e4m3fn)
    rope = np.asarray(latents)[..., 512:].astype(ml_dtypes.bfloat16)
    return np.concatenate([codes.reshape(*lead, 512).view(np.uint8),
                           np.ascontiguousarray(scales).view(np.uint8),
                           np.ascontiguousarray(rope).view(np.uint8)], axis=-1)


def numpy_dequantize(packed):
    """FlashMLA's dequantizer in NumPy, float64: e4m3 code * float32 scale, RoPE bfloat16."""
    data = np.ascontiguousarray(np.asarray(packed)).view(np.uint8)
    lead = data.shape[:-1]
    with np.errstate(invalid="ignore"):  # NaN codes and NaN RoPE read as NaN
        codes = data[..., :512].view(ml_dtypes.float8_e4m3fn).astype(np.float64)
        scales = np.ascontiguousarray(data[..., 512:528]).view(np.float32).astype(np.float64)
        rope = np.ascontiguousarray(data[..., 528:]).view(ml_dtypes.bfloat16).astype(np.float64)
        nope = codes.reshape(*lead, 4, 128) * scales[..., None]
    return np.concatenate([nope.reshape(*lead, 512), rope], axis=-1)


def scales_of(packed):
    return np.ascontiguousarray(np.asarray(packed)[..., 512:528]).view(np.float32)


def stressing_latents(rng, rows, dtype=ml_dtypes.bfloat16, spread=20):
    """Tiles of every magnitude: random per-row and per-tile exponents (|total| <= spread + 6),
    all-zero tiles, tiles whose amax is exactly 448 * 2^k (the scale boundary) or just above
    it, and values far below their tile's amax (e4m3 subnormals and zeros)."""
    x = rng.standard_normal((rows, D)) * np.exp2(rng.integers(-spread, spread + 1, (rows, 1)))
    tiles = x[:, :512].reshape(rows, 4, 128)
    tiles *= np.exp2(rng.integers(-6, 7, (rows, 4, 1)))
    tiles[rng.random((rows, 4)) < 0.1] = 0.0
    tiles[:, :, :16] *= 2.0 ** -12
    r, t = np.nonzero(rng.random((rows, 4)) < 0.3)
    power = np.exp2(rng.integers(-spread, spread // 2 + 1, r.size))[:, None]
    tiles[r, t] = np.clip(tiles[r, t], -400 * power, 400 * power)
    column = rng.integers(16, 128, r.size)
    tiles[r, t, column] = 448 * power[:, 0] * np.where(rng.random(r.size) < 0.5, 1 + 2.0 ** -7, 1)
    x[:, :512] = tiles.reshape(rows, 512)
    return x.astype(dtype)


# --- the format ----------------------------------------------------------------------------------

def test_hand_made_bytes():
    """Bytes worked out by hand from the layout: e4m3 is sign | 4 exponent bits (bias 7) | 3
    mantissa bits; scales and RoPE are little-endian."""
    x = np.zeros((2, D), np.float32)
    x[0, :4] = [1792.0, -1792.0, 4.0, 0.0]  # amax / 448 = 4: scale 4, codes 448, -448, 1, 0
    x[0, 256:258] = [56.0, 1.0]             # amax / 448 = 2^-3: scale 2^-3, codes 448, 8
    x[0, 384] = 2.0 ** -20                  # under the floor: scale 2^-13, code 2^-7 (subnormal)
    x[0, 512:514] = [1.0, -2.5]
    packed = np.asarray(jax_flash_mla.quantize_fp8_kvcache(jnp.asarray(x)))
    assert packed.shape == (2, BYTES) and packed.dtype == np.uint8
    want = np.zeros((2, BYTES), np.uint8)
    want[0, :3] = [0x7E, 0xFE, 0x38]
    want[0, 256:258] = [0x7E, 0x50]
    want[0, 384] = 0x04
    scale_bits = {4.0: [0, 0, 0x80, 0x40], 2.0 ** -3: [0, 0, 0, 0x3E],
                  2.0 ** -13: [0, 0, 0, 0x39]}
    for row, scales in enumerate([(4.0, 2.0 ** -13, 2.0 ** -3, 2.0 ** -13), (2.0 ** -13,) * 4]):
        want[row, 512:528] = sum((scale_bits[s] for s in scales), [])
    want[0, 528:532] = [0x80, 0x3F, 0x20, 0xC0]  # bfloat16 1.0 = 0x3F80, -2.5 = 0xC020
    np.testing.assert_array_equal(packed, want)
    back = np.asarray(jax_flash_mla.dequantize_fp8_kvcache(packed, jnp.float32))
    np.testing.assert_array_equal(back, x)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32],
                         ids=["bfloat16", "float16", "float32"])
def test_bytes_match_flashmla_quantizer(rng, dtype):
    spread = 4 if dtype == np.float16 else 20  # float16 overflows past 65504
    latents = stressing_latents(rng, 512, dtype, spread)
    assert np.isfinite(latents.astype(np.float32)).all()
    packed = np.asarray(jax_flash_mla.quantize_fp8_kvcache(jnp.asarray(latents)))
    np.testing.assert_array_equal(packed, numpy_quantize(latents))


def test_scale_is_the_smallest_power_of_two_that_fits(rng):
    latents = stressing_latents(rng, 512)
    scales = scales_of(jax_flash_mla.quantize_fp8_kvcache(jnp.asarray(latents)))
    mantissa, _ = np.frexp(scales)
    assert (mantissa == 0.5).all(), "a scale is not a power of two"
    amax = np.abs(latents[:, :512].astype(np.float64)).reshape(-1, 4, 128).max(axis=-1)
    assert (amax / scales <= 448).all(), "a value overflows e4m3"
    floored = scales == SCALE_FLOOR_POWER
    assert (amax[~floored] / scales[~floored] > 224).all(), "a smaller power of two fits"
    assert (amax[floored] <= 448 * SCALE_FLOOR_POWER).all()


def test_round_trip_error_bound(rng):
    """The bound in this file's docstring, element by element, for float32 latents."""
    latents = stressing_latents(rng, 1024, np.float32)
    packed = jax_flash_mla.quantize_fp8_kvcache(jnp.asarray(latents))
    back = np.asarray(jax_flash_mla.dequantize_fp8_kvcache(packed, jnp.float32), np.float64)
    x = latents.astype(np.float64)
    scale = np.repeat(scales_of(packed).astype(np.float64), 128, axis=-1)
    bound = np.maximum(2.0 ** -4 * np.abs(x[:, :512]), 2.0 ** -10 * scale)
    assert (np.abs(back[:, :512] - x[:, :512]) <= bound).all()
    np.testing.assert_array_equal(back[:, 512:], x[:, 512:].astype(ml_dtypes.bfloat16))


def test_bfloat16_read_is_exact_for_power_of_two_scales(rng):
    packed = jax_flash_mla.quantize_fp8_kvcache(jnp.asarray(stressing_latents(rng, 256)))
    as_bf16 = jax_flash_mla.dequantize_fp8_kvcache(packed)
    assert as_bf16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(as_bf16, np.float64), numpy_dequantize(packed))


def test_rope_columns_keep_their_bfloat16_bits(rng):
    rope_bits = rng.integers(0, 1 << 16, (64, 64), dtype=np.uint16)
    rope_bits[(rope_bits & 0x7F80) == 0x7F80] = 0x3F80  # no NaN or inf: they poison nothing here
    latents = np.zeros((64, D), ml_dtypes.bfloat16)
    latents[:, 512:] = rope_bits.view(ml_dtypes.bfloat16)
    packed = np.asarray(jax_flash_mla.quantize_fp8_kvcache(jnp.asarray(latents)))
    np.testing.assert_array_equal(packed[:, 528:].view(np.uint16), rope_bits)


def test_dequantize_reads_any_scale_as_flashmla_does(rng):
    """Bytes written by another quantizer (FlashMLA's earlier one stored amax / 448, not a power
    of two): every e4m3 code, finite scales of any mantissa, any bfloat16 RoPE. The float32
    product is one rounding of the exact one, as the float64 oracle rounded to float32."""
    packed = rng.integers(0, 256, (256, BYTES), dtype=np.uint8)
    scales = (rng.uniform(1, 2, (256, 4)) * np.exp2(rng.integers(-100, 100, (256, 4))))
    packed[:, 512:528] = scales.astype(np.float32).view(np.uint8)
    read = np.asarray(jax_flash_mla.dequantize_fp8_kvcache(packed, jnp.float32))
    want = numpy_dequantize(packed).astype(np.float32)
    np.testing.assert_array_equal(read, want)  # NaN codes and RoPE NaN read NaN in both
    float8_view = jnp.asarray(packed.view(ml_dtypes.float8_e4m3fn))
    np.testing.assert_array_equal(
        np.asarray(jax_flash_mla.dequantize_fp8_kvcache(float8_view, jnp.float32)), want)


@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf], ids=str)
def test_a_non_finite_value_poisons_only_its_tile(rng, poison):
    latents = rng.standard_normal((3, D)).astype(np.float32)
    latents[1, 130] = poison  # tile 1 of row 1
    back = np.asarray(jax_flash_mla.dequantize_fp8_kvcache(
        jax_flash_mla.quantize_fp8_kvcache(jnp.asarray(latents)), jnp.float32))
    assert np.isnan(back[1, 128:256]).all()
    assert np.isfinite(np.delete(back[1], np.s_[128:256])).all() and np.isfinite(back[[0, 2]]).all()


@pytest.mark.parametrize("leading", [(), (3,), (2, 3, 4)], ids=str)
def test_jit_and_vmap_on_any_leading_shape(rng, leading):
    latents = jnp.asarray(stressing_latents(rng, int(np.prod(leading)))).reshape(*leading, D)
    want = numpy_quantize(np.asarray(latents))
    packed = jax.jit(jax_flash_mla.quantize_fp8_kvcache)(latents)
    np.testing.assert_array_equal(np.asarray(packed), want)
    dequantize = functools.partial(jax_flash_mla.dequantize_fp8_kvcache, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(dequantize)(packed)), numpy_dequantize(want))
    if leading:
        vmapped = jax.vmap(jax_flash_mla.quantize_fp8_kvcache)(latents)
        np.testing.assert_array_equal(np.asarray(vmapped), want)
        np.testing.assert_array_equal(np.asarray(jax.vmap(dequantize)(packed)),
                                      numpy_dequantize(want))


@pytest.mark.parametrize("call, exception, match", [
    (lambda: jax_flash_mla.quantize_fp8_kvcache(jnp.zeros((2, 512))), ValueError,
     r"latents: expected shape \[\.\.\., 576\].*got \(2, 512\)"),
    (lambda: jax_flash_mla.quantize_fp8_kvcache(jnp.zeros((2, 576), jnp.int32)), TypeError,
     r"latents: expected a floating array.*got int32"),
    (lambda: jax_flash_mla.dequantize_fp8_kvcache(jnp.zeros((2, 576), jnp.uint8)), ValueError,
     r"packed: expected shape \[\.\.\., 656\].*got \(2, 576\)"),
    (lambda: jax_flash_mla.dequantize_fp8_kvcache(jnp.zeros((2, 656), jnp.int8)), TypeError,
     r"packed: expected dtype uint8 or float8_e4m3fn.*got int8"),
    (lambda: jax_flash_mla.dequantize_fp8_kvcache(jnp.zeros((2, 656), jnp.uint8), jnp.int32),
     TypeError, r"dtype: expected a floating dtype, got int32"),
], ids=["latents_width", "latents_int", "packed_width", "packed_int8", "dtype_int"])
def test_rejects(call, exception, match):
    with pytest.raises(exception, match=match):
        call()


# --- FP8 pages in the paged cache ----------------------------------------------------------------

NAN_BYTE = 0xFF  # every field NaN: e4m3 0xFF, float32 0xFFFFFFFF, bfloat16 0xFFFF


def poisoned(cache):
    """Every byte of the pool NaN, so that a write landing elsewhere, or a page left unwritten,
    shows."""
    return cache._replace(pool=jnp.full_like(cache.pool, NAN_BYTE))


def test_init_cache_makes_a_byte_pool():
    cache = paged.init_cache(2, 5, 16, 3, 4, dtype=jnp.uint8)
    assert cache.pool.shape == (2, 5, 16, 1, BYTES) and cache.pool.dtype == jnp.uint8
    assert cache.is_fp8 and cache.head_dim == D
    assert not paged.init_cache(2, 5, 16, 3, 4).is_fp8
    np.testing.assert_array_equal(np.asarray(fp8_cache.dequantize_fp8_kvcache(cache.pool)), 0)
    with pytest.raises(ValueError, match=r"head_dim: expected 576 with dtype uint8.*got 512"):
        paged.init_cache(2, 5, 16, 3, 4, head_dim=512, dtype=jnp.uint8)
    with pytest.raises(TypeError, match=r"dtype: expected .*uint8.*got float8_e4m3fn"):
        paged.init_cache(2, 5, 16, 3, 4, dtype=jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"cache\.pool: expected 656 bytes .*got shape"):
        paged.reserve(cache._replace(pool=cache.pool[..., :576]), jnp.zeros((3,), jnp.int32))


def test_written_pages_hold_the_quantized_latents(rng):
    """Tokens land where the block table says, as quantize_fp8_kvcache bytes; every other byte
    of the pool (other layers, unused pages, rows past seqlens) keeps its NaN."""
    cache = poisoned(paged.init_cache(2, 8, 4, 3, 3, dtype=jnp.uint8))
    counts = jnp.asarray([5, 0, 3], jnp.int32)
    cache, ok = jax.jit(paged.reserve)(cache, counts)
    paged.check(ok, "reserve")
    latents = stressing_latents(rng, 3 * 5).reshape(3, 5, D)
    cache, ok = jax.jit(paged.write_latents)(cache, 1, jnp.asarray(latents), counts)
    paged.check(ok, "write_latents")
    want = np.full(cache.pool.shape, NAN_BYTE, np.uint8)
    table = np.asarray(cache.block_table)
    for r, n in enumerate(np.asarray(counts)):
        for t in range(n):
            want[1, table[r, t // 4], t % 4, 0] = numpy_quantize(latents[r, t])
    np.testing.assert_array_equal(np.asarray(cache.pool), want)
    pages = np.asarray(fp8_cache.dequantize_fp8_kvcache(cache.pool[1, table[0, :2]], jnp.float32))
    np.testing.assert_array_equal(pages.reshape(8, D)[:5],
                                  numpy_dequantize(numpy_quantize(latents[0])))


STEPS = 60
INT32_MAX = int(np.iinfo(np.int32).max)


def test_fp8_pool_follows_the_float_pool_step_by_step(rng):
    """The same random updates (invalid ones among them: negative counts, counts past the
    capacity or that wrap int32, writes without pages, traced layers out of range, an
    exhausted pool) on a float32 cache, whose behavior tests/test_cache_invariants.py checks
    against a model, and on an FP8 one: the same flags and tables after every step, and the FP8
    pool holds exactly the quantized float32 pool where it was written, NaN bytes elsewhere."""
    shape = (2, 7, 4, 3, 3)
    caches = {"float": paged.init_cache(*shape, D, jnp.float32), "fp8": paged.init_cache(
        *shape, dtype=jnp.uint8)}
    caches["float"] = caches["float"]._replace(pool=jnp.full_like(caches["float"].pool, np.nan))
    caches["fp8"] = poisoned(caches["fp8"])
    updates = {"reserve": jax.jit(paged.reserve), "write": jax.jit(paged.write_latents),
               "advance": jax.jit(paged.advance), "free": jax.jit(paged.free)}
    for step in range(STEPS):
        op = rng.choice(list(updates), p=[0.3, 0.35, 0.2, 0.15])
        counts = rng.integers(-1, 5, 3)
        counts[rng.random(3) < 0.05] = INT32_MAX
        counts = jnp.asarray(counts, jnp.int32)
        if op == "write":
            args = (jnp.int32(rng.integers(-1, 3)),
                    jnp.asarray(rng.standard_normal((3, 3, D)), jnp.float32), counts)
        elif op == "free":
            args = (jnp.asarray(rng.random(3) < 0.3),)
        else:
            args = (counts,)
        results = {}
        for kind, cache in caches.items():
            result = updates[op](cache, *args)
            caches[kind], results[kind] = result if op != "free" else (result, None)
        if results["float"] is not None:
            np.testing.assert_array_equal(np.asarray(results["fp8"]),
                                          np.asarray(results["float"]), err_msg=f"{step} {op}")
        for name in ("block_table", "seqlens", "page_owner"):
            np.testing.assert_array_equal(np.asarray(getattr(caches["fp8"], name)),
                                          np.asarray(getattr(caches["float"], name)),
                                          err_msg=f"{step} {op} {name}")
        float_pool = np.asarray(caches["float"].pool)
        fp8_pool = np.asarray(caches["fp8"].pool)
        written = ~np.isnan(float_pool).all(axis=-1)
        assert (fp8_pool[~written] == NAN_BYTE).all(), f"step {step} ({op}) wrote elsewhere"
        np.testing.assert_array_equal(fp8_pool[written], numpy_quantize(float_pool[written]),
                                      err_msg=f"step {step} ({op})")
