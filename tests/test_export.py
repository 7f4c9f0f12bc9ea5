"""jax.export of a decode step: lowering for CUDA works on a machine without a GPU, the module
names the stable custom-call targets, and a CPU export round-trips through serialization."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash_mla

from decode_grid import HEAD_DIM_V, Case

TARGETS = ("jax_flash_mla_get_mla_metadata", "jax_flash_mla_decode")
CASE = Case(b=3, s_q=2, s_k=100, h_q=16, page=16, causal=True, lengths="varlen+zeros")
FP8_CASE = Case(b=3, s_q=2, s_k=100, h_q=16, page=16, causal=True, lengths="varlen+zeros",
                fp8=True)
CASES = pytest.mark.parametrize("case", [CASE, FP8_CASE], ids=["bf16", "fp8"])


def decode_step(q, k_cache, block_table, cache_seqlens, num_sm_parts=None):
    """One layer's decode; a uint8 cache is the FP8 one (the same target: the dtype says it)."""
    h_kv = k_cache.shape[2]
    metadata = jax_flash_mla.get_mla_metadata(cache_seqlens, q.shape[1] * q.shape[2] // h_kv,
                                              h_kv, num_sm_parts=num_sm_parts)
    return jax_flash_mla.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens,
                                                HEAD_DIM_V, metadata=metadata, causal=True,
                                                is_fp8_kvcache=k_cache.dtype == jnp.uint8)


def export(inputs, platform, num_sm_parts=None):
    step = jax.jit(decode_step, static_argnames="num_sm_parts")
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs]
    # Only JAX's own targets carry its compatibility guarantee; ours must be allowed by name.
    allowed = [jax.export.DisabledSafetyCheck.custom_call(target) for target in TARGETS]
    return jax.export.export(step, platforms=[platform], disabled_checks=allowed)(
        *shapes, num_sm_parts=num_sm_parts)


@CASES
@pytest.mark.parametrize("num_sm_parts", [None, 132])
def test_export_for_cuda_names_the_targets(num_sm_parts, case, rng):
    exported = export(case.make_inputs(rng), "cuda", num_sm_parts)
    assert exported.platforms == ("cuda",)
    module = exported.mlir_module()
    for target in TARGETS:
        assert target in module


@CASES
def test_cpu_export_round_trips(case, rng):
    pytest.importorskip("flatbuffers", reason="jax.export serialization needs flatbuffers")
    cpu = jax.devices("cpu")[0]
    inputs = jax.device_put(tuple(case.make_inputs(rng)), cpu)
    exported = export(inputs, "cpu")
    for target in TARGETS:
        assert target in exported.mlir_module()
    restored = jax.export.deserialize(exported.serialize())
    got = restored.call(*inputs)
    want = jax.jit(decode_step)(*inputs)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and not jnp.isnan(a).any()
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
