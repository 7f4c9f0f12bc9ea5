"""A few decode calls for compute-sanitizer: garbage block-table entries past each request's
length (negative, huge), invalid pages inside the length, lengths past the table's capacity,
negative lengths, zero-length requests, page sizes 1..256, causal s_q > 1, several splits."""

import numpy as np
import jax
import jax.numpy as jnp

import jax_flash_mla

CASES = [  # b, s_q, h_q, h_kv, d, page, lengths
    (3, 1, 16, 1, 576, 64, [5000, 0, 129]),
    (4, 2, 128, 1, 576, 16, [-7, 300, 1 << 30, 64]),
    (2, 4, 9, 3, 512, 1, [33, 2]),
    # The narrow kernel's key-group boxes (pages 8 and 16, a second KV head, d = 512).
    (3, 2, 32, 2, 576, 8, [700, 0, 37]),
    (4, 1, 16, 1, 512, 16, [100, 37, -1, 128]),
    # The 64-row kernel's key-group boxes (page 8 with a second KV head; d = 512, two row blocks).
    (3, 1, 64, 2, 576, 8, [300, 0, 37]),
    (2, 1, 128, 1, 512, 16, [100, 1 << 30]),
    (5, 1, 64, 2, 576, 256, [1, 257, 1000, 0, 511]),
    # 64 rows a KV head: at parts = 1 the unpaired seesaw (6 requests of 8 table tiles pass
    # seesaw_alone_pays), at 7 and 132 the 64-row kernel.
    (6, 1, 64, 1, 576, 64, [300, 0, 511, 1 << 30, 64, -3]),
]


def run_case(rng, b, s_q, h_q, h_kv, d, page, lengths):
    max_blocks = 8
    num_blocks = b * max_blocks // 2 + 1
    table = rng.integers(-2**31, 2**31 - 1, size=(b, max_blocks), dtype=np.int64).astype(np.int32)
    table[:, : max_blocks // 2] = rng.integers(0, num_blocks, size=(b, max_blocks // 2))
    cache = jnp.asarray(rng.standard_normal((num_blocks, page, h_kv, d)), jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((b, s_q, h_q, d)), jnp.bfloat16)
    seqlens = jnp.asarray(np.array(lengths, np.int32))
    for parts in (1, 7, 132):
        meta = jax_flash_mla.get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv, num_sm_parts=parts)
        out, lse = jax_flash_mla.flash_mla_with_kvcache(
            q, cache, jnp.asarray(table), seqlens, 512, meta, causal=s_q > 1)
        jax.block_until_ready((out, lse))
        # The reference runs on the CPU: under memcheck, XLA's GPU autotuning of its matmuls
        # would take minutes.
        cpu_args = jax.device_put((q, cache, jnp.asarray(table), seqlens), jax.devices("cpu")[0])
        ref_out, _ = jax_flash_mla.reference.flash_mla_with_kvcache(
            *cpu_args, 512, causal=s_q > 1)
        err = float(np.max(np.abs(np.asarray(out, np.float32) - np.asarray(ref_out, np.float32))))
        print(f"b={b} s_q={s_q} h_q={h_q} h_kv={h_kv} d={d} page={page} parts={parts}: "
              f"max |out - ref| = {err:.2e}")


def main():
    rng = np.random.default_rng(1)
    for case in CASES:
        run_case(rng, *case)


if __name__ == "__main__":
    main()
