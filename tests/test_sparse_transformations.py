"""The sparse (top-k) decode under JAX's transformations: vmap (one pool shared by the instances
or one pool each, attn_sink and topk_length per instance), jax.export and its serialization,
jax.jit with NamedSharding on 8 CPU devices (head-parallel, batch-parallel with shard-local
pools, both), and the refusal of autodiff. Inputs are test_sparse_reference.py's, NaN wherever
nothing should read, and every result is held to test_sparse_decode.py's tolerances."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_flash_mla
from jax_flash_mla import testing

from test_sharding import COLLECTIVES, DEVICES, cpu_mesh
from test_sparse_decode import KernelCase, assert_matches, run_reference, sparse_metadata
from test_sparse_reference import make_inputs

INSTANCES = 3


def stack(instances):
    """Per-instance (q, k_cache, indices, topk_length, attn_sink) -> the same, stacked on a new
    leading axis (None stays None)."""
    return tuple(None if xs[0] is None else jnp.stack(xs) for xs in zip(*instances))


def check_instances(out, lse, cases, instances):
    """Instance v of the vmapped (out, lse) against the reference of instance v alone."""
    for v, (case, inputs) in enumerate(zip(cases, instances)):
        assert_matches(out[v], lse[v], *run_reference(case, *inputs))


# --- vmap ----------------------------------------------------------------------------------------

def test_vmap_with_a_shared_pool(rng):
    """k_cache (and attn_sink) not vmapped: every instance's indices name tokens of the one
    pool. Built as one batch of INSTANCES * 2 requests over one pool, then cut per instance."""
    case = KernelCase(b=2 * INSTANCES, s_q=2, h_q=16, page=16, num_blocks=20, topk=300,
                      topk_length=(300, 0, 150, 299, 1000, 64), sink="random")
    (q, k_cache, indices, topk_length, sink), _ = make_inputs(case, rng)
    per_instance = lambda x: x.reshape((INSTANCES, 2) + x.shape[1:])
    decode = jax.jit(jax.vmap(lambda q, i, t: testing.sparse_decode_poisoned(
        q, k_cache, i, is_fp8_kvcache=True, topk_length=t, attn_sink=sink)))
    out, lse = decode(*map(per_instance, (q, indices, topk_length)))
    assert out.shape == (INSTANCES, 2, 2, 16, 512) and lse.shape == (INSTANCES, 2, 16, 2)
    fold = lambda x: x.reshape((-1,) + x.shape[2:])
    assert_matches(fold(out), fold(lse), *run_reference(case, q, k_cache, indices, topk_length,
                                                        sink))


def test_vmap_over_instances_with_their_own_pools(rng):
    """k_cache vmapped: the folded call concatenates the pools, and an index that is invalid in
    its own pool (past its end, up to INT32_MAX) must not reach the next instance's tokens."""
    case = KernelCase(b=2, s_q=2, h_q=16, page=16, num_blocks=10, topk=200, invalid=0.3,
                      fp8=False)
    instances = [make_inputs(case, rng)[0] for _ in range(INSTANCES)]
    decode = jax.jit(jax.vmap(lambda q, k, i: testing.sparse_decode_poisoned(q, k, i)))
    q, k_cache, indices, _, _ = stack(instances)
    out, lse = decode(q, k_cache, indices)
    check_instances(out, lse, [case] * INSTANCES, instances)


def test_vmap_with_an_attn_sink_per_instance(rng):
    """attn_sink vmapped (no folded form: the instances run one after another), each instance
    with its own pool, topk_length and sink."""
    cases = [KernelCase(b=2, h_q=16, page=64, num_blocks=4, topk=100, topk_length=lengths,
                        sink="infinite") for lengths in ((100, 3), (0, 50), (64, 1000))]
    instances = [make_inputs(case, rng)[0] for case in cases]
    decode = jax.jit(jax.vmap(lambda q, k, i, t, s: testing.sparse_decode_poisoned(
        q, k, i, is_fp8_kvcache=True, topk_length=t, attn_sink=s)))
    out, lse = decode(*stack(instances))
    check_instances(out, lse, cases, instances)


def test_vmap_with_topk_length_per_instance_and_metadata_inside(rng):
    """topk_length vmapped, and with it the metadata get_mla_metadata computes inside the
    vmapped function (one schedule per instance; the folded call reschedules)."""
    cases = [KernelCase(b=2, s_q=2, h_q=16, page=16, num_blocks=30, topk=400,
                        topk_length=lengths) for lengths in ((400, 7), (0, 0), (-1, 250))]
    instances = [make_inputs(case, rng)[0] for case in cases]

    def step(q, k_cache, indices, topk_length):
        metadata = sparse_metadata(q, indices, topk_length, True, 5)
        return testing.sparse_decode_poisoned(q, k_cache, indices, metadata=metadata,
                                              is_fp8_kvcache=True, topk_length=topk_length)

    out, lse = jax.jit(jax.vmap(step))(*stack(instances)[:4])
    check_instances(out, lse, cases, instances)


