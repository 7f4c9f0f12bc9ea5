"""Bad inputs fail at trace time, eagerly and under jax.jit, with an error that names the
argument, says what was expected and shows what was given ("<argument>: expected <what>, got
<given>"). Messages are matched on those three parts, in that order, not on their wording."""

import functools
import re

import jax
import jax.numpy as jnp
import pytest

import jax_flash_mla


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


def assert_names(error, argument, given):
    """The message names the argument, then says what was expected, then what was given."""
    pattern = rf"\b{argument}\b.*\bexpected\b.*(?:{given})"
    assert re.search(pattern, str(error), re.S), f"{pattern!r} not in: {error}"


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("bad", BAD_INPUTS, ids=str)
def test_flash_mla_with_kvcache_rejects(bad, jit):
    overrides, exception, argument, given = BAD_INPUTS[bad]
    args = {**VALID, **overrides}
    decode = functools.partial(jax_flash_mla.flash_mla_with_kvcache,
                               head_dim_v=args.pop("head_dim_v"))
    with pytest.raises(exception) as error:
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
