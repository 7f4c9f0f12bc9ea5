"""Bad inputs fail at trace time, eagerly and under jax.jit, with an error that names the
argument, says what was expected and shows what was given ("<argument>: expected <what>, got
<given>"). Messages are matched on those three parts, in that order, not on their wording."""

import functools
import re

import jax
import jax.numpy as jnp
import pytest

import jax_flash_mla
from jax_flash_mla import cache as paged


def zeros(shape, dtype=jnp.bfloat16):
    return jnp.zeros(shape, dtype)


# b=2, s_q=1, h_q=16, h_kv=1, d=576, page 16, 4 pages, 2 table columns.
VALID = dict(
    q=zeros((2, 1, 16, 576)),
    k_cache=zeros((4, 16, 1, 576)),
    block_table=zeros((2, 2), jnp.int32),
    cache_seqlens=zeros((2,), jnp.int32),
    head_dim_v=512,
)


def shape_or_number(shape, number):
    """A shape as given ((2, 16, 576) or [2, 16, 576]) or a bare number (a rank or a size)."""
    dims = ", ".join(map(str, shape))
    return rf"[\[(]{dims},?[\])]|\b{number}\b"


BAD_INPUTS = {
    # id: (overrides of VALID, exception, argument named, given value as a regex)
    "q_rank_3": (dict(q=zeros((2, 16, 576))), ValueError, "q", shape_or_number((2, 16, 576), 3)),
    "k_cache_rank_3": (dict(k_cache=zeros((4, 16, 576))), ValueError, "k_cache",
                       shape_or_number((4, 16, 576), 3)),
    "block_table_rank_1": (dict(block_table=zeros((2,), jnp.int32)), ValueError, "block_table",
                           shape_or_number((2,), 1)),
    "cache_seqlens_rank_2": (dict(cache_seqlens=zeros((2, 5), jnp.int32)), ValueError,
                             "cache_seqlens", shape_or_number((2, 5), 2)),
    "q_float32": (dict(q=zeros((2, 1, 16, 576), jnp.float32),
                       k_cache=zeros((4, 16, 1, 576), jnp.float32)),
                  TypeError, "q", "float32"),
    "k_cache_dtype_differs_from_q": (dict(k_cache=zeros((4, 16, 1, 576), jnp.float16)),
                                     TypeError, "k_cache", "float16"),
    "block_table_int16": (dict(block_table=zeros((2, 2), jnp.int16)), TypeError, "block_table",
                          "int16"),
    "block_table_uint32": (dict(block_table=zeros((2, 2), jnp.uint32)), TypeError,
                           "block_table", "uint32"),
    "cache_seqlens_float32": (dict(cache_seqlens=zeros((2,), jnp.float32)), TypeError,
                              "cache_seqlens", "float32"),
    "head_dim_320": (dict(q=zeros((2, 1, 16, 320)), k_cache=zeros((4, 16, 1, 320))),
                     ValueError, "q", r"\b320\b"),
    "head_dim_v_256": (dict(head_dim_v=256), ValueError, "head_dim_v", r"\b256\b"),
    "k_cache_head_dim_differs_from_q": (dict(k_cache=zeros((4, 16, 1, 512))), ValueError,
                                        "k_cache", r"\b512\b"),
    "h_kv_does_not_divide_h_q": (dict(k_cache=zeros((4, 16, 3, 576))), ValueError, "k_cache",
                                 r"\b3\b"),
    "block_table_batch": (dict(block_table=zeros((3, 2), jnp.int32)), ValueError, "block_table",
                          r"\b3\b"),
    "cache_seqlens_batch": (dict(cache_seqlens=zeros((3,), jnp.int32)), ValueError,
                            "cache_seqlens", r"\b3\b"),
}


# Dense decode over the FP8 cache (is_fp8_kvcache=True): 656-byte tokens, one KV head, bf16 q
# of 576 columns.
VALID_FP8 = dict(VALID, k_cache=zeros((4, 16, 1, 656), jnp.uint8))

BAD_FP8_INPUTS = {
    "bf16_cache": (dict(k_cache=zeros((4, 16, 1, 576))), TypeError, "k_cache", "bfloat16"),
    "int8_cache": (dict(k_cache=zeros((4, 16, 1, 656), jnp.int8)), TypeError, "k_cache", "int8"),
    "576_bytes": (dict(k_cache=zeros((4, 16, 1, 576), jnp.uint8)), ValueError, "k_cache",
                  r"\b576\b"),
    "two_kv_heads": (dict(k_cache=zeros((4, 16, 2, 656), jnp.uint8)), ValueError, "k_cache",
                     r"\b2\b"),
    "fp16_q": (dict(q=zeros((2, 1, 16, 576), jnp.float16)), TypeError, "q", "float16"),
    "q_head_dim_512": (dict(q=zeros((2, 1, 16, 512))), ValueError, "q", r"\b512\b"),
    "pool_past_int32": (dict(k_cache=jax.ShapeDtypeStruct((2 ** 26, 64, 1, 656), jnp.uint8)),
                        ValueError, "k_cache", str(2 ** 32)),
}