def test_vmap_refuses_pools_that_fold_past_int32_indices():
    """Three pools of 2**30 tokens fold into one that int32 indices cannot address: an error
    at trace time (from the shapes alone), not indices that wrap into another instance."""
    shapes = (jax.ShapeDtypeStruct((3, 2, 1, 16, 576), jnp.bfloat16),
              jax.ShapeDtypeStruct((3, 2 ** 20, 1024, 1, 576), jnp.bfloat16),
              jax.ShapeDtypeStruct((3, 2, 1, 64), jnp.int32))
    decode = jax.vmap(lambda q, k, i: jax_flash_mla.flash_mla_with_kvcache(q, k, indices=i))
    with pytest.raises(ValueError, match=r"^k_cache: .*\b3221225472\b"):
        jax.eval_shape(decode, *shapes)


# --- jax.export ----------------------------------------------------------------------------------

TARGETS = ("jax_flash_mla_get_mla_metadata", "jax_flash_mla_sparse_decode")
EXPORT_CASE = KernelCase(b=2, s_q=2, h_q=16, page=16, num_blocks=20, topk=300,
                         topk_length=(300, 120), sink="random")


def decode_step(q, k_cache, indices, topk_length, attn_sink):
    # num_sm_parts explicit: the exporting machine's SM count is not the running one's.
    metadata = sparse_metadata(q, indices, topk_length, True, 8)
    return jax_flash_mla.flash_mla_with_kvcache(q, k_cache, metadata=metadata,
                                                is_fp8_kvcache=True, indices=indices,
                                                topk_length=topk_length, attn_sink=attn_sink)


def export(inputs, platform):
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs]
    # Only JAX's own targets carry its compatibility guarantee; ours must be allowed by name.
    allowed = [jax.export.DisabledSafetyCheck.custom_call(target) for target in TARGETS]
    return jax.export.export(jax.jit(decode_step), platforms=[platform],
                             disabled_checks=allowed)(*shapes)


def test_export_lowers_for_cuda_without_a_gpu(rng):
    """The CUDA module calls the sparse target once, on the FP8 pool as given (the kernels
    dequantize as they gather: no bf16 copy of the pool or of the selected tokens first)."""
    exported = export(make_inputs(EXPORT_CASE, rng)[0], "cuda")
    assert exported.platforms == ("cuda",)
    module = exported.mlir_module()
    assert TARGETS[0] in module
    calls = [line for line in module.splitlines() if f"@{TARGETS[1]}(" in line]
    assert len(calls) == 1, calls
    assert "x656xui8>" in calls[0], calls[0]
    assert "f8E4M3" not in module, "e4m3 codes converted outside the kernels"


def test_cpu_export_round_trips(rng):
    pytest.importorskip("flatbuffers", reason="jax.export serialization needs flatbuffers")
    inputs = jax.device_put(make_inputs(EXPORT_CASE, rng)[0], jax.devices("cpu")[0])
    exported = export(inputs, "cpu")
    for target in TARGETS:
        assert target in exported.mlir_module()
    got = jax.export.deserialize(exported.serialize()).call(*inputs)
    want = jax.jit(decode_step)(*inputs)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and not jnp.isnan(a).any()
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert_matches(*got, *run_reference(EXPORT_CASE, *inputs))


# --- sharding over 8 CPU devices -----------------------------------------------------------------

needs_8_devices = pytest.mark.skipif(len(jax.devices("cpu")) < DEVICES,
                                     reason="needs --xla_force_host_platform_device_count=8")


def sharded_step(q, k_cache, indices, topk_length, attn_sink):
    is_fp8 = k_cache.dtype != jnp.bfloat16  # bytes (the 656-byte layout) or latents
    # num_sm_parts explicit: the default counts the heads of the whole op, not of a shard.
    metadata = sparse_metadata(q, indices, topk_length, is_fp8, 4)
    return jax_flash_mla.flash_mla_with_kvcache(q, k_cache, metadata=metadata,
                                                is_fp8_kvcache=is_fp8, indices=indices,
                                                topk_length=topk_length, attn_sink=attn_sink)


def run_sharded(mesh, specs, args):
    """(out, lse) of the step jitted with these input shardings, and its compiled HLO."""
    shardings = tuple(NamedSharding(mesh, spec) for spec in specs)
    step = jax.jit(sharded_step, in_shardings=shardings)
    args = [jax.device_put(x, s) for x, s in zip(args, shardings)]
    return step(*args), step.lower(*args).compile().as_text()


def unsharded(*args):
    """The op on one CPU device, as the sharded runs use the CPU devices."""
    return jax.jit(sharded_step)(*jax.device_put(args, jax.devices("cpu")[0]))


def assert_no_collectives(hlo):
    found = [c for c in COLLECTIVES if c in hlo]
    assert not found, f"the sharded sparse decode communicates: {found}"


def assert_each_device_decodes(hlo, out_shape):
    """Every device's custom call computes one shard of out (its shape), not the whole."""
    calls = [line for line in hlo.splitlines()
             if 'custom_call_target="jax_flash_mla_sparse_decode"' in line]
    shape = ",".join(map(str, out_shape))
    assert calls and all(f"= (bf16[{shape}]" in line for line in calls), calls


