"""The decode under jax.jit with NamedSharding on 8 CPU devices: head-parallel and
batch-parallel layouts match the unsharded op, and the compiled program moves no cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_flash_mla
from jax_flash_mla import api
from jax_flash_mla._constants import METADATA_INTS, SPLIT_KV_KERNELS

from jax_flash_mla.paged_inputs import make_paged_inputs, random_seqlens, stack_instances

DEVICES = 8
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")

pytestmark = pytest.mark.skipif(len(jax.devices("cpu")) < DEVICES,
                                reason="needs --xla_force_host_platform_device_count=8")


def cpu_mesh(shape, names):
    return jax.sharding.Mesh(np.array(jax.devices("cpu")[:DEVICES]).reshape(shape), names)


def decode_step(q, k_cache, block_table, seqlens):
    """One layer's decode; a uint8 cache is the FP8 one."""
    metadata = jax_flash_mla.get_mla_metadata(seqlens, q.shape[1] * q.shape[2], 1, num_sm_parts=4)
    return jax_flash_mla.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, metadata,
                                                causal=True,
                                                is_fp8_kvcache=k_cache.dtype == jnp.uint8)


def run_sharded(mesh, specs, args):
    shardings = tuple(NamedSharding(mesh, spec) for spec in specs)
    step = jax.jit(decode_step, in_shardings=shardings)
    args = [jax.device_put(x, s) for x, s in zip(args, shardings)]
    hlo = step.lower(*args).compile().as_text()
    return step(*args), hlo


def unsharded(*args):
    """The op on one CPU device: the sharded runs use the CPU devices, so the reference must
    too (on a GPU machine the default device would run the other kernel, not bit-equal)."""
    return jax.jit(decode_step)(*jax.device_put(args, jax.devices("cpu")[0]))


def assert_same(sharded, unsharded, *, same_schedule=True):
    """Bit-equal when both runs split the requests identically (head-parallel). A batch split
    recomputes each shard's schedule for its own requests, so split points, and with them the
    rounding, move: then out may differ by 2 bf16 roundings (2^-7 relative) and lse by 1e-5."""
    (out, lse), (ref_out, ref_lse) = sharded, unsharded
    out, ref_out = np.asarray(out, np.float32), np.asarray(ref_out, np.float32)
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    if same_schedule:
        np.testing.assert_array_equal(out, ref_out)
        np.testing.assert_array_equal(lse, ref_lse)
        return
    np.testing.assert_allclose(out, ref_out, rtol=2.0**-7, atol=2.0**-7 * np.abs(ref_out).max())
    np.testing.assert_allclose(lse, ref_lse, rtol=0, atol=1e-5)
    assert (np.isinf(lse) == np.isinf(ref_lse)).all()


def assert_no_collectives(hlo):
    found = [c for c in COLLECTIVES if c in hlo]
    assert not found, f"the sharded decode communicates: {found}"


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_head_parallel(rng, fp8):
    """q/out/lse split on heads, cache and tables replicated: 16 heads, 2 per device."""
    seqlens = random_seqlens(rng, 3, 300, varlen=True, with_zeros=True)
    args = [jnp.asarray(x) for x in make_paged_inputs(
        rng, seqlens, s_q=2, h_q=16, h_kv=1, d=576, page=16, dtype=jnp.bfloat16,
        extra_columns=2, invalid_pages=1, q_scale=1.0, fp8=fp8)]
    mesh = cpu_mesh((DEVICES,), ("tp",))
    sharded, hlo = run_sharded(mesh, (P(None, None, "tp", None), P(), P(), P()), args)
    assert sharded[0].sharding.spec[2] == "tp"
    assert_no_collectives(hlo)
    assert_same(sharded, unsharded(*args))


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_batch_parallel_with_shard_local_pools(rng, fp8):
    """q, tables, lengths, out, lse split on the batch; each device owns a page pool and its
    tables hold local page ids. Checked against one global pool with global ids."""
    per_shard = [make_paged_inputs(
        rng, random_seqlens(rng, 2, 200, varlen=True, with_zeros=True), s_q=1, h_q=16, h_kv=1,
        d=576, page=32, dtype=jnp.bfloat16, extra_columns=1, invalid_pages=0, q_scale=1.0,
        fp8=fp8) for _ in range(DEVICES)]
    # Side by side along the batch (and the pool's block axis): one shard's slice each.
    q, k_cache, local_tables, seqlens = (
        jnp.asarray(x.reshape((-1,) + x.shape[2:])) for x in stack_instances(per_shard))
    blocks = k_cache.shape[0] // DEVICES

    mesh = cpu_mesh((DEVICES,), ("dp",))
    sharded, hlo = run_sharded(mesh, (P("dp"), P("dp"), P("dp"), P("dp")),
                               [q, k_cache, local_tables, seqlens])
    assert sharded[0].sharding.spec[0] == "dp"
    assert_no_collectives(hlo)

    shard_of_row = np.repeat(np.arange(DEVICES), 2)[:, None]
    global_tables = np.where((np.asarray(local_tables) >= 0) & (np.asarray(local_tables) < blocks),
                             np.asarray(local_tables) + shard_of_row * blocks, -1)
    assert_same(sharded, unsharded(q, k_cache, jnp.asarray(global_tables, jnp.int32), seqlens),
                same_schedule=False)


