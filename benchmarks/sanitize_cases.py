"""A few decode calls for compute-sanitizer, on the tests' hostile inputs
(jax_flash_mla/paged_inputs.py): garbage block-table entries past each request's pages
(negative, huge, just past the pool, other pages), invalid pages inside the length, NaN in
every cache slot no request may read, lengths past the table's capacity, negative lengths,
zero-length requests, page sizes 1..256, causal s_q > 1, several splits, bf16 and FP8 pools
(dead tokens of an FP8 one all bytes 0xFF); and sparse decode
(bf16 and FP8 pools) over garbage indices (negative, INT32_MIN/MAX, just past the pool), garbage
topk_length (negative, past topk) and NaN in every pool token no index may read; and sparse
prefill over garbage indices (its kernels also write max_logits and its split scratch)."""

import numpy as np
import jax
import jax.numpy as jnp

import jax_flash_mla
from jax_flash_mla.paged_inputs import make_paged_inputs, quantized_pool

# b, s_q, h_q, h_kv, d, page, lengths, invalid in-length pages, overflow: the requests that
# fill the table (extra columns 0) get lengths past its capacity, the empty ones negative ones.
CASES = [
    (3, 1, 16, 1, 576, 64, [512, 0, 129], 0, True),
    (4, 2, 128, 1, 576, 16, [0, 300, 320, 64], 2, True),
    (2, 4, 9, 3, 512, 1, [33, 2], 3, True),
    # Key groups of TMA boxes over pages 8 and 16, a second KV head, d = 512, at most 32 rows.
    (3, 2, 32, 2, 576, 8, [700, 0, 37], 4, False),
    (4, 1, 16, 1, 512, 16, [100, 37, 0, 128], 0, True),
    # 64 rows a KV head: page 8 with a second KV head; d = 512, two row blocks; page 256.
    (3, 1, 64, 2, 576, 8, [300, 0, 37], 0, False),
    (2, 1, 128, 1, 512, 16, [100, 128], 1, True),
    (5, 1, 64, 2, 576, 256, [1, 257, 1000, 0, 511], 1, False),
    # 64 rows a KV head: at parts = 1 the unpaired seesaw (6 requests of 8 table tiles pass
    # seesaw_alone_pays), at 7 and 132 the 64-row kernel.
    (6, 1, 64, 1, 576, 64, [300, 0, 511, 512, 64, 0], 0, True),
    # Keys by cp.async (page 3) at 128 rows: the lockstep kernel's key-row gather, two row
    # blocks, over a table with invalid pages and entries past the pool.
    (2, 1, 128, 1, 576, 3, [1500, 700], 2, True),
]


def run_case(rng, b, s_q, h_q, h_kv, d, page, lengths, invalid_pages, overflow):
    """The bf16 pool, and where the FP8 layout holds it (one KV head, d = 576) the same pool
    quantized (dead tokens all bytes 0xFF)."""
    assert len(lengths) == b
    inputs = make_paged_inputs(rng, lengths, s_q=s_q, h_q=h_q, h_kv=h_kv, d=d, page=page,
                               dtype=jnp.float32, invalid_pages=invalid_pages,
                               overflow=overflow)
    q, table, seqlens = (jnp.asarray(x) for x in (inputs.q, inputs.block_table,
                                                  inputs.cache_seqlens))
    q = q.astype(jnp.bfloat16)
    pools = {False: jnp.asarray(inputs.k_cache, jnp.bfloat16)}
    if h_kv == 1 and d == 576:
        pools[True] = jnp.asarray(quantized_pool(inputs.k_cache))
    for fp8, cache in pools.items():
        for parts in (1, 7, 132):
            meta = jax_flash_mla.get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv,
                                                  num_sm_parts=parts)
            out, lse = jax_flash_mla.flash_mla_with_kvcache(
                q, cache, table, seqlens, 512, meta, causal=s_q > 1, is_fp8_kvcache=fp8)
            jax.block_until_ready((out, lse))
            # The reference runs on the CPU: under memcheck, XLA's GPU autotuning of its
            # matmuls would take minutes.
            cpu_args = jax.device_put((q, cache, table, seqlens), jax.devices("cpu")[0])
            ref_out, _ = jax_flash_mla.reference.flash_mla_with_kvcache(
                *cpu_args, 512, causal=s_q > 1, is_fp8_kvcache=fp8)
            # NaN if a kernel read a dead slot.
            err = float(np.max(np.abs(np.asarray(out, np.float32) -
                                      np.asarray(ref_out, np.float32))))
            print(f"b={b} s_q={s_q} h_q={h_q} h_kv={h_kv} d={d} page={page} fp8={fp8} "
                  f"lengths={np.asarray(seqlens).tolist()} parts={parts}: "
                  f"max |out - ref| = {err:.2e}")


