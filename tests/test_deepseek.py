"""The absorbed, paged, kernel decode path of the DeepSeek-style model against the naive
non-absorbed model on the same weights, over several steps and ragged lengths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_flash_mla import cache as paged
from jax_flash_mla.models import deepseek

CONFIG = deepseek.Config(vocab_size=256, hidden=256, num_layers=2, num_heads=16,
                         q_lora_rank=128, mlp_hidden=512)


def test_absorbed_paged_decode_matches_naive_model(rng):
    params = deepseek.init_params(CONFIG, jax.random.key(0))
    prompts = [list(rng.integers(0, CONFIG.vocab_size, size=n)) for n in (5, 17, 1)]
    cache = paged.init_cache(CONFIG.num_layers, num_blocks=32, page_block_size=8,
                             max_requests=3, max_blocks_per_seq=8, head_dim=CONFIG.latent_dim,
                             dtype=jnp.bfloat16)
    cache, logits = deepseek.prefill(params, cache, prompts, CONFIG)
    step = jax.jit(lambda cache, tokens: deepseek.decode_step(
        params, cache, tokens, jnp.ones((3,), bool), CONFIG), donate_argnums=0)
    sequences = [list(p) for p in prompts]
    for _ in range(4):
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        for seq, t in zip(sequences, np.asarray(tokens)):
            seq.append(int(t))
        cache, logits, ok = step(cache, tokens)
        assert bool(jnp.all(ok))
        for r, seq in enumerate(sequences):
            want = deepseek.naive_logits(params, jnp.asarray(seq, jnp.int32), CONFIG)[-1]
            got = logits[r]
            # bf16 cache and query (2^-8 relative) against float32 throughout: a few 1e-2
            # on logits of magnitude ~1-3.
            scale = float(jnp.max(jnp.abs(want)))
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-2 * scale,
                                       rtol=0)


def test_fp8_cache_decode_matches_the_bf16_cache_model(rng):
    """The same model over the FP8 cache (write_latents quantizes, the kernel dequantizes as
    it reads) against the bf16 cache, over four ragged steps. An e4m3 code rounds a latent's
    NoPE part by up to 2^-4 of its group's scale; through the scores, the softmax and W_UV it
    moved the logits by 1.7-2.5% of max |logits| here, so the bound is 2^-4 of it (a scale off
    by 2x, or a token read from the wrong page, moves them by far more)."""
    params = deepseek.init_params(CONFIG, jax.random.key(0))
    prompts = [list(rng.integers(0, CONFIG.vocab_size, size=n)) for n in (5, 17, 1, 40)]
    tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, size=(4, 4)), jnp.int32)

    def run(dtype):
        cache = paged.init_cache(CONFIG.num_layers, num_blocks=48, page_block_size=8,
                                 max_requests=4, max_blocks_per_seq=12,
                                 head_dim=CONFIG.latent_dim, dtype=dtype)
        cache, _ = deepseek.prefill(params, cache, prompts, CONFIG)
        assert cache.is_fp8 == (dtype == jnp.uint8)
        step = jax.jit(lambda cache, tokens: deepseek.decode_step(
            params, cache, tokens, jnp.ones((4,), bool), CONFIG), donate_argnums=0)
        steps = []
        for t in tokens:
            cache, logits, ok = step(cache, t)
            assert bool(jnp.all(ok))
            steps.append(np.asarray(logits))
        return steps

    for want, got in zip(run(jnp.bfloat16), run(jnp.uint8)):
        scale = float(np.max(np.abs(want)))
        np.testing.assert_allclose(got, want, atol=2.0**-4 * scale, rtol=0)


def prefilled(rng, prompt_lengths=(5, 17, 1), num_blocks=32, page=8, max_blocks=8):
    params = deepseek.init_params(CONFIG, jax.random.key(0))
    prompts = [list(rng.integers(0, CONFIG.vocab_size, size=n)) for n in prompt_lengths]
    cache = paged.init_cache(CONFIG.num_layers, num_blocks=num_blocks, page_block_size=page,
                             max_requests=len(prompts), max_blocks_per_seq=max_blocks,
                             head_dim=CONFIG.latent_dim, dtype=jnp.bfloat16)
    cache, logits = deepseek.prefill(params, cache, prompts, CONFIG)
    return params, cache, jnp.argmax(logits, axis=-1).astype(jnp.int32)


def assert_unchanged(before, after):
    for name, x, y in zip(paged.PagedLatentCache._fields, before, after):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name, strict=True)


@pytest.mark.parametrize("failure", ["request_full", "pool_exhausted", "token_outside_vocab"])
def test_a_step_that_cannot_run_changes_nothing(rng, failure):
    """Request 0 has filled its table (4 tokens in pages of 4, one column), the pool has no
    page left, or request 2's token is not in the vocabulary: no request advances, nothing is
    written, every flag is False and no logit looks like a prediction."""
    if failure == "request_full":
        params, cache, tokens = prefilled(rng, (4, 2, 3), num_blocks=8, page=4, max_blocks=1)
    elif failure == "pool_exhausted":
        params, cache, tokens = prefilled(rng, (4, 2, 4), num_blocks=3, page=4, max_blocks=2)
    else:
        params, cache, tokens = prefilled(rng, (4, 2, 3))
        tokens = tokens.at[2].set(CONFIG.vocab_size)
    before = jax.tree.map(np.array, cache)
    step = jax.jit(lambda cache, tokens: deepseek.decode_step(
        params, cache, tokens, jnp.ones((3,), bool), CONFIG), donate_argnums=0)
    cache, logits, ok = step(cache, tokens)
    assert not np.asarray(ok).any()
    assert_unchanged(before, cache)
    assert np.isnan(np.asarray(logits)).all()


def test_inactive_request_with_any_token_does_not_fail_the_step(rng):
    params, cache, tokens = prefilled(rng)
    tokens = tokens.at[1].set(-1)
    active = jnp.array([True, False, True])
    cache, logits, ok = deepseek.decode_step(params, cache, tokens, active, CONFIG)
    assert np.asarray(ok).all()
    np.testing.assert_array_equal(np.asarray(cache.seqlens), [6, 17, 2])
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("bad, exception, pattern", [
    ("layers", ValueError, r"cache: expected 2 layers.*got 3"),
    ("head_dim", ValueError, r"cache: expected head_dim 576.*got 512"),
    ("tokens_shape", ValueError, r"tokens: expected shape \(3,\).*got \(2,\)"),
    ("tokens_dtype", TypeError, r"tokens: expected dtype int32, got float32"),
    ("active_dtype", TypeError, r"active: expected dtype bool, got int32"),
    ("head_shards", ValueError, r"head_shards: expected .*dividing .*16, got 3"),
    ("unpacked_cache", TypeError, r"cache: expected a PagedLatentCache.*got tuple"),
])
def test_decode_step_names_what_is_wrong(rng, bad, exception, pattern):
    params, cache, tokens = prefilled(rng)
    active, head_shards = jnp.ones((3,), bool), 1
    if bad in ("layers", "head_dim"):
        cache = paged.init_cache(3 if bad == "layers" else 2, 32, 8, 3, 8,
                                 512 if bad == "head_dim" else 576)
    elif bad == "tokens_shape":
        tokens = tokens[:2]
    elif bad == "tokens_dtype":
        tokens = tokens.astype(jnp.float32)
    elif bad == "active_dtype":
        active = active.astype(jnp.int32)
    elif bad == "head_shards":
        head_shards = 3
    else:
        cache = paged.reserve(cache, jnp.zeros((3,), jnp.int32))
    with pytest.raises(exception, match=pattern):
        jax.jit(lambda c, t, a: deepseek.decode_step(params, c, t, a, CONFIG, head_shards))(
            cache, tokens, active)


@pytest.mark.parametrize("prompts, pattern", [
    ([[1, 2]], r"prompts: expected 3 prompts.*got 1"),
    ([[1], [CONFIG.vocab_size], []], r"prompts\[1\]: expected token ids in \[0, 256\).*got 256"),
    ([[1] * 65, [1], []], r"prompts\[0\]: expected at most 64 tokens.*got 65"),
    ([[1] * 64, [1] * 64, [1] * 64], r"prompts: expected at most 16 pages.*got .*24"),
])
def test_prefill_names_the_prompt_the_cache_cannot_take(prompts, pattern):
    params = deepseek.init_params(CONFIG, jax.random.key(0))
    cache = paged.init_cache(CONFIG.num_layers, 16, 8, 3, 8, CONFIG.latent_dim, jnp.bfloat16)
    with pytest.raises(ValueError, match=pattern):
        deepseek.prefill(params, cache, prompts, CONFIG)


def test_prefill_refuses_a_request_already_holding_tokens(rng):
    params, cache, _ = prefilled(rng)
    with pytest.raises(ValueError, match=r"prompts\[1\]: expected an empty request.*holding 17"):
        deepseek.prefill(params, cache, [[], [3], []], CONFIG)