def test_batch_and_head_parallel_together(rng):
    """A 2 x 4 mesh: batch over 'dp' (replicated pool, global ids), heads over 'tp'."""
    seqlens = random_seqlens(rng, 4, 150, varlen=True, with_zeros=False)
    args = [jnp.asarray(x) for x in make_paged_inputs(
        rng, seqlens, s_q=1, h_q=16, h_kv=1, d=576, page=64, dtype=jnp.bfloat16,
        extra_columns=1, invalid_pages=0, q_scale=1.0)]
    mesh = cpu_mesh((2, 4), ("dp", "tp"))
    sharded, hlo = run_sharded(mesh, (P("dp", None, "tp", None), P(), P("dp"), P("dp")), args)
    assert_no_collectives(hlo)
    assert_same(sharded, unsharded(*args), same_schedule=False)


def test_partitioning_keeps_the_split_kv_kernel(rng):
    """The decode's static params, the split-KV kernel among them, reach every shard's custom
    call: a kernel forced on the primitive is the kernel each device is asked to run."""
    seqlens = random_seqlens(rng, 2, 100, varlen=False, with_zeros=False)
    args = [jnp.asarray(x) for x in make_paged_inputs(
        rng, seqlens, s_q=1, h_q=16, h_kv=1, d=576, page=64, dtype=jnp.bfloat16,
        extra_columns=1, invalid_pages=0, q_scale=1.0)]
    lockstep = SPLIT_KV_KERNELS["lockstep"]
    step = lambda q, k, t, s: api._decode(q, k, t, s, 512, None, None, False, kernel=lockstep)
    mesh = cpu_mesh((DEVICES,), ("tp",))
    shardings = tuple(NamedSharding(mesh, spec) for spec in (P(None, None, "tp"), P(), P(), P()))
    hlo = jax.jit(step, in_shardings=shardings).lower(*args).compile().as_text()
    decode = [line for line in hlo.splitlines() if "jax_flash_mla_decode" in line
              and "custom-call(" in line]
    assert decode and all("bf16[2,1,2,576]" in line for line in decode), "q not split on heads"
    assert all(f"kernel = {lockstep} : i32" in line for line in decode), decode