def shard_local_inputs(rng, case, shards):
    """`shards` instances of `case`, each with its own pool, laid side by side: q, indices and
    topk_length along the batch, the pools along the block axis (each shard's slice its own,
    its indices local to it); and the indices of the same tokens in the whole pool."""
    instances = [make_inputs(case, rng)[0] for _ in range(shards)]
    q, k_cache, indices, topk_length = (np.concatenate(xs) for xs in list(zip(*instances))[:4])
    pool_tokens = case.num_blocks * case.page
    shard = np.repeat(np.arange(shards), case.b)[:, None, None]
    valid = (indices >= 0) & (indices < pool_tokens)
    global_indices = np.where(valid, indices + shard * pool_tokens, -1).astype(np.int32)
    sink = (rng.standard_normal(case.h_q) * 3).astype(np.float32)
    return [q, k_cache, indices, topk_length, sink], global_indices


@needs_8_devices
def test_head_parallel(rng):
    """q, attn_sink, out and lse split on heads (2 of 16 a device); pool, indices and lengths
    replicated. Each device schedules as the whole op does (num_sm_parts given): bit-equal."""
    case = KernelCase(b=3, s_q=2, h_q=16, page=16, num_blocks=20, topk=300,
                      topk_length=(300, 0, 77), sink="infinite")
    args = list(make_inputs(case, rng)[0])
    mesh = cpu_mesh((DEVICES,), ("tp",))
    (out, lse), hlo = run_sharded(mesh, (P(None, None, "tp", None), P(), P(), P(), P("tp")),
                                  args)
    assert out.sharding.spec[2] == "tp" and lse.sharding.spec[1] == "tp"
    assert_no_collectives(hlo)
    assert_each_device_decodes(hlo, (3, 2, 16 // DEVICES, 512))
    want_out, want_lse = unsharded(*args)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want_out, np.float32))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(want_lse))
    assert_matches(out, lse, *run_reference(case, *args))


@needs_8_devices
def test_batch_parallel_with_shard_local_pools(rng):
    """q, indices, topk_length, out and lse split on the batch, k_cache on its block axis over
    the same mesh axis: each device owns a pool and its requests' indices are local to it
    (an index past its pool, which would land in the next shard's, counts nothing). Against
    one device over the whole pool with global indices: each shard schedules its own requests,
    so split points move, within the tolerance."""
    case = KernelCase(b=2, s_q=2, h_q=16, page=16, num_blocks=6, topk=200,
                      topk_length=(200, 90), invalid=0.3)
    args, global_indices = shard_local_inputs(rng, case, DEVICES)
    mesh = cpu_mesh((DEVICES,), ("dp",))
    (out, lse), hlo = run_sharded(mesh, (P("dp"), P("dp"), P("dp"), P("dp"), P()), args)
    assert out.sharding.spec[0] == "dp" and lse.sharding.spec[0] == "dp"
    assert_no_collectives(hlo)
    assert_each_device_decodes(hlo, (2, 2, 16, 512))
    q, k_cache, _, topk_length, sink = args
    whole_pool = (q, k_cache, global_indices, topk_length, sink)
    assert_matches(out, lse, *unsharded(*whole_pool))
    assert_matches(out, lse, *run_reference(case, *whole_pool))


@needs_8_devices
def test_batch_and_head_parallel_together(rng):
    """A 2 x 4 mesh: the batch and the pools over 'dp' (shard-local indices), heads and
    attn_sink over 'tp'."""
    case = KernelCase(b=2, s_q=1, h_q=16, page=64, num_blocks=3, topk=150,
                      topk_length=(150, 33), fp8=False)
    args, global_indices = shard_local_inputs(rng, case, 2)
    mesh = cpu_mesh((2, 4), ("dp", "tp"))
    (out, lse), hlo = run_sharded(
        mesh, (P("dp", None, "tp", None), P("dp"), P("dp"), P("dp"), P("tp")), args)
    assert out.sharding.spec[0] == "dp" and out.sharding.spec[2] == "tp"
    assert_no_collectives(hlo)
    assert_each_device_decodes(hlo, (2, 1, 4, 512))
    q, k_cache, _, topk_length, sink = args
    whole_pool = (q, k_cache, global_indices, topk_length, sink)
    assert_matches(out, lse, *unsharded(*whole_pool))
    assert_matches(out, lse, *run_reference(case, *whole_pool))


# --- autodiff ------------------------------------------------------------------------------------

def test_differentiating_the_sparse_decode_raises_a_clear_error(rng):
    case = KernelCase(b=1, topk=64)
    q, k_cache, indices, _, _ = make_inputs(case, rng)[0]
    loss = lambda q: jnp.sum(jax_flash_mla.flash_mla_with_kvcache(
        q, k_cache, is_fp8_kvcache=True, indices=indices)[0].astype(jnp.float32))
    with pytest.raises(NotImplementedError, match="not differentiable"):
        jax.grad(loss)(jnp.asarray(q))