def test_fp8_cache_without_the_flag_says_so():
    """A uint8 cache without is_fp8_kvcache: the error names k_cache and points at the flag."""
    args = {**VALID_FP8}
    with pytest.raises(TypeError, match=r"k_cache.*expected.*uint8.*is_fp8_kvcache=True"):
        jax_flash_mla.flash_mla_with_kvcache(**args)


def call_traced(fn, jit, **args):
    """fn(**args); with jit, under jax.jit with every array argument traced and the Python
    options (bools, scales, dims, metadata) static, as a jitted caller passes them. A scale
    given as an array stays an option: it must be refused as one."""
    arrays = {k: v for k, v in args.items()
              if hasattr(v, "dtype") and not k.endswith("scale")}
    options = {k: v for k, v in args.items() if k not in arrays}
    bound = functools.partial(fn, **options)
    return (jax.jit(lambda a: bound(**a)) if jit else lambda a: bound(**a))(arrays)


def assert_names(error, argument, given):
    """The message names the argument, then says what was expected, then what was given."""
    pattern = rf"\b{argument}\b.*\bexpected\b.*(?:{given})"
    assert re.search(pattern, str(error), re.S), f"{pattern!r} not in: {error}"


# (id, is_fp8_kvcache): every bad input of the bf16 cache, then of the FP8 one.
BAD_CALLS = [(bad, False) for bad in BAD_INPUTS] + [(f"fp8_{bad}", True) for bad in BAD_FP8_INPUTS]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("bad, fp8", BAD_CALLS, ids=[bad for bad, _ in BAD_CALLS])
def test_flash_mla_with_kvcache_rejects(bad, fp8, jit):
    overrides, exception, argument, given = (
        BAD_FP8_INPUTS[bad.removeprefix("fp8_")] if fp8 else BAD_INPUTS[bad])
    args = {**(VALID_FP8 if fp8 else VALID), **overrides}
    decode = functools.partial(jax_flash_mla.flash_mla_with_kvcache,
                               head_dim_v=args.pop("head_dim_v"), is_fp8_kvcache=fp8)
    with pytest.raises(exception) as error:
        if isinstance(args["k_cache"], jax.ShapeDtypeStruct):  # a pool too large to allocate
            jax.eval_shape(decode, **args)
        else:
            (jax.jit(decode) if jit else decode)(**args)
    assert_names(error.value, argument, given)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("cache_seqlens, exception, given", [
    (zeros((2,), jnp.float32), TypeError, "float32"),
    (zeros((2, 5), jnp.int32), ValueError, shape_or_number((2, 5), 2)),
], ids=["float32", "rank_2"])
def test_get_mla_metadata_rejects(cache_seqlens, exception, given, jit):
    metadata = functools.partial(jax_flash_mla.get_mla_metadata, num_q_tokens_per_head_k=16,
                                 num_heads_k=1)
    with pytest.raises(exception) as error:
        (jax.jit(metadata) if jit else metadata)(cache_seqlens)
    assert_names(error.value, "cache_seqlens", given)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")], ids=str)
def test_softmax_scale_must_be_finite(scale, jit):
    """NaN or an infinity as the scale would turn every output into NaN."""
    args = {**VALID}
    decode = functools.partial(jax_flash_mla.flash_mla_with_kvcache,
                               head_dim_v=args.pop("head_dim_v"), softmax_scale=scale)
    with pytest.raises(ValueError) as error:
        (jax.jit(decode) if jit else decode)(**args)
    assert_names(error.value, "softmax_scale", re.escape(repr(scale)))


# --- the paged cache ---------------------------------------------------------------------------

def small_cache():
    """2 layers, 6 pages of 4 tokens, 3 requests of at most 2 pages, 8-wide latents."""
    return paged.init_cache(2, 6, 4, 3, 2, head_dim=8, dtype=jnp.float32)


COUNTS = jnp.ones((3,), jnp.int32)
LATENTS = jnp.ones((3, 1, 8), jnp.float32)

