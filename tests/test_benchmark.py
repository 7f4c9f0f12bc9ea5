"""The benchmark's machinery on tiny rows (CPU): it runs, times ours and (with fake timings)
FlashMLA by one method on the same inputs, counts bytes and FLOPs by the documented formulas,
and fails clearly without FlashMLA; and the paged-input generator every user shares. Timings
are reported, never asserted."""

import argparse
import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_flash_mla import __main__ as cli
from jax_flash_mla import benchmark, device_timing, flashmla_baseline, paged_inputs, reference


def test_traffic_formulas():
    lengths = np.array([4096, 4096])
    nbytes, flops = benchmark.traffic(lengths, b=2, h_q=16, s_q=1)
    assert nbytes == 2 * (4096 * 576 * 2 + 16 * (576 + 512) * 2)
    assert flops == 2 * 2 * 16 * 4096 * (576 + 512)


def test_page_sweep_compares_page_16_with_64_on_every_kernel():
    """The issue's bar (page 16 within 10% of page 64 at s_k >= 4096) is checked on each
    kernel family: h_q = 16 (narrow), 64 (64-row), 128 (paired seesaw), all at b=64."""
    rows = benchmark.page_sweep_rows()
    assert len(rows) == len(set(rows))
    for h_q in (16, 64, 128):
        for page in (16, 64):
            assert ((64, h_q, 4096, 1, False, False), page) in rows
    assert {page for (row, page) in rows if row[1] == 16} == set(benchmark.PAGE_SWEEP)


def test_one_row_runs_with_the_reference(rng):
    args = argparse.Namespace(calls=2, repeats=1, blocks=2)
    row = benchmark.measure(rng, (2, 16, 64, 1, False, False), 16, args, l2_bytes=1 << 20,
                            with_reference=True)
    assert row["us"] > 0 and row["ref_us"] > 0 and row["gbps"] > 0 and row["tflops"] > 0
    # No profiler span off the GPU, no FlashMLA without --flashmla.
    assert row["us_span"] is None and row["flashmla_us"] is None and row["ratio"] is None


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (the 8 host devices of CI)")
def test_one_row_split_on_heads_over_devices(rng):
    """The tensor-parallel row (bench --tp): q split on heads over 8 host devices, the
    schedule sized for one shard; it runs and reports the device count."""
    args = argparse.Namespace(calls=2, repeats=1, blocks=2)
    row = benchmark.measure(rng, (2, 16, 64, 1, False, False), 16, args, l2_bytes=1 << 20,
                            with_reference=False, head_shards=8)
    assert row["devices"] == 8 and row["us"] > 0


def _trace(stream_events, other_line_events=()):
    """A profiler trace of the first GPU: kernels (name, start_ns, duration_ns) on one stream
    line, annotations on an "XLA Ops" line, and a host plane."""
    names = sorted({e[0] for e in list(stream_events) + list(other_line_events)})
    ids = {n: i + 1 for i, n in enumerate(names)}
    def line(line_id, name, events):
        body = "".join(f"events {{ metadata_id: {ids[n]} offset_ps: {int(t * 1000)} "
                       f"duration_ps: {int(d * 1000)} }}\n" for n, t, d in events)
        return f'lines {{ id: {line_id} name: "{name}" timestamp_ns: 0\n{body}}}\n'
    metadata = "".join(f'event_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}\n'
                       for n, i in ids.items())
    text = (f'planes {{ id: 1 name: "/device:GPU:0"\n'
            f'{line(1, "Stream #14(compute)", stream_events)}'
            f'{line(2, "XLA Ops", other_line_events)}{metadata}}}\n'
            'planes { id: 2 name: "/host:CPU" }\n')
    return jax.profiler.ProfileData.from_text_proto(text)


def test_device_time_reads_kernels_of_the_first_gpu_only():
    data = _trace([("combine", 9000, 1000), ("split_kv", 1000, 5000)],
                  other_line_events=[("split_kv", 1000, 5000)])
    assert device_timing.kernel_events(data) == [("split_kv", 1000, 6000), ("combine", 9000, 10000)]


