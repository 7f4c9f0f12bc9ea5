"""The paged latent cache: pages handed out on the device, latents written in place, clear
failures that never touch another request's pages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash_mla
from jax_flash_mla import cache as paged

D = 576


def small_cache(num_blocks=12, page=4, requests=3, max_blocks=4, layers=2):
    return paged.init_cache(layers, num_blocks, page, requests, max_blocks, D, jnp.float32)


def append(cache, rng, counts):
    """Reserves, writes random latents for both layers, advances; returns what was written."""
    counts = jnp.asarray(counts, jnp.int32)
    cache, ok = paged.reserve(cache, counts)
    paged.check(ok, "reserve")
    written = []
    for layer in range(cache.pool.shape[0]):
        latents = jnp.asarray(rng.standard_normal((cache.seqlens.shape[0], int(counts.max()), D)),
                              jnp.float32)
        cache, ok = paged.write_latents(cache, layer, latents, counts)
        paged.check(ok, "write_latents")
        written.append(latents)
    cache, ok = paged.advance(cache, counts)
    paged.check(ok, "advance")
    return cache, written


def dense_tokens(cache, layer, request):
    """The request's cached tokens, read back through its block table."""
    n = int(cache.seqlens[request])
    table = np.asarray(cache.block_table[request])
    pool = np.asarray(cache.pool[layer, :, :, 0])
    return np.stack([pool[table[t // cache.page_block_size], t % cache.page_block_size]
                     for t in range(n)]) if n else np.zeros((0, D))


def test_appends_land_in_order_and_pages_are_exclusive(rng):
    cache = small_cache()
    history = [[[] for _ in range(3)] for _ in range(2)]
    for counts in ([3, 0, 5], [2, 4, 1], [1, 1, 1]):
        cache, written = append(cache, rng, counts)
        for layer in range(2):
            for r, c in enumerate(counts):
                history[layer][r].extend(np.asarray(written[layer][r, :c]))
    for layer in range(2):
        for r in range(3):
            np.testing.assert_array_equal(dense_tokens(cache, layer, r),
                                          np.array(history[layer][r]).reshape(-1, D))
    pages = np.asarray(cache.block_table)
    used = pages[pages >= 0]
    assert len(used) == len(set(used)), "a page was handed to two requests"
    owner = np.asarray(cache.page_owner)
    for r in range(3):
        assert (owner[pages[r][pages[r] >= 0]] == r).all()


def assert_unchanged(before, after):
    """Every array of the cache bit-for-bit as it was."""
    for name, x, y in zip(paged.PagedLatentCache._fields, before, after):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name, strict=True)


def test_exhausted_pool_changes_nothing(rng):
    cache, _ = append(small_cache(num_blocks=3, page=4), rng, [4, 4, 0])
    after, ok = paged.reserve(cache, jnp.asarray([0, 0, 8], jnp.int32))  # needs 2, 1 free
    assert not bool(ok[2])
    assert_unchanged(cache, after)
    with pytest.raises(ValueError, match=r"reserve: failed for requests \[0, 1, 2\]"):
        paged.check(ok, "reserve")


def test_one_request_past_capacity_refuses_every_request(rng):
    """All-or-nothing: the requests that fit get no page either."""
    cache = small_cache(max_blocks=2, page=4)
    after, ok = paged.reserve(cache, jnp.asarray([9, 8, 0], jnp.int32))
    np.testing.assert_array_equal(np.asarray(ok), [False, False, False])
    assert_unchanged(cache, after)


@pytest.mark.parametrize("count", [-1, np.iinfo(np.int32).max], ids=["negative", "int32_max"])
def test_counts_no_request_can_take_are_refused(rng, count):
    """A negative count, and one whose sum with the cached length wraps around int32."""
    cache, _ = append(small_cache(), rng, [4, 4, 0])
    counts = jnp.asarray([0, count, 1], jnp.int32)
    after, ok = paged.reserve(cache, counts)
    assert not np.asarray(ok).any()
    assert_unchanged(cache, after)
    after, ok = paged.write_latents(cache, 0, jnp.ones((3, 2, D), jnp.float32), counts)
    np.testing.assert_array_equal(np.asarray(ok), [True, False, False])  # 2: no page yet
    assert_unchanged(cache, after)
    after, ok = paged.advance(cache, counts)
    np.testing.assert_array_equal(np.asarray(ok), [True, False, False])
    assert_unchanged(cache, after)


def test_write_is_all_or_nothing_per_request(rng):
    """Request 0 has a page for its 4th token, none for its 5th: neither is written. Request 1
    writes its one token."""
    cache, _ = append(small_cache(page=4), rng, [3, 3, 3])
    latents = jnp.full((3, 2, D), 7.0, jnp.float32)
    after, ok = paged.write_latents(cache, 1, latents, jnp.asarray([2, 1, 0], jnp.int32))
    np.testing.assert_array_equal(np.asarray(ok), [False, True, True])
    pool, table = np.array(cache.pool), np.asarray(cache.block_table)
    pool[1, table[1, 0], 3] = 7.0
    np.testing.assert_array_equal(np.asarray(after.pool), pool)


def test_write_of_more_tokens_than_latents_given_is_refused(rng):
    cache, _ = append(small_cache(page=4), rng, [1, 1, 1])
    after, ok = paged.write_latents(cache, 0, jnp.ones((3, 1, D), jnp.float32),
                                    jnp.asarray([2, 1, 0], jnp.int32))
    np.testing.assert_array_equal(np.asarray(ok), [False, True, True])
    pool = np.array(cache.pool)
    pool[0, int(cache.block_table[1, 0]), 1] = 1.0
    np.testing.assert_array_equal(np.asarray(after.pool), pool)


@pytest.mark.parametrize("layer", [-1, 2])
def test_traced_layer_out_of_range_writes_nothing(rng, layer):
    """A layer index traced under jit (no trace-time check) outside [0, num_layers): a negative
    one must not wrap around to the last layer."""
    cache, _ = append(small_cache(), rng, [1, 1, 1])
    cache, _ = paged.reserve(cache, jnp.ones((3,), jnp.int32))
    write = jax.jit(paged.write_latents)
    after, ok = write(cache, jnp.int32(layer), jnp.ones((3, 1, D), jnp.float32),
                      jnp.ones((3,), jnp.int32))
    assert not np.asarray(ok).any()
    assert_unchanged(cache, after)


def test_advance_past_the_pages_held_is_refused(rng):
    cache, _ = append(small_cache(page=4), rng, [3, 0, 4])
    after, ok = paged.advance(cache, jnp.asarray([1, 1, 1], jnp.int32))
    np.testing.assert_array_equal(np.asarray(ok), [True, False, False])
    np.testing.assert_array_equal(np.asarray(after.seqlens), [4, 0, 4])


def test_free_rejects_a_mask_of_another_length(rng):
    """A one-element mask is not broadcast over the three requests (it would free them all)."""
    cache, _ = append(small_cache(), rng, [4, 4, 4])
    with pytest.raises(ValueError, match=r"finished: expected shape \(3,\).*got \(1,\)"):
        paged.free(cache, jnp.array([True]))
    with pytest.raises(TypeError, match=r"finished: expected dtype bool.*got int32"):
        paged.free(cache, jnp.array([0, 1, 0]))  # ids or a mask? neither is guessed


@pytest.mark.parametrize("flags", ["update_result", "int_flags", "scalar", "traced"])
def test_check_accepts_only_the_flags_an_update_returns(rng, flags):
    cache = small_cache()
    result = paged.reserve(cache, jnp.zeros((3,), jnp.int32))
    with pytest.raises(TypeError, match=r"^ok: expected"):
        if flags == "update_result":
            paged.check(result, "reserve")  # (cache, ok), not unpacked
        elif flags == "int_flags":
            paged.check(jnp.array([1, 0, 1]), "reserve")
        elif flags == "scalar":
            paged.check(jnp.array(True), "reserve")
        else:
            jax.jit(lambda ok: paged.check(ok, "reserve"))(result[1])


def test_write_without_pages_is_dropped_not_misplaced(rng):
    cache, _ = append(small_cache(), rng, [4, 4, 4])
    before = np.asarray(cache.pool)
    latents = jnp.ones((3, 1, D), jnp.float32)
    # Request 1 has no page for its 5th token: its write must vanish, the others land.
    cache = cache._replace(block_table=cache.block_table.at[1, 1].set(-1))
    cache, reserve_ok = paged.reserve(cache, jnp.asarray([1, 0, 1], jnp.int32))
    cache = cache._replace(block_table=cache.block_table.at[1, 1].set(
        int(cache.block_table[0, 0])))  # a page of request 0: must not be written through
    cache, ok = paged.write_latents(cache, 0, latents, jnp.asarray([1, 1, 1], jnp.int32))
    np.testing.assert_array_equal(np.asarray(ok), [True, False, True])
    after = np.asarray(cache.pool)
    stolen = int(cache.block_table[0, 0])
    np.testing.assert_array_equal(after[0, stolen], before[0, stolen])


def test_free_returns_pages_for_reuse(rng):
    cache, _ = append(small_cache(num_blocks=4, page=4), rng, [8, 8, 0])
    kept = dense_tokens(cache, 0, 1)
    cache = paged.free(cache, jnp.asarray([True, False, False]))
    assert int(cache.seqlens[0]) == 0 and (np.asarray(cache.block_table[0]) == -1).all()
    cache, _ = append(cache, rng, [0, 0, 8])
    np.testing.assert_array_equal(dense_tokens(cache, 0, 1), kept)


def test_decode_reads_what_was_written(rng):
    cache, _ = append(small_cache(num_blocks=16, page=4), rng, [5, 9, 2])
    q = jnp.asarray(rng.standard_normal((3, 1, 16, D)), jnp.bfloat16)
    pool = cache.pool[1].astype(jnp.bfloat16)
    out, lse = jax_flash_mla.flash_mla_with_kvcache(q, pool, cache.block_table, cache.seqlens)
    ref_out, ref_lse = jax_flash_mla.reference.flash_mla_with_kvcache(
        q, pool, cache.block_table, cache.seqlens)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=1e-4)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32),
                               atol=2e-2)


