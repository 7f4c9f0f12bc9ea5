"""The absorbed, paged, kernel decode path of the DeepSeek-style model against the naive
non-absorbed model on the same weights, over several steps and ragged lengths."""

import jax
import jax.numpy as jnp
import numpy as np

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