def test_device_time_is_each_runs_span_over_its_calls():
    # Two runs of 2 calls (split + combine each), the second run 1 us slower, host gaps between.
    run = [("split", 0, 4000), ("combine", 4500, 1000), ("split", 6000, 4000),
           ("combine", 10500, 1000)]
    events = [(n, t, t + d) for n, t, d in run] + [(n, t + 50000, t + d + 51000) for n, t, d in run]
    spans = device_timing.spans_per_call(events, runs=2, calls=2)
    assert spans == pytest.approx([5.75e-6, 6.25e-6])
    with pytest.raises(RuntimeError, match="7 GPU kernels for 2 runs"):
        device_timing.spans_per_call(events[:7], runs=2, calls=2)


# --- the timing method shared by ours and FlashMLA --------------------------------------------

def test_wall_time_issues_every_block_before_one_wait(monkeypatch):
    """The blocks of a timing go out back-to-back and are waited on once; the figure is the
    median timing over blocks * calls."""
    clock, events = [0.0], []
    block_seconds = iter([0.5, 0.5] + [1] * 4 + [2] * 4 + [9] * 4)  # 2 warm-ups, 3 timings
    monkeypatch.setattr(device_timing, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def issue():
        clock[0] += next(block_seconds)
        events.append("issue")
        return len(events)

    per_call = device_timing.wall_time_per_call(
        issue, lambda results: events.append(("wait", len(results))), calls=5, blocks=4,
        repeats=3)
    assert per_call == pytest.approx(2 * 4 / (4 * 5))  # the median timing, 8 s, over 20 calls
    assert events == ["issue", ("wait", 1)] * 2 + (["issue"] * 4 + [("wait", 4)]) * 3


# --- --flashmla: optional, and a clear failure without it -------------------------------------

@pytest.mark.parametrize("missing", ["torch", "flash_mla", "a device"])
def test_flashmla_option_fails_clearly_without_flashmla(missing, monkeypatch, tmp_path, capsys):
    """One line on stderr naming what is missing and how to get it, exit status 2, nothing
    measured; None in sys.modules makes an import raise ImportError."""
    monkeypatch.setitem(sys.modules, "torch",
                        None if missing == "torch" else types.ModuleType("torch"))
    monkeypatch.setitem(sys.modules, "flash_mla",
                        types.ModuleType("flash_mla") if missing == "a device" else None)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "restored after the test")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE")
    out = tmp_path / "results"
    assert cli.main(["bench", "--flashmla", "--quick", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    if missing == "a device":  # both import, but JAX sees no GPU (this machine)
        assert "--flashmla needs a GPU visible to JAX" in lines[0]
    else:
        expected = "needs torch" if missing == "torch" else "flash_mla package"
        assert expected in lines[0]
        assert "shared/flashmla/README.md" in lines[0] and "PYTHONPATH" in lines[0]
    assert not out.exists() and not captured.out  # nothing measured
    # Set before JAX's GPU client starts, so that torch finds memory left.
    assert benchmark.os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"


def test_bench_without_a_gpu_says_so_in_one_line(monkeypatch, tmp_path, capsys):
    """Not minutes of silence measuring a CPU's ceilings and rows, then nothing written."""
    def measured(*args):
        raise AssertionError("bench measured on a CPU")

    monkeypatch.setattr(benchmark, "measure_ceilings", measured)
    monkeypatch.setattr(benchmark, "measure", measured)
    out = tmp_path / "results"
    assert cli.main(["bench", "--quick", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "needs a GPU visible to JAX" in captured.err
    assert not captured.out and not out.exists()


# --- FlashMLA beside ours, with fake timings --------------------------------------------------

TINY_ROWS = [(2, 16, 64, 1, False, False), (1, 16, 100, 2, False, True)]
OURS_S, SPAN_S, FLASHMLA_S = 10e-6, 8e-6, 25e-6


class FakeFlashMLA:
    """Stands in for flashmla_baseline.FlashMLA: FLASHMLA_S a call, and as the first call's
    outputs the reference's on the case it is handed (plus out_error); keeps what it got."""

    runs = staticmethod(flashmla_baseline.FlashMLA.runs)

    def __init__(self, out_error=0.0):
        self.out_error, self.got = out_error, []

    def measure(self, case, scales, causal, blocks, repeats):
        self.got.append((case, scales, causal))
        out, lse = reference.flash_mla_with_kvcache(
            case.q, case.pool, jnp.asarray(case.tables[0]), jnp.asarray(case.lengths), 512,
            softmax_scale=scales[0], causal=causal)
        return flashmla_baseline.FlashMLARow(
            FLASHMLA_S, np.asarray(out, np.float32) + self.out_error, np.asarray(lse))


@pytest.fixture
def tiny_bench(monkeypatch, tmp_path):
    """`bench --quick` on TINY_ROWS as on a GPU, with ours timed at OURS_S a call (SPAN_S by
    the profiler); returns run(extra args) -> (exit code, bench.json, stdout lines) and the
    inputs ours was timed on."""
    monkeypatch.setattr(benchmark, "on_gpu", lambda: True)
    monkeypatch.setattr(benchmark, "device_time_per_call", lambda *args: SPAN_S)
    monkeypatch.setattr(benchmark, "TARGET_ROWS", TINY_ROWS)
    monkeypatch.setattr(benchmark, "L2_BYTES", 1 << 20)
    monkeypatch.setattr(benchmark, "measure_ceilings", lambda blocks: (1000.0, 100.0))
    timed = []

    def time_per_call(fn, args, calls, repeats, blocks):
        timed.append(args)
        return OURS_S

    monkeypatch.setattr(benchmark, "time_per_call", time_per_call)

    def run(*extra, capsys):
        code = cli.main(["bench", "--quick", "--calls", "3", "--out", str(tmp_path), *extra])
        with open(tmp_path / "bench.json") as f:
            data = json.load(f)
        return code, data, capsys.readouterr().out.splitlines()

    return run, timed


def table_cells(lines, row):
    """The three |-separated groups of cells of `row`'s line in the printed table."""
    b, h_q, s_k, s_q = row[:4]
    line, = [l for l in lines if l.split()[:4] == [str(b), str(h_q), str(s_k), str(s_q)]]
    return [group.split() for group in line.split("|")[1:]]


def test_table_and_json_carry_flashmla_and_the_ratio(tiny_bench, monkeypatch, capsys, tmp_path):
    run, timed = tiny_bench
    fake = FakeFlashMLA()
    monkeypatch.setattr(benchmark, "load_flashmla", lambda: fake)
    code, data, lines = run("--flashmla", capsys=capsys)
    assert code == 0 and data["flashmla"] is True
    assert len(data["rows"]) == len(TINY_ROWS)
    for r, row in zip(data["rows"], TINY_ROWS):
        assert r["us"] == pytest.approx(OURS_S * 1e6)
        assert r["flashmla_us"] == pytest.approx(FLASHMLA_S * 1e6)
        assert r["ratio"] == pytest.approx(FLASHMLA_S / OURS_S)
        assert r["flashmla_agrees"] is True and r["us_span"] == pytest.approx(SPAN_S * 1e6)
        ours, flashmla, _ = table_cells(lines, row)
        assert ours[:2] == [f"{OURS_S * 1e6:.1f}", f"{SPAN_S * 1e6:.1f}"]
        assert flashmla == [f"{FLASHMLA_S * 1e6:.1f}", f"{FLASHMLA_S / OURS_S:.2f}"]
    assert (tmp_path / "roofline.png").exists()


def test_flashmla_is_timed_on_the_very_inputs_of_ours(tiny_bench, monkeypatch, capsys):
    run, timed = tiny_bench
    fake = FakeFlashMLA()
    monkeypatch.setattr(benchmark, "load_flashmla", lambda: fake)
    run("--flashmla", capsys=capsys)
    assert len(fake.got) == len(timed) == len(TINY_ROWS)
    for (case, scales, causal), ours, row in zip(fake.got, timed, TINY_ROWS):
        q, pool, tables, lengths, _ = ours
        assert causal == row[5] and scales == benchmark.call_scales(3)
        same = lambda a, b: flashmla_baseline.host_bytes(a).tobytes() == np.asarray(b).tobytes()
        assert same(case.q, q) and same(case.pool, pool) and same(case.lengths, lengths)
        assert len(case.tables) == len(tables) > 1 and all(map(same, case.tables, tables))


def test_flashmla_disagreeing_with_ours_fails_the_run(tiny_bench, monkeypatch, capsys):
    """Outputs that differ (other inputs, or a wrong kernel) make the timings incomparable."""
    run, _ = tiny_bench
    monkeypatch.setattr(benchmark, "load_flashmla", lambda: FakeFlashMLA(out_error=0.1))
    code, data, lines = run("--flashmla", capsys=capsys)
    assert code == 1
    assert all(r["flashmla_agrees"] is False for r in data["rows"])
    assert sum("FlashMLA DISAGREES" in line for line in lines) == len(TINY_ROWS)


def test_without_flashmla_its_columns_print_a_dash(tiny_bench, capsys):
    run, _ = tiny_bench
    code, data, lines = run(capsys=capsys)
    assert code == 0 and data["flashmla"] is False
    for r, row in zip(data["rows"], TINY_ROWS):
        assert r["flashmla_us"] is None and r["ratio"] is None
        assert table_cells(lines, row)[1] == ["-", "-"]


def test_roofline_plots_flashmla_in_its_own_time(tmp_path):
    rows = [dict(us=10.0, gbps=100.0, tflops=2.0, flashmla_us=20.0),
            dict(us=10.0, gbps=50.0, tflops=4.0, flashmla_us=None)]
    fig = benchmark.plot(rows, 1000.0, 100.0, tmp_path / "roofline.png")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines["jax-flash-mla"].get_ydata()) == [2.0, 4.0]
    assert list(lines["FlashMLA (same run)"].get_ydata()) == [1.0]  # same FLOPs, twice the time
    assert list(lines["FlashMLA (same run)"].get_xdata()) == [20.0]  # same intensity


# --- torch gets the same bytes -----------------------------------------------------------------

def random_bf16_bits(rng, shape):
    """bfloat16 of every bit pattern (NaN payloads, infinities, -0, subnormals among them):
    anything that converts values instead of copying bytes changes some."""
    bits = rng.integers(-(1 << 15), 1 << 15, size=shape, dtype=np.int16)
    return jnp.asarray(bits.view(jnp.bfloat16)), bits


def test_host_bytes_are_the_arrays_bytes(rng):
    x, bits = random_bf16_bits(rng, (3, 5, 7))
    host = flashmla_baseline.host_bytes(x)
    assert host.dtype == np.int16 and host.flags.c_contiguous
    np.testing.assert_array_equal(host, bits)
    table = jnp.asarray(rng.integers(-5, 1 << 20, size=(4, 6), dtype=np.int32))
    assert flashmla_baseline.host_bytes(table).dtype == np.int32
    np.testing.assert_array_equal(flashmla_baseline.host_bytes(table), np.asarray(table))


def test_to_torch_is_bit_for_bit(rng):
    torch = pytest.importorskip("torch", reason="torch is not installed (only FlashMLA needs it)")
    x, bits = random_bf16_bits(rng, (3, 5, 7))
    t = flashmla_baseline.to_torch(torch, x, "cpu")
    assert t.dtype == torch.bfloat16 and tuple(t.shape) == x.shape
    np.testing.assert_array_equal(t.view(torch.int16).numpy(), bits)
    table = rng.integers(-5, 1 << 20, size=(4, 6), dtype=np.int32)
    t = flashmla_baseline.to_torch(torch, jnp.asarray(table), "cpu")
    assert t.dtype == torch.int32
    np.testing.assert_array_equal(t.numpy(), table)


# --- the paged-input generator (tests, check, bench, benchmarks/) ------------------------------

def test_hostile_inputs_poison_every_slot_no_request_may_read(rng):
    seqlens, page, invalid = np.array([0, 1, 100, 33, 64], np.int32), 16, 3
    inputs = paged_inputs.make_paged_inputs(rng, seqlens, s_q=1, h_q=2, h_kv=1, d=8, page=page,
                                            dtype=np.float32, invalid_pages=invalid)
    table, cache = inputs.block_table, inputs.k_cache
    num_blocks = cache.shape[0]
    needed = -(-seqlens // page)
    assert table.dtype == np.int32 and table.shape == (len(seqlens), needed.max() + 2)
    assert num_blocks > needed.sum()  # pages no request uses
    in_length = table[np.arange(table.shape[1]) < needed[:, None]]
    valid = (in_length >= 0) & (in_length < num_blocks)
    assert (~valid).sum() == invalid  # masked pages inside the lengths
    assert len(set(in_length[valid].tolist())) == valid.sum()  # no page read twice
    live = np.zeros((num_blocks, page), bool)  # recounted here, token by token
    for i, length in enumerate(seqlens):
        for token in range(length):
            p = table[i, token // page]
            if 0 <= p < num_blocks:
                live[p, token % page] = True
    assert np.isfinite(cache[live]).all() and np.isnan(cache[~live]).all()
    np.testing.assert_array_equal(inputs.cache_seqlens, seqlens)


def test_garbage_page_ids_mix_every_kind_of_bad_id(rng):
    ids = paged_inputs.garbage_page_ids(rng, 2000, num_blocks=50)
    assert ids.dtype == np.int32
    assert (ids < -4).any() and ((ids >= -4) & (ids < 0)).any()
    assert ((ids >= 50) & (ids < 54)).any() and (ids == np.iinfo(np.int32).max).any()
    assert (ids == np.iinfo(np.int32).min).any() and ((ids >= 0) & (ids < 50)).any()


def test_overflow_lengths_clamp_back_to_the_true_ones(rng):
    inputs = paged_inputs.make_paged_inputs(rng, [64, 0, 30], s_q=1, h_q=1, h_kv=1, d=8,
                                            page=16, dtype=np.float32, overflow=True)
    capacity = inputs.block_table.shape[1] * 16
    assert capacity == 64  # no extra columns: the longest request fills the table
    lengths = inputs.cache_seqlens
    assert lengths[0] > capacity and lengths[1] < 0 and lengths[2] == 30
    np.testing.assert_array_equal(np.clip(lengths, 0, capacity), [64, 0, 30])


@pytest.mark.parametrize("varlen", [False, True])
def test_benchmark_case_rotates_permuted_copies_beyond_l2(rng, varlen):
    b, h_q, s_k, s_q, page, l2_bytes = 3, 4, 200, 2, 16, 1 << 20
    case = paged_inputs.rotated_case(rng, b, h_q, s_k, s_q, varlen, page, l2_bytes)
    needed = -(-case.lengths // page)
    per_copy, copies = int(needed.sum()), len(case.tables)
    copy_bytes = per_copy * page * 576 * 2
    assert copies * copy_bytes >= 4 * l2_bytes > (copies - 1) * copy_bytes
    assert case.pool.shape == (copies * per_copy, page, 1, 576) and case.pool.dtype == jnp.bfloat16
    assert case.q.shape == (b, s_q, h_q, 576) and case.q.dtype == jnp.bfloat16
    assert varlen or (case.lengths == s_k).all()
    for c, table in enumerate(case.tables):
        own = range(c * per_copy, (c + 1) * per_copy)
        in_length = table[np.arange(table.shape[1]) < needed[:, None]]
        assert sorted(in_length.tolist()) == list(own)  # every page of its copy, once
        assert np.isin(table, own).all()  # columns past a request's pages stay valid ids
    assert not np.array_equal(case.tables[1] - per_copy, case.tables[0])  # permuted anew
    assert len(paged_inputs.rotated_case(rng, b, h_q, s_k, 1, varlen, page, 0).tables) == 1