@pytest.mark.parametrize("pool_dtype, pool_shape", [(jnp.float32, "f32[2,64,16,1,576]"),
                                                     (jnp.uint8, "u8[2,64,16,1,656]")])
def test_donated_step_updates_the_pool_in_place(rng, pool_dtype, pool_shape):
    cache = paged.init_cache(2, 64, 16, 4, 16, D, pool_dtype)

    def step(cache, latents):
        counts = jnp.full((4,), 1, jnp.int32)
        cache, _ = paged.reserve(cache, counts)
        cache, _ = paged.write_latents(cache, 0, latents, counts)
        return paged.advance(cache, counts)[0]

    latents = jnp.asarray(rng.standard_normal((4, 1, D)), jnp.bfloat16)
    stepper = jax.jit(step, donate_argnums=0)
    hlo = stepper.lower(cache, latents).compile().as_text()
    # The pool parameter is aliased to the output, and no instruction copies it.
    assert "input_output_alias" in hlo
    assert not any(" copy(" in line and pool_shape in line for line in hlo.splitlines())
    pool_before = cache.pool
    cache = stepper(cache, latents)
    assert pool_before.is_deleted()
    assert int(cache.seqlens[0]) == 1
    # What landed is the latent, quantized on write for an FP8 pool (test_fp8_cache.py checks
    # the quantizer's bytes against an independent one).
    page = int(cache.block_table[2, 0])
    want = (jax_flash_mla.quantize_fp8_kvcache(latents[2, 0]) if pool_dtype == jnp.uint8
            else latents[2, 0].astype(pool_dtype))
    np.testing.assert_array_equal(np.asarray(cache.pool[0, page, 0, 0]), np.asarray(want))
