"""`jax-flash-mla demo`: a small DeepSeek-style model decoding a ragged batch on whatever JAX
has (CPU or GPU): prefill, then a jitted decode loop over the paged cache with the kernel,
a progress bar, and tokens/s and per-step latency at the end."""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash_mla import cache as paged
from jax_flash_mla.models import deepseek


def add_arguments(parser) -> None:
    parser.add_argument("--batch", type=int, default=8, help="requests decoded together")
    parser.add_argument("--tokens", type=int, default=32, help="tokens to generate per request")
    parser.add_argument("--max-prompt", type=int, default=64, help="longest prompt (ragged)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)


def _progress(step, total, latency_ms, width=30):
    """A redrawn bar on a terminal; a line at each quarter otherwise (logs, CI)."""
    filled = int(width * step / total)
    line = (f"decode [{'#' * filled}{'.' * (width - filled)}] {step}/{total} "
            f"{latency_ms:7.2f} ms/step")
    if sys.stdout.isatty():
        sys.stdout.write("\r" + line + ("\n" if step == total else ""))
        sys.stdout.flush()
    elif step == total or step % max(1, total // 4) == 0:
        print(line)


def run(args) -> int:
    config = deepseek.Config(hidden=args.hidden, num_layers=args.layers, num_heads=args.heads)
    rng = np.random.default_rng(args.seed)
    params = deepseek.init_params(config, jax.random.key(args.seed))
    prompts = [list(rng.integers(0, config.vocab_size, size=int(n)))
               for n in rng.integers(1, args.max_prompt + 1, size=args.batch)]
    max_tokens = args.max_prompt + args.tokens
    blocks_per_seq = -(-max_tokens // args.page_size)
    cache = paged.init_cache(config.num_layers, args.batch * blocks_per_seq, args.page_size,
                             args.batch, blocks_per_seq, config.latent_dim, jnp.bfloat16)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}); model: {config.num_layers} layers, "
          f"{config.num_heads} heads, hidden {config.hidden}, MLA latent {config.latent_dim}")
    print(f"batch {args.batch}, prompt lengths {[len(p) for p in prompts]}, "
          f"{args.tokens} new tokens each, page {args.page_size}")

    start = time.perf_counter()
    cache, logits = deepseek.prefill(params, cache, prompts, config)
    jax.block_until_ready(logits)
    print(f"prefill: {time.perf_counter() - start:.2f} s")

    active = jnp.ones((args.batch,), bool)

    def step(cache, tokens):
        cache, logits, ok = deepseek.decode_step(params, cache, tokens, active, config)
        return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32), ok

    step = jax.jit(step, donate_argnums=0)
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    latencies, generated = [], []
    for i in range(args.tokens):
        t0 = time.perf_counter()
        cache, tokens, ok = step(cache, tokens)
        tokens.block_until_ready()
        latencies.append(time.perf_counter() - t0)
        generated.append(np.asarray(tokens))
        _progress(i + 1, args.tokens, latencies[-1] * 1e3)
    paged.check(ok, "decode")
    steady = latencies[1:] or latencies  # the first step compiles
    median = statistics.median(steady)
    print(f"first step (compiles): {latencies[0] * 1e3:.1f} ms; steady per-step latency: "
          f"median {median * 1e3:.2f} ms, max {max(steady) * 1e3:.2f} ms")
    print(f"throughput: {args.batch / median:.1f} tokens/s ({args.batch} requests x "
          f"{1 / median:.1f} steps/s)")
    print(f"request 0 generated: {[int(t[0]) for t in generated[:16]]}...")
    return 0