# b, s_q, h_q, topk, page, num_blocks, attn_sink
SPARSE_CASES = [
    (3, 2, 8, 100, 64, 4, False),
    (2, 1, 64, 300, 1, 500, True),
    (4, 2, 128, 64, 16, 20, True),
    (1, 4, 20, 7, 3, 5, False),
    # 128 heads without a sink: two row blocks a query token, which the seesaw may take in pairs.
    (2, 2, 128, 100, 1, 300, False),
    # A bf16 pool of one-token pages, 19 tiles a request: the key-row gather over many tiles.
    (2, 1, 64, 1200, 1, 3000, True),
]


def garbage_indices(rng, shape, pool_tokens):
    """Indices where every other slot is valid and the rest is hostile."""
    valid = rng.integers(0, pool_tokens, shape)
    hostile = rng.choice(np.array([-1, -(2**31), 2**31 - 1, pool_tokens, pool_tokens + 1,
                                   -pool_tokens], np.int64), shape)
    return np.where(rng.random(shape) < 0.5, valid, hostile).astype(np.int32)


def run_sparse_case(rng, b, s_q, h_q, topk, page, num_blocks, with_sink):
    pool_tokens = num_blocks * page
    indices = garbage_indices(rng, (b, s_q, topk), pool_tokens)
    # Every token no counted slot names holds NaN: a read of one shows in the output.
    latents = rng.standard_normal((pool_tokens, 576)).astype(np.float32)
    topk_length = rng.choice(np.array([-3, 0, topk // 2, topk, topk + 9], np.int32), b)
    counted = np.zeros(pool_tokens, bool)
    for i in range(b):
        named = indices[i, :, :max(0, min(topk, topk_length[i]))].ravel()
        counted[named[(named >= 0) & (named < pool_tokens)]] = True
    latents[~counted] = np.nan
    latents = jnp.asarray(latents.reshape(num_blocks, page, 1, 576), jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((b, s_q, h_q, 576)), jnp.bfloat16)
    sink = jnp.asarray(rng.standard_normal(h_q), jnp.float32) if with_sink else None
    for fp8 in (False, True):
        cache = jax_flash_mla.quantize_fp8_kvcache(latents) if fp8 else latents
        for parts in (1, 7, 132):
            meta = jax_flash_mla.get_mla_metadata(None, s_q * h_q, 1, h_q, fp8, topk,
                                                  topk_length=jnp.asarray(topk_length),
                                                  num_sm_parts=parts)
            kwargs = dict(is_fp8_kvcache=fp8, indices=jnp.asarray(indices),
                          topk_length=jnp.asarray(topk_length), attn_sink=sink)
            out, lse = jax_flash_mla.flash_mla_with_kvcache(q, cache, metadata=meta, **kwargs)
            jax.block_until_ready((out, lse))
            cpu = jax.devices("cpu")[0]
            on_cpu = {k: v if isinstance(v, bool) else jax.device_put(v, cpu)
                      for k, v in kwargs.items()}
            ref_out, _ = jax_flash_mla.reference.flash_mla_with_kvcache(
                jax.device_put(q, cpu), jax.device_put(cache, cpu), **on_cpu)
            err = float(np.max(np.abs(np.asarray(out, np.float32) -
                                      np.asarray(ref_out, np.float32))))
            print(f"sparse b={b} s_q={s_q} h_q={h_q} topk={topk} page={page} fp8={fp8} "
                  f"sink={with_sink} parts={parts}: max |out - ref| = {err:.2e}")


# Sparse prefill (s_q, h_q, s_kv, topk, with sink): its kernels add max_logits and its split
# scratch to the sparse decode's writes.
SPARSE_PREFILL_CASES = [
    (40, 64, 300, 300, True),
    (9, 128, 50, 600, False),
    (17, 16, 1000, 64, True),
]


def run_sparse_prefill_case(rng, s_q, h_q, s_kv, topk, with_sink):
    indices = garbage_indices(rng, (s_q, 1, topk), s_kv)
    topk_length = rng.choice(np.array([-3, 0, topk // 2, topk, topk + 9], np.int32), s_q)
    kv = jnp.asarray(rng.standard_normal((s_kv, 1, 576)), jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((s_q, h_q, 576)), jnp.bfloat16)
    sink = jnp.asarray(rng.standard_normal(h_q), jnp.float32) if with_sink else None
    out, max_logits, lse = jax_flash_mla.flash_mla_sparse_fwd(
        q, kv, jnp.asarray(indices), 576 ** -0.5, attn_sink=sink,
        topk_length=jnp.asarray(topk_length))
    jax.block_until_ready((out, max_logits, lse))
    finite = np.isfinite(np.asarray(max_logits)) | np.isneginf(np.asarray(max_logits))
    print(f"sparse prefill s_q={s_q} h_q={h_q} s_kv={s_kv} topk={topk} sink={with_sink}: "
          f"max_logits finite or -inf everywhere: {bool(finite.all())}")


def main():
    rng = np.random.default_rng(1)
    for case in CASES:
        run_case(rng, *case)
    for case in SPARSE_CASES:
        run_sparse_case(rng, *case)
    for case in SPARSE_PREFILL_CASES:
        run_sparse_prefill_case(rng, *case)


if __name__ == "__main__":
    main()
