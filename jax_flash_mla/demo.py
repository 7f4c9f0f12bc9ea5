"""`jax-flash-mla demo`: a small DeepSeek-style model decoding a ragged batch on whatever JAX
has (CPU or GPU): prefill, then a jitted decode loop over the paged cache with the kernel,
a progress bar, and tokens/s and per-step latency at the end.

`--parallel tp` splits the heads over every local device, `--parallel dp` gives each device its
own requests and page pool (see models/parallel.py); `--check` compares the first step's
logits with one device decoding the same batch. `--fp8-cache` keeps the dense model's latents
in DeepSeek-V3.2's FP8 layout. `--sparse` runs DeepSeek-V3.2 instead
(models/deepseek_v32.py): each layer's lightning indexer picks the top `--topk` tokens, which
the sparse kernel reads from the FP8 cache; one device only."""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jax_flash_mla import cache as paged
from jax_flash_mla.models import deepseek, deepseek_v32, parallel
from jax_flash_mla.validation import non_negative_int, positive_int


def add_arguments(parser) -> None:
    parser.add_argument("--batch", type=positive_int, default=8, help="requests decoded together")
    parser.add_argument("--tokens", type=positive_int, default=32,
                        help="tokens to generate per request")
    parser.add_argument("--max-prompt", type=positive_int, default=64,
                        help="longest prompt (ragged)")
    parser.add_argument("--layers", type=positive_int, default=2)
    parser.add_argument("--heads", type=positive_int, default=16)
    parser.add_argument("--hidden", type=positive_int, default=512)
    parser.add_argument("--page-size", type=positive_int, default=16)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--parallel", choices=("none", "tp", "dp"), default="none",
                        help="over every local device: tp splits heads, dp splits requests")
    parser.add_argument("--check", action="store_true",
                        help="compare the first step's logits with one device")
    parser.add_argument("--sparse", action="store_true",
                        help="DeepSeek-V3.2: attention over the indexer's top-k tokens through "
                             "the sparse kernel, FP8 latent cache (one device)")
    parser.add_argument("--fp8-cache", action="store_true",
                        help="the dense model's latents in DeepSeek-V3.2's 656-byte FP8 layout "
                             "(--sparse always uses it)")
    parser.add_argument("--topk", type=positive_int, default=None,
                        help=f"tokens each query attends to with --sparse (default "
                             f"{deepseek_v32.Config.index_topk}; V3.2 itself uses 2048)")


def _model(args):
    """The model's module: DeepSeek-V3 (models/deepseek.py) or, with --sparse, V3.2
    (models/deepseek_v32.py). Both have Config, init_params, prefill and decode_step."""
    return deepseek_v32 if args.sparse else deepseek


def _config(args):
    """The model's sizes from the options, and with --sparse its top-k."""
    sizes = dict(hidden=args.hidden, num_layers=args.layers, num_heads=args.heads)
    if args.sparse:
        return deepseek_v32.Config(**sizes, index_topk=args.topk or deepseek_v32.Config.index_topk)
    return deepseek.Config(**sizes)


def _init_cache(args, config, num_blocks, requests, blocks_per_seq):
    if args.sparse:  # FP8 latents and the indexer's keys on the same pages
        return deepseek_v32.init_cache(config, num_blocks, args.page_size, requests,
                                       blocks_per_seq)
    return paged.init_cache(config.num_layers, num_blocks, args.page_size, requests,
                            blocks_per_seq, config.latent_dim,
                            jnp.uint8 if args.fp8_cache else jnp.bfloat16)


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


def _prefill(params, prompts, config, args, engines):
    """The prefilled cache: one pool, or (dp) one pool per engine, stacked."""
    per_engine = len(prompts) // engines
    blocks_per_seq = -(-(args.max_prompt + args.tokens) // args.page_size)
    caches = []
    for e in range(engines):
        cache = _init_cache(args, config, per_engine * blocks_per_seq, per_engine,
                            blocks_per_seq)
        caches.append(_model(args).prefill(
            params, cache, prompts[e * per_engine:(e + 1) * per_engine], config))
    if engines == 1:
        return caches[0]
    return (parallel.stack_engine_caches([c for c, _ in caches]),
            jnp.concatenate([logits for _, logits in caches]))


def _placed_step(args, config, params, cache, tokens, active):
    """(step, (params, cache, tokens, active), what) for the chosen layout: step(params, cache,
    tokens, active) returns (cache, logits, ok), and the inputs are placed where the step puts
    its own cache and per-request outputs, so that one compile serves every step."""
    devices = jax.devices()
    if args.parallel == "none":
        model = _model(args)
        step = jax.jit(lambda p, c, t, a: model.decode_step(p, c, t, a, config),
                       donate_argnums=1)
        return (step, jax.device_put((params, cache, tokens, active), devices[0]),
                "one device")
    mesh = Mesh(np.array(devices), (args.parallel,))
    if args.parallel == "tp":
        return (parallel.tensor_parallel_step(config, len(devices)),
                (parallel.head_sharded_params(params, mesh, "tp"),
                 *parallel.replicated((cache, tokens, active), mesh)),
                f"tensor parallel over {len(devices)} devices, "
                f"{config.num_heads // len(devices)} heads each")
    by_request = NamedSharding(mesh, PartitionSpec("dp"))
    return (parallel.data_parallel_step(config, mesh, "dp"),
            (parallel.replicated(params, mesh), parallel.engine_sharded(cache, mesh, "dp"),
             *jax.device_put((tokens, active), by_request)),
            f"data parallel over {len(devices)} devices, "
            f"{args.batch // len(devices)} requests and their pages each")


def _compiled_decode(step, params, cache, tokens, active):
    """The loop's step compiled ahead of the timed steps: step, then the greedy pick of the
    next tokens, the cache donated. The cache and the tokens come out placed as they went in:
    a compiled step takes only inputs placed as the ones it was compiled for, so its own
    outputs must be."""
    def decode(params, cache, tokens, active):
        cache, logits, ok = step(params, cache, tokens, active)
        return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32), logits, ok

    out_shardings = (jax.tree.map(lambda x: x.sharding, cache), tokens.sharding, None, None)
    return jax.jit(decode, donate_argnums=1, out_shardings=out_shardings).lower(
        params, cache, tokens, active).compile()