def test_tensor_parallel_deepseek_step_keeps_the_cache_in_place(rng):
    """The DeepSeek-style decode step with its 128 heads split over 8 devices (head-sharded
    weights, replicated latent cache): same logits as one device, the only collective is the
    reduction of the output projection over heads, never a gather of the cache, and the
    schedule is sized for a device's 16 heads (one row block: 16 pieces on 16 virtual SMs),
    not for all 128 (two row blocks: 8 pieces)."""
    from jax_flash_mla import cache as paged
    from jax_flash_mla.models import deepseek, parallel

    config = deepseek.Config(vocab_size=128, hidden=128, num_layers=2, num_heads=128,
                             q_lora_rank=64, mlp_hidden=256)
    params = deepseek.init_params(config, jax.random.key(1))
    prompts = [list(rng.integers(0, config.vocab_size, size=n)) for n in (9, 3, 20, 14)]
    cache = paged.init_cache(config.num_layers, 32, 8, 4, 8, config.latent_dim, jnp.bfloat16)
    cache, logits = deepseek.prefill(params, cache, prompts, config)
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    active = jnp.ones((4,), bool)
    _, want, _ = jax.jit(lambda c, t: deepseek.decode_step(params, c, t, active, config))(
        cache, tokens)

    mesh = cpu_mesh((DEVICES,), ("tp",))
    step = parallel.tensor_parallel_step(config, DEVICES)
    args = (parallel.head_sharded_params(params, mesh, "tp"), parallel.replicated(cache, mesh),
            parallel.replicated(tokens, mesh), parallel.replicated(active, mesh))
    hlo = step.lower(*args).compile().as_text()
    pool_shape = "bf16[2,32,8,1,576]"
    gathers = [line for line in hlo.splitlines() if "all-gather" in line and pool_shape in line]
    assert not gathers, gathers
    decode = [line for line in hlo.splitlines() if "jax_flash_mla_decode" in line
              and "custom-call(" in line]
    assert decode and all("bf16[4,1,16,576]" in line for line in decode), "q not split on heads"
    assert all(f"s32[16,{METADATA_INTS}]" in line for line in decode), (
        "schedule not sized for 16 heads")
    _, got, ok = step(*args)
    assert bool(jnp.all(ok))
    # Sharded einsums sum in another order: float32 differences that flip some bf16 roundings
    # of the kernel's q and cache reads, so logits agree to one bf16 rounding of their scale.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0,
                               atol=2.0**-8 * float(jnp.max(jnp.abs(want))))


def test_data_parallel_deepseek_step_one_engine_per_device(rng):
    """The decode step under shard_map over the batch: each device holds its requests' cache
    (its own page pool, local page ids) and decodes them alone. Logits match one device
    decoding the whole batch from one pool."""
    from jax_flash_mla import cache as paged
    from jax_flash_mla.models import deepseek, parallel

    config = deepseek.Config(vocab_size=128, hidden=128, num_layers=2, num_heads=16,
                             q_lora_rank=64, mlp_hidden=256)
    params = deepseek.init_params(config, jax.random.key(2))
    per_device = 2
    prompts = [list(rng.integers(0, config.vocab_size, size=int(n)))
               for n in rng.integers(1, 30, size=DEVICES * per_device)]
    make_cache = lambda requests, blocks: paged.init_cache(
        config.num_layers, blocks, 8, requests, 6, config.latent_dim, jnp.bfloat16)

    # One device, one pool: the reference.
    whole, logits = deepseek.prefill(params, make_cache(len(prompts), 12 * DEVICES), prompts,
                                     config)
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    _, want, _ = jax.jit(lambda c, t: deepseek.decode_step(
        params, c, t, jnp.ones((len(prompts),), bool), config))(whole, tokens)

    # Eight engines: each prefilled alone, their caches laid side by side (local page ids).
    shards = [deepseek.prefill(params, make_cache(per_device, 12),
                               prompts[d * per_device:(d + 1) * per_device], config)[0]
              for d in range(DEVICES)]
    stacked = parallel.stack_engine_caches(shards)
    mesh = cpu_mesh((DEVICES,), ("dp",))
    step = parallel.data_parallel_step(config, mesh, "dp")
    active = jnp.ones(tokens.shape, bool)
    hlo = step.lower(params, stacked, tokens, active).compile().as_text()
    assert_no_collectives(hlo)
    _, got, ok = step(params, stacked, tokens, active)
    assert bool(jnp.all(ok))
    # Each engine schedules its own requests: other split points, other bf16 roundings.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0,
                               atol=2.0**-8 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("layout", ["tp", "dp"])
def test_demo_spreads_over_every_device_and_matches_one(layout, capsys):
    """`jax-flash-mla demo --parallel tp|dp --check` on the 8 host devices: the decode loop runs
    and its first step's logits match one device decoding the same batch."""
    import argparse

    from jax_flash_mla import demo

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--parallel", layout, "--check", "--batch", "8", "--tokens", "2",
                              "--layers", "1", "--hidden", "64", "--max-prompt", "6"])
    assert demo.run(args) == 0
    out = capsys.readouterr().out
    assert f"over {len(jax.devices())} devices" in out and ": OK" in out, out
