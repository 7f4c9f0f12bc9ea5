"""vmap (batching rules) and the refusal of autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash_mla
from jax_flash_mla.testing import SPLIT_KV_KERNELS, flash_mla_with_kvcache_poisoned

from comparisons import KERNEL_LSE_ATOL, KERNEL_OUT_ROUNDINGS, assert_attention_close
from jax_flash_mla.paged_inputs import make_paged_inputs, random_seqlens, stack_instances

S_Q, H_Q, D, PAGE = 2, 16, 576, 16


def instance(rng, b=3, s_k=150, fp8=False):
    """One instance's inputs; with fp8 its pool in the 656-byte FP8 layout."""
    seqlens = random_seqlens(rng, b, s_k, varlen=True, with_zeros=True)
    return make_paged_inputs(rng, seqlens, s_q=S_Q, h_q=H_Q, h_kv=1, d=D, page=PAGE,
                             dtype=jnp.bfloat16, extra_columns=2, invalid_pages=1, q_scale=1.0,
                             fp8=fp8)


def stacked(instances):
    return tuple(jnp.asarray(x) for x in stack_instances(instances))


def check_against_loop(out, lse, instances, causal, fp8=False):
    for v, (q, k, table, seqlens) in enumerate(instances):
        ref_out, ref_lse = jax_flash_mla.reference.flash_mla_with_kvcache(
            q, k, table, seqlens, 512, causal=causal, is_fp8_kvcache=fp8)
        assert_attention_close(out[v], lse[v], ref_out, ref_lse, dtype=jnp.dtype(jnp.bfloat16),
                               out_roundings=KERNEL_OUT_ROUNDINGS, lse_atol=KERNEL_LSE_ATOL)


@pytest.mark.parametrize("causal", [False, True])
def test_vmap_over_instances_with_their_own_pools(rng, causal):
    """Each instance has its own page pool: the folded call must not let an instance reach
    another's pages, even through invalid (masked) block-table entries."""
    instances = [instance(rng) for _ in range(3)]
    q, k_cache, tables, seqlens = stacked(instances)
    decode = jax.jit(jax.vmap(
        lambda q, k, t, s: flash_mla_with_kvcache_poisoned(q, k, t, s, 512, causal=causal)))
    out, lse = decode(q, k_cache, tables, seqlens)
    assert out.shape == (3,) + instances[0][0].shape[:3] + (512,)
    check_against_loop(out, lse, instances, causal)


def test_vmap_over_fp8_pools(rng):
    """The same over FP8 pools (is_fp8_kvcache): the padding pages are all 0xFF, NaN if read."""
    instances = [instance(rng, fp8=True) for _ in range(3)]
    q, k_cache, tables, seqlens = stacked(instances)
    assert k_cache.dtype == jnp.uint8
    decode = jax.jit(jax.vmap(lambda q, k, t, s: flash_mla_with_kvcache_poisoned(
        q, k, t, s, 512, causal=True, is_fp8_kvcache=True)))
    out, lse = decode(q, k_cache, tables, seqlens)
    check_against_loop(out, lse, instances, True, fp8=True)


def test_vmap_with_a_shared_pool_and_vmapped_metadata(rng):
    """One pool for all instances (k_cache not vmapped); metadata computed under vmap."""
    base = instance(rng)
    q0, k_cache, table0, seqlens0 = base
    instances = []
    for _ in range(2):
        # Shorter than the pool's live tokens (past them the pool holds NaN).
        seqlens = (np.asarray(seqlens0) * rng.uniform(0, 1, size=len(seqlens0))).astype(np.int32)
        q = jnp.asarray(rng.standard_normal(q0.shape), jnp.bfloat16)
        instances.append((q, k_cache, table0, jnp.asarray(seqlens, jnp.int32)))
    q = jnp.stack([x[0] for x in instances])
    seqlens = jnp.stack([x[3] for x in instances])

    def step(q, seqlens):
        metadata = jax_flash_mla.get_mla_metadata(seqlens, S_Q * H_Q, 1, num_sm_parts=5)
        return flash_mla_with_kvcache_poisoned(q, k_cache, table0, seqlens, 512, metadata)

    out, lse = jax.jit(jax.vmap(step))(q, seqlens)
    check_against_loop(out, lse, instances, causal=False)


def test_vmap_keeps_the_forced_split_kv_kernel(rng):
    """The batching rule binds the folded decode with the same static params, the split-KV
    kernel among them: the one custom call of the folded batch runs the forced kernel."""
    q, k_cache, tables, seqlens = stacked([instance(rng) for _ in range(2)])
    decode = jax.jit(jax.vmap(lambda q, k, t, s: flash_mla_with_kvcache_poisoned(
        q, k, t, s, 512, kernel="seesaw_alone")))
    hlo = decode.lower(q, k_cache, tables, seqlens).as_text()
    (call,) = [line for line in hlo.splitlines() if "custom_call @jax_flash_mla_decode(" in line]
    assert f"kernel = {SPLIT_KV_KERNELS['seesaw_alone']} : i32" in call
    assert "tensor<6x2x16x576xbf16>" in call  # two instances of 3 requests, folded


def test_vmapped_metadata_equals_per_instance_metadata(rng):
    seqlens = jnp.asarray(rng.integers(0, 500, size=(4, 6)), jnp.int32)
    batched = jax.vmap(lambda s: jax_flash_mla.get_mla_metadata(s, 16, 1, num_sm_parts=7))(seqlens)
    for v in range(seqlens.shape[0]):
        single = jax_flash_mla.get_mla_metadata(seqlens[v], 16, 1, num_sm_parts=7)
        np.testing.assert_array_equal(batched.tile_scheduler_metadata[v],
                                      single.tile_scheduler_metadata)
        np.testing.assert_array_equal(batched.num_splits[v], single.num_splits)


def test_nested_vmap(rng):
    instances = [instance(rng, b=2, s_k=70) for _ in range(4)]
    q, k_cache, tables, seqlens = stacked(instances)
    reshape = lambda x: x.reshape((2, 2) + x.shape[1:])
    decode = jax.vmap(jax.vmap(lambda q, k, t, s: jax_flash_mla.flash_mla_with_kvcache(q, k, t, s)))
    out, lse = jax.jit(decode)(*map(reshape, (q, k_cache, tables, seqlens)))
    check_against_loop(out.reshape((4,) + out.shape[2:]), lse.reshape((4,) + lse.shape[2:]),
                       instances, causal=False)


def test_differentiating_the_kernel_raises_a_clear_error(rng):
    q, k_cache, table, seqlens = instance(rng)
    loss = lambda q: jnp.sum(jax_flash_mla.flash_mla_with_kvcache(
        q, k_cache, table, seqlens)[0].astype(jnp.float32))
    with pytest.raises(NotImplementedError, match="not differentiable"):
        jax.grad(loss)(jnp.asarray(q, jnp.bfloat16))