def _check_against_one_device(args, config, params, cache, tokens, active, logits):
    """Max |difference| of the first step's logits from one device decoding the same batch
    from one pool, relative to their largest magnitude; False above one bf16 rounding (the
    layouts sum in another order and schedule splits differently)."""
    one_pool = parallel.as_one_pool(cache, len(jax.devices())) if args.parallel == "dp" else cache
    device = jax.devices()[0]
    model = _model(args)
    _, want, _ = jax.jit(lambda p, c, t, a: model.decode_step(p, c, t, a, config))(
        *jax.device_put((params, one_pool, tokens, active), device))
    want, got = np.asarray(want), np.asarray(logits)
    error = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    same = error <= 2.0**-7
    print(f"first step against one device: max |logits difference| / max |logits| = "
          f"{error:.2e}: {'OK' if same else 'MISMATCH'}")
    return same


def run(args) -> int:
    if args.topk is not None and not args.sparse:
        raise SystemExit("--topk: only with --sparse (the dense model attends to every token)")
    if args.fp8_cache and args.sparse:
        raise SystemExit("--fp8-cache: for the dense model (--sparse always reads the FP8 cache)")
    if args.sparse and args.parallel != "none":
        raise SystemExit(f"--sparse: one device only (--parallel none); the sparse model has "
                         f"no {args.parallel} layout")
    config = _config(args)
    engines = len(jax.devices()) if args.parallel == "dp" else 1
    if args.parallel == "tp" and config.num_heads % len(jax.devices()):
        raise SystemExit(f"--parallel tp: --heads {config.num_heads} must divide over "
                         f"{len(jax.devices())} devices")
    if args.batch % engines:
        raise SystemExit(f"--parallel dp: --batch {args.batch} must divide over {engines} devices")
    rng = np.random.default_rng(args.seed)
    params = _model(args).init_params(config, jax.random.key(args.seed))
    prompts = [list(rng.integers(0, config.vocab_size, size=int(n)))
               for n in rng.integers(1, args.max_prompt + 1, size=args.batch)]
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}); model: {config.num_layers} layers, "
          f"{config.num_heads} heads, hidden {config.hidden}, MLA latent {config.latent_dim}")
    if args.fp8_cache:
        print("FP8 latent cache (656 bytes a token), dequantized by the kernel as it reads")
    if args.sparse:
        print(f"DeepSeek-V3.2 sparse attention: each query over the top {config.index_topk} "
              f"tokens of its layer's indexer ({config.index_n_heads} index heads), FP8 "
              f"latent cache")
    print(f"batch {args.batch}, prompt lengths {[len(p) for p in prompts]}, "
          f"{args.tokens} new tokens each, page {args.page_size}")

    start = time.perf_counter()
    cache, logits = _prefill(params, prompts, config, args, engines)
    jax.block_until_ready(logits)
    print(f"prefill: {time.perf_counter() - start:.2f} s")

    active = jnp.ones((args.batch,), bool)
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    step, (params, cache, tokens, active), layout = _placed_step(args, config, params, cache,
                                                                 tokens, active)
    # The one-device reference reads the cache before the first (donating) step does.
    reference = (jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True),
                                        (params, cache, tokens, active)) if args.check else None)
    start = time.perf_counter()
    decode = _compiled_decode(step, params, cache, tokens, active)
    print(f"decode: {layout}; step compiled in {time.perf_counter() - start:.2f} s, before the "
          f"timed steps")
    latencies, generated = [], []
    for i in range(args.tokens):
        start = time.perf_counter()
        cache, tokens, logits, ok = decode(params, cache, tokens, active)
        tokens.block_until_ready()
        latencies.append(time.perf_counter() - start)
        if i == 0 and reference is not None:
            if not _check_against_one_device(args, config, *reference, logits):
                return 1
        paged.check(ok, f"decode step {i + 1}")
        generated.append(np.asarray(tokens))
        _progress(i + 1, args.tokens, latencies[-1] * 1e3)
    median = statistics.median(latencies)
    print(f"per-step latency (compilation excluded): median {median * 1e3:.2f} ms, "
          f"max {max(latencies) * 1e3:.2f} ms over {len(latencies)} steps")
    print(f"throughput: {args.batch / median:.1f} tokens/s ({args.batch} requests x "
          f"{1 / median:.1f} steps/s)")
    print(f"request 0 generated: {[int(t[0]) for t in generated[:16]]}...")
    return 0
