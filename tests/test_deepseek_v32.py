"""DeepSeek-V3.2's decode step (lightning indexer, FP8 paged cache, absorbed MLA on the sparse
kernel) against the naive model on the same weights, over several ragged steps: the tokens each
layer picked must be a top-k of the naive model's own index scores, and its non-absorbed jnp
attention over those tokens must give the step's logits. Every cache slot no request holds is
poisoned, so that a token picked past a request's length shows up as NaN. The prefill (a batch
of prompts through the sparse prefill kernel) is checked the same way, token by token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_flash_mla import cache as paged
from jax_flash_mla.models import deepseek, deepseek_v32

CONFIG = deepseek_v32.Config(vocab_size=256, hidden=256, num_layers=2, num_heads=16,
                             q_lora_rank=128, mlp_hidden=512, index_topk=16)
PAGE = 8
# Under topk at every step, over it from the start (the indexer drops most tokens), a single
# token, one that reaches topk (16) at the third step, and an idle request.
PROMPT_LENGTHS = (5, 40, 1, 13, 0)
ACTIVE = jnp.array([True, True, True, True, False])
STEPS = 5
PADDED_LENGTH = 48  # the reference's sequences, padded: one compile for every step
# The reference replays the tokens the decode step picked (decode_step_with_indices) and checks
# that they are a top-k of its own index scores up to a slack, rather than attending over its
# own pick: from the second layer on, the indexer's inputs carry the kernel path's bf16 roundings
# of the layers below, so a near tie at the top-k boundary may go either way, and one token
# picked otherwise moves the logits by 10-20% of max |logits| (4 of 16 seeds of a 3-layer model
# had such a tie).
#
# Slack of the pick, relative to max |score| of the row: in the first layer both paths score
# the same embeddings, differing by float32 rounding (and, rarely, a bf16 index key rounded the
# other way: 2^-8 of one of its 64 columns), hence 1e-4. Later layers' inputs differ by the
# bf16 error below (about 1e-3 relative), which the bilinear scores about double; measured:
# at most 9e-4 over 16 seeds of a 3-layer model; hence 1e-2. A wrong pick (another layer's keys,
# a position off by one, a token past the length) misses by a good part of the scores' spread.
INDEX_SLACK_FIRST_LAYER = 1e-4
INDEX_SLACK = 1e-2
# Logits, relative to max |logits|: the reference attends over the latents the FP8 cache gives
# back, so the storage error cancels, and over the same tokens. What remains is the kernel
# path's bf16: its absorbed queries and its outputs rounded to bf16 (2^-9 relative each) in
# every layer, as in test_deepseek.py (whose bf16 cache adds another 2^-9 there). Those
# differences reach the latents that decode steps write in the second layer, and FP8 re-rounds
# them: an element moved by d crosses an e4m3 rounding boundary with probability about d / ulp
# and then moves by an ulp (2^-4 of it), so a 1e-3 difference becomes about 8e-3 rms on those
# tokens. Measured: at most 0.6% over 5 seeds (1.2% over 16 seeds of a 3-layer model); 2% is
# test_deepseek.py's bound.
LOGITS_RTOL = 2e-2


def held_slots(cache):
    """bool [num_blocks * page]: the pool tokens some request holds (below its length)."""
    table, seqlens = np.asarray(cache.latents.block_table), np.asarray(cache.latents.seqlens)
    page = cache.latents.page_block_size
    held = np.zeros(cache.latents.pool.shape[1] * page, bool)
    for r, n in enumerate(seqlens):
        positions = np.arange(n)
        held[table[r, positions // page] * page + positions % page] = True
    return held


def poisoned(cache):
    """The cache with every token no request holds NaN: all bytes 0xFF in the FP8 pool (NaN
    codes, scales and RoPE columns), NaN index keys (a NaN score picked, or a NaN latent read,
    makes the logits NaN)."""
    free = ~held_slots(cache)
    pool = np.array(cache.latents.pool)
    keys = np.array(cache.index_keys.astype(jnp.float32))
    pool.reshape(pool.shape[0], -1, pool.shape[-1])[:, free] = 0xFF
    keys.reshape(keys.shape[0], -1, keys.shape[-1])[:, free] = np.nan
    return deepseek_v32.SparseCache(cache.latents._replace(pool=jnp.asarray(pool)),
                                    jnp.asarray(keys, cache.index_keys.dtype))


def prefilled(rng, prompt_lengths, num_blocks=32, max_blocks=8):
    params = deepseek_v32.init_params(CONFIG, jax.random.key(0))
    prompts = [list(rng.integers(0, CONFIG.vocab_size, size=n)) for n in prompt_lengths]
    cache = deepseek_v32.init_cache(CONFIG, num_blocks, PAGE, len(prompts), max_blocks)
    cache, logits = deepseek_v32.prefill(params, cache, prompts, CONFIG)
    return params, prompts, cache, jnp.argmax(logits, axis=-1).astype(jnp.int32)


def positions_of(indices, cache):
    """The request positions int32 [layers, R, topk] that pool indices [layers, R, topk] name
    (-1 stays -1), through each request's block table; an index on a page the request does not
    hold fails."""
    table = np.asarray(cache.latents.block_table)
    page = cache.latents.page_block_size
    indices = np.asarray(indices)
    on_page = table[None, :, None, :] == (indices // page)[..., None]  # [layers, R, topk, cols]
    used = indices >= 0
    assert on_page.any(axis=-1)[used].all(), "an index outside its request's pages"
    return np.where(used, on_page.argmax(axis=-1) * page + indices % page, -1)


def assert_top_k(positions, scores, length, slack):
    """positions [topk] (-1 unused) are min(length, topk) distinct positions below length, and
    a top-k of scores [length] up to `slack`: none scores below an unpicked one by more."""
    picked = positions[positions >= 0]
    assert len(picked) == min(length, CONFIG.index_topk), (positions, length)
    assert len(set(picked.tolist())) == len(picked) and picked.max() < length, positions
    rest = np.setdiff1d(np.arange(length), picked)
    if rest.size:
        assert scores[picked].min() >= scores[rest].max() - slack, (
            scores[rest].max() - scores[picked].min(), slack)


def test_sparse_fp8_decode_matches_naive_model(rng):
    params, prompts, cache, tokens = prefilled(rng, PROMPT_LENGTHS)
    cache = poisoned(cache)
    step = jax.jit(lambda cache, tokens: deepseek_v32.decode_step_with_indices(
        params, cache, tokens, ACTIVE, CONFIG), donate_argnums=0)
    reference = jax.jit(jax.vmap(lambda tokens, picks: deepseek_v32.naive_forward(
        params, tokens, CONFIG, picks)))
    active = np.asarray(ACTIVE)
    sequences = [list(p) for p in prompts]
    picks = np.zeros((len(prompts), CONFIG.num_layers, PADDED_LENGTH, PADDED_LENGTH), bool)
    for _ in range(STEPS):
        for seq, t, a in zip(sequences, np.asarray(tokens), active):
            seq.extend([int(t)] if a else [])
        cache, logits, ok, indices = step(cache, tokens)
        assert np.asarray(ok).all()
        lengths = np.array([len(s) for s in sequences])
        np.testing.assert_array_equal(np.asarray(cache.latents.seqlens), lengths)
        positions = positions_of(indices, cache)
        for r in np.flatnonzero(active):
            for layer, row in enumerate(positions[:, r]):
                picks[r, layer, lengths[r] - 1, row[row >= 0]] = True
        padded = jnp.asarray([s + [0] * (PADDED_LENGTH - len(s)) for s in sequences], jnp.int32)
        want = jax.tree.map(np.asarray, reference(padded, jnp.asarray(picks)))
        for r in np.flatnonzero(active):
            n = lengths[r]
            w = want.logits[r, n - 1]
            np.testing.assert_array_less(np.abs(logits[r] - w),
                                         LOGITS_RTOL * np.abs(w).max(), err_msg=f"request {r}")
            for layer in range(CONFIG.num_layers):
                slack = INDEX_SLACK_FIRST_LAYER if layer == 0 else INDEX_SLACK
                scores = want.index_scores[r, layer, n - 1, :n]
                assert_top_k(positions[layer, r], scores, n, slack * np.abs(scores).max())
        assert np.isfinite(np.asarray(logits)).all()  # the idle request's too
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # The selection matters: the long request attending over all its tokens differs by far more.
    sparse = want.logits[1, len(sequences[1]) - 1]
    dense = np.asarray(deepseek.naive_logits(params, jnp.asarray(sequences[1]), CONFIG)[-1])
    assert np.max(np.abs(dense - sparse)) > 5 * LOGITS_RTOL * np.max(np.abs(sparse))


def test_a_step_that_cannot_run_changes_nothing(rng):
    """The pool has no page left for request 0's next token: no request advances, neither
    pool is written, every flag is False and every logit NaN."""
    params, _, cache, tokens = prefilled(rng, (8, 2, 8), num_blocks=3, max_blocks=2)
    before = jax.tree.map(np.array, cache)
    step = jax.jit(lambda cache, tokens: deepseek_v32.decode_step(
        params, cache, tokens, jnp.ones((3,), bool), CONFIG), donate_argnums=0)
    cache, logits, ok = step(cache, tokens)
    assert not np.asarray(ok).any()
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(cache)):
        np.testing.assert_array_equal(x, np.asarray(y), strict=True)
    assert np.isnan(np.asarray(logits)).all()


@pytest.mark.parametrize("bad, exception, pattern", [
    ("bf16_latents", TypeError, r"cache.latents.pool: expected dtype uint8.*got bfloat16"),
    ("index_keys", ValueError, r"cache.index_keys: expected shape \(2, 8, 8, 1, 64\).*got "
                               r"\(2, 8, 8, 1, 32\)"),
    ("dense_cache", TypeError, r"cache: expected a SparseCache.*got PagedLatentCache"),
    ("step_output", TypeError, r"cache: expected a SparseCache.*returns \(cache, logits, ok\)"),
])
def test_decode_step_names_what_is_wrong(bad, exception, pattern):
    params = deepseek_v32.init_params(CONFIG, jax.random.key(0))
    cache = deepseek_v32.init_cache(CONFIG, 8, PAGE, 2, 4)
    if bad == "bf16_latents":
        cache = cache._replace(latents=paged.init_cache(2, 8, PAGE, 2, 4))
    elif bad == "index_keys":
        cache = cache._replace(index_keys=cache.index_keys[..., :32])
    elif bad == "dense_cache":
        cache = cache.latents
    else:
        cache = (cache, None, None)
    tokens, active = jnp.zeros((2,), jnp.int32), jnp.ones((2,), bool)
    with pytest.raises(exception, match=pattern):
        jax.jit(lambda c: deepseek_v32.decode_step(params, c, tokens, active, CONFIG))(cache)


def test_sparse_prefill_matches_naive_model(rng):
    """prefill_forward runs a batch's prompts together, one sparse prefill kernel call a layer:
    each prompt token's picks must be tokens of its own prompt up to it and a top-k of the
    naive model's index scores over that prompt alone, and the naive model replaying those
    picks must give its logits (the tolerances above: the same bf16 roundings of the absorbed
    queries and outputs, the latents read as the FP8 cache stores them)."""
    params = deepseek_v32.init_params(CONFIG, jax.random.key(0))
    prompts = [list(rng.integers(0, CONFIG.vocab_size, size=n)) for n in (5, 40, 1, 13)]
    got = jax.tree.map(np.asarray, deepseek_v32.prefill_forward(
        params, *deepseek_v32.concatenated(prompts), CONFIG))
    assert np.isfinite(got.logits).all()
    reference = jax.jit(lambda tokens, picks: deepseek_v32.naive_forward(
        params, tokens, CONFIG, picks))
    start = 0
    for prompt in prompts:
        n = len(prompt)
        own = got.indices[:, start:start + n]                 # [layers, n, topk], batch rows
        used = own >= 0
        assert ((own[used] >= start) & (own[used] < start + n)).all(), "another prompt's token"
        positions = np.where(used, own - start, -1)
        assert (positions <= np.arange(n)[None, :, None]).all(), "a token after the query"
        picks = np.zeros((CONFIG.num_layers, PADDED_LENGTH, PADDED_LENGTH), bool)
        for layer in range(CONFIG.num_layers):
            for t in range(n):
                picks[layer, t, positions[layer, t][positions[layer, t] >= 0]] = True
        padded = jnp.asarray(prompt + [0] * (PADDED_LENGTH - n), jnp.int32)
        want = jax.tree.map(np.asarray, reference(padded, jnp.asarray(picks)))
        w = want.logits[:n]
        bound = LOGITS_RTOL * np.abs(w).max(axis=-1, keepdims=True)
        np.testing.assert_array_less(np.abs(got.logits[start:start + n] - w),
                                     np.broadcast_to(bound, w.shape))
        for layer in range(CONFIG.num_layers):
            slack = INDEX_SLACK_FIRST_LAYER if layer == 0 else INDEX_SLACK
            for t in range(n):
                scores = want.index_scores[layer, t, :t + 1]
                assert_top_k(positions[layer, t], scores, t + 1, slack * np.abs(scores).max())
        start += n