BAD_CACHE_CALLS = {
    # id: (call on a valid cache, exception, argument named, given value as a regex)
    "reserve_counts_for_2_requests": (
        lambda c: paged.reserve(c, jnp.ones((2,), jnp.int32)), ValueError, "num_new_tokens",
        shape_or_number((2,), 2)),
    "reserve_one_count_for_all": (
        lambda c: paged.reserve(c, jnp.int32(1)), ValueError, "num_new_tokens", r"\(\)"),
    "reserve_float_counts": (
        lambda c: paged.reserve(c, jnp.ones((3,), jnp.float32)), TypeError, "num_new_tokens",
        "float32"),
    "reserve_bool_counts": (
        lambda c: paged.reserve(c, jnp.ones((3,), bool)), TypeError, "num_new_tokens", "bool"),
    "reserve_unpacked_result": (
        lambda c: paged.reserve(paged.reserve(c, COUNTS), COUNTS), TypeError, "cache", "tuple"),
    "reserve_seqlens_float": (
        lambda c: paged.reserve(c._replace(seqlens=c.seqlens.astype(jnp.float32)), COUNTS),
        TypeError, r"cache\.seqlens", "float32"),
    "reserve_owner_of_other_pool": (
        lambda c: paged.reserve(c._replace(page_owner=c.page_owner[:5]), COUNTS), ValueError,
        r"cache\.page_owner", shape_or_number((5,), 5)),
    "write_layer_past_the_last": (
        lambda c: paged.write_latents(c, 2, LATENTS, COUNTS), ValueError, "layer", r"\b2\b"),
    "write_negative_layer": (
        lambda c: paged.write_latents(c, -1, LATENTS, COUNTS), ValueError, "layer", "-1"),
    "write_float_layer": (
        lambda c: paged.write_latents(c, 1.0, LATENTS, COUNTS), TypeError, "layer", "float"),
    "write_latents_rank_2": (
        lambda c: paged.write_latents(c, 0, jnp.ones((3, 8)), COUNTS), ValueError, "latents",
        shape_or_number((3, 8), 2)),
    "write_latents_head_dim": (
        lambda c: paged.write_latents(c, 0, jnp.ones((3, 1, 576)), COUNTS), ValueError,
        "latents", shape_or_number((3, 1, 576), 576)),
    "write_latents_for_4_requests": (
        lambda c: paged.write_latents(c, 0, jnp.ones((4, 1, 8)), COUNTS), ValueError,
        "latents", shape_or_number((4, 1, 8), 4)),
    "write_int_latents": (
        lambda c: paged.write_latents(c, 0, jnp.ones((3, 1, 8), jnp.int32), COUNTS), TypeError,
        "latents", "int32"),
    "write_counts_for_2_requests": (
        lambda c: paged.write_latents(c, 0, LATENTS, COUNTS[:2]), ValueError, "num_new_tokens",
        shape_or_number((2,), 2)),
    "advance_counts_rank_2": (
        lambda c: paged.advance(c, jnp.ones((3, 1), jnp.int32)), ValueError, "num_new_tokens",
        shape_or_number((3, 1), 2)),
    "free_mask_of_1": (
        lambda c: paged.free(c, jnp.array([True])), ValueError, "finished",
        shape_or_number((1,), 1)),
    "free_request_ids": (
        lambda c: paged.free(c, jnp.array([0, 1, 2])), TypeError, "finished", "int32"),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("bad", BAD_CACHE_CALLS, ids=str)
def test_cache_updates_reject(bad, jit):
    call, exception, argument, given = BAD_CACHE_CALLS[bad]
    with pytest.raises(exception) as error:
        (jax.jit(call) if jit else call)(small_cache())
    assert_names(error.value, argument, given)


@pytest.mark.parametrize("overrides, exception, argument, given", [
    (dict(num_blocks=0), ValueError, "num_blocks", r"\b0\b"),
    (dict(page_block_size=True), ValueError, "page_block_size", "True"),
    (dict(max_requests=2.0), ValueError, "max_requests", r"2\.0"),
    (dict(max_blocks_per_seq=1 << 20, page_block_size=1 << 12), ValueError,
     "max_blocks_per_seq", str(1 << 20)),
    (dict(dtype=jnp.int32), TypeError, "dtype", "int32"),
], ids=["no_blocks", "bool_page", "float_requests", "int32_length_overflow", "int_pool"])
def test_init_cache_rejects(overrides, exception, argument, given):
    args = dict(num_layers=1, num_blocks=4, page_block_size=4, max_requests=2,
                max_blocks_per_seq=2, head_dim=8, dtype=jnp.float32)
    with pytest.raises(exception) as error:
        paged.init_cache(**{**args, **overrides})
    assert_names(error.value, argument, given)
