"""The benchmark's machinery on tiny rows (CPU): it runs, times ours and (with fake timings)
FlashMLA by one method on the same inputs, counts bytes and FLOPs by the documented formulas,
and fails clearly without FlashMLA; the same for the sparse decode rows (bench --sparse) and the
sparse prefill rows (bench --sparse-prefill), and FlashMLA's CUDA-graph timing driven through a
fake torch; and the paged-input generator every
user shares. Timings are reported, never asserted."""

import argparse
import contextlib
import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_flash_mla import __main__ as cli
from jax_flash_mla import (benchmark, device_timing, dequantize_fp8_kvcache, flashmla_baseline,
                           fp8_cache, fp8_decode_benchmark,
                           paged_inputs, reference, sparse_benchmark, sparse_prefill_benchmark)
from jax_flash_mla.sparse_benchmark import SparseRow
from jax_flash_mla.sparse_prefill_benchmark import PrefillRow


def test_traffic_formulas():
    lengths = np.array([4096, 4096])
    nbytes, flops = benchmark.traffic(lengths, b=2, h_q=16, s_q=1)
    assert nbytes == 2 * (4096 * 576 * 2 + 16 * (576 + 512) * 2)
    assert flops == 2 * 2 * 16 * 4096 * (576 + 512)


def test_page_sweep_compares_pages_16_and_32_with_64_on_every_kernel():
    """Pages 16 and 32 against page 64 (and FlashMLA's page 64 in the same run) on each kernel
    family: h_q = 16 (narrow), 64 (64-row), 128 (paired seesaw), all at b=64."""
    rows = benchmark.page_sweep_rows()
    assert len(rows) == len(set(rows))
    for h_q in (16, 64, 128):
        for page in (16, 32, 64):
            assert ((64, h_q, 4096, 1, False, False), page) in rows
    assert {page for (row, page) in rows if row[1] == 16} == set(benchmark.PAGE_SWEEP)


def test_full_grid_has_the_small_batch_rows():
    """Without --quick: b 2-16 at h_q 64 and 128, s_k 2048 and 16384, page 64 (where FlashMLA
    runs beside them); --quick leaves them out, --batch keeps its own."""
    def args(**kw):
        return argparse.Namespace(**dict(dict(batch=None, quick=False, tp=False), **kw))
    small = benchmark.jobs_for(args(), 1)["small batches (page 64)"]
    rows = {row for row, page, _, shards in small if page == 64 and shards == 1}
    assert rows == {(b, h_q, s_k, 1, False, False) for b in (2, 4, 8, 16) for h_q in (64, 128)
                    for s_k in (2048, 16384)}
    assert len(small) == len(rows)
    assert "small batches (page 64)" not in benchmark.jobs_for(args(quick=True), 1)
    assert {row[0] for row, *_ in benchmark.jobs_for(args(batch=8), 1)[
        "small batches (page 64)"]} == {8}
    assert "small batches (page 64)" not in benchmark.jobs_for(args(batch=64), 1)


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


@pytest.mark.parametrize("section", [["--quick"], ["--sparse"], ["--sparse", "--quick"],
                                     ["--sparse-prefill", "--quick"], ["--fp8-cache"]])
def test_bench_without_a_gpu_says_so_in_one_line(section, monkeypatch, tmp_path, capsys):
    """Not minutes of silence measuring a CPU's ceilings and rows, then nothing written."""
    def measured(*args):
        raise AssertionError("bench measured on a CPU")

    monkeypatch.setattr(benchmark, "measure_ceilings", measured)
    monkeypatch.setattr(benchmark, "measure", measured)
    monkeypatch.setattr(sparse_benchmark, "measure", measured)
    monkeypatch.setattr(sparse_prefill_benchmark, "measure", measured)
    monkeypatch.setattr(fp8_decode_benchmark, "measure", measured)
    out = tmp_path / "results"
    assert cli.main(["bench", *section, "--out", str(out)]) == 2
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

    runs_sparse = staticmethod(flashmla_baseline.FlashMLA.runs_sparse)

    def measure_sparse(self, case, scales, blocks, repeats):
        """As FlashMLA's: q padded with zero heads to the 64 or 128 it takes, the padding sliced
        off the outputs (their heads must not change the others')."""
        self.got.append((case, scales))
        h_q = case.q.shape[2]
        q = flashmla_baseline.pad_heads(case.q, flashmla_baseline.sparse_heads(h_q))
        fp8 = case.pool.dtype == jnp.uint8
        out, lse = reference.flash_mla_with_kvcache(
            q, case.pool, None, None, 512, None, scales[0], False, is_fp8_kvcache=fp8,
            indices=jnp.asarray(case.index_sets[0]))
        return flashmla_baseline.FlashMLARow(
            FLASHMLA_S, np.asarray(out, np.float32)[:, :, :h_q] + self.out_error,
            np.asarray(lse)[:, :h_q])

    runs_sparse_prefill = staticmethod(flashmla_baseline.FlashMLA.runs_sparse_prefill)

    def measure_sparse_prefill(self, case, scales, blocks, repeats):
        self.got.append((case, scales))
        out, max_logits, lse = reference.flash_mla_sparse_fwd(
            case.q, case.kv_copies[0], jnp.asarray(case.indices), scales[0])
        return flashmla_baseline.FlashMLARow(
            FLASHMLA_S, np.asarray(out, np.float32) + self.out_error, np.asarray(lse),
            np.asarray(max_logits))


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


# --- dense decode over the FP8 cache, with fake timings ------------------------------------------

def test_fp8_rows_beside_bf16_and_flashmla_on_the_same_tokens(tiny_bench, monkeypatch, capsys):
    """`bench --fp8-cache`: our bf16 and FP8 calls and FlashMLA's on one pool (FP8: its
    quantization), the FP8 call checked for real against our bf16 kernel over the dequantized
    pool; bytes counted at 656 a token."""
    run, timed = tiny_bench
    monkeypatch.setattr(fp8_decode_benchmark, "QUICK_ROWS", TINY_ROWS)
    fake = FakeFlashMLA()
    monkeypatch.setattr(benchmark, "load_flashmla", lambda: fake)
    code, data, lines = run("--fp8-cache", "--flashmla", capsys=capsys)
    assert code == 0 and len(data["rows"]) == len(TINY_ROWS)
    assert len(timed) == 2 * len(TINY_ROWS) and len(fake.got) == len(TINY_ROWS)
    for i, (r, row) in enumerate(zip(data["rows"], TINY_ROWS)):
        assert r["fp8_agrees"] is True and r["fp8_out_diff"] < 1e-2
        assert r["bf16_us"] == r["us"] == pytest.approx(OURS_S * 1e6) and r["speedup"] == 1
        assert r["ratio"] == pytest.approx(FLASHMLA_S / OURS_S)
        bf16_inputs, fp8_inputs = timed[2 * i], timed[2 * i + 1]
        assert bf16_inputs[1].dtype == jnp.bfloat16 and fp8_inputs[1].dtype == jnp.uint8
        np.testing.assert_array_equal(np.asarray(fp8_inputs[1]),
                                      np.asarray(fp8_cache.quantize_fp8_kvcache(bf16_inputs[1])))
        case = fake.got[i][0]
        assert flashmla_baseline.host_bytes(case.pool).tobytes() == \
            np.asarray(bf16_inputs[1]).tobytes()
        nbytes, _ = fp8_decode_benchmark.fp8_traffic(
            np.asarray(bf16_inputs[3]), row[0], row[1], row[3])
        assert nbytes == np.sum(np.asarray(bf16_inputs[3])) * 656 + \
            row[0] * row[3] * row[1] * (576 + 512) * 2
        assert r["gbps"] == pytest.approx(nbytes / OURS_S / 1e9)
        _, fp8_cells, flashmla_cells = table_cells(lines, row)
        assert flashmla_cells == [f"{FLASHMLA_S * 1e6:.1f}", f"{FLASHMLA_S / OURS_S:.2f}"]


def test_fp8_disagreeing_with_bf16_fails_the_run(tiny_bench, monkeypatch, capsys):
    """An FP8 result other than the bf16 kernel's over the same (dequantized) tokens makes its
    timing one of a wrong result."""
    run, _ = tiny_bench
    monkeypatch.setattr(fp8_decode_benchmark, "QUICK_ROWS", TINY_ROWS)
    dequantize = fp8_cache.dequantize_fp8_kvcache
    monkeypatch.setattr(fp8_decode_benchmark.fp8_cache, "dequantize_fp8_kvcache",
                        lambda packed: 2 * dequantize(packed))
    code, data, lines = run("--fp8-cache", capsys=capsys)
    assert code == 1 and all(r["fp8_agrees"] is False for r in data["rows"])
    assert sum("FP8 DISAGREES" in line for line in lines) == len(TINY_ROWS)


def test_roofline_plots_flashmla_in_its_own_time(tmp_path):
    rows = [dict(us=10.0, gbps=100.0, tflops=2.0, flashmla_us=20.0),
            dict(us=10.0, gbps=50.0, tflops=4.0, flashmla_us=None)]
    fig = benchmark.plot(rows, 1000.0, 100.0, tmp_path / "roofline.png")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines["jax-flash-mla"].get_ydata()) == [2.0, 4.0]
    assert list(lines["FlashMLA (same run)"].get_ydata()) == [1.0]  # same FLOPs, twice the time
    assert list(lines["FlashMLA (same run)"].get_xdata()) == [20.0]  # same intensity


# --- bench --sparse: the sparse decode rows (sparse_benchmark.py) ------------------------------

def test_sparse_rows_are_the_issues_grid():
    """Issue 25's rows, each once; the bf16-cache rows repeat FP8 rows; FlashMLA runs every FP8
    row (h_q 16 and 32 padded to 64 heads) and no bf16 one."""
    rows = (sparse_benchmark.GRID_ROWS + sparse_benchmark.FEW_HEADS_ROWS +
            sparse_benchmark.BF16_ROWS)
    assert len(rows) == len(set(rows))
    fp8 = {(b, h_q, s_q, 2048) for b in (2, 16, 64, 128) for h_q in (64, 128) for s_q in (1, 2)}
    fp8 |= {(64, 128, 2, 16384), (128, 16, 1, 2048), (128, 32, 1, 2048)}
    assert {row[:4] for row in rows if row.fp8} == fp8
    bf16 = [row for row in rows if not row.fp8]
    assert len(bf16) == 2 and all(row._replace(fp8=True) in rows for row in bf16)
    assert set(sparse_benchmark.QUICK_ROWS) <= set(rows)
    assert all(row.fp8 for row in sparse_benchmark.QUICK_ROWS)
    for row in rows:
        assert flashmla_baseline.FlashMLA.runs_sparse(row.h_q, row.topk, row.fp8) == row.fp8
    assert [flashmla_baseline.sparse_heads(row.h_q) for row in sparse_benchmark.FEW_HEADS_ROWS] \
        == [64, 64]


def test_sparse_traffic_formulas():
    nbytes, flops = sparse_benchmark.traffic(SparseRow(b=128, h_q=128, s_q=2, topk=2048))
    assert nbytes == 128 * 2 * 2048 * 656 + 128 * 2 * 128 * (576 + 512) * 2
    assert flops == 2 * 128 * 2 * 128 * 2048 * (576 + 512)
    # FlashMLA's own count of the same row, in the H100 sparse anchors of shared/anchors.
    seconds = 347.4487101449082e-6
    assert flops / seconds / 1e12 == pytest.approx(420.2890492904598)
    assert nbytes / seconds / 1e9 == pytest.approx(1195.100410149228)
    nbytes, flops = sparse_benchmark.traffic(SparseRow(16, 64, 1, 2048, fp8=False))
    assert nbytes == 16 * 2048 * 576 * 2 + 16 * 64 * (576 + 512) * 2
    assert flops == 2 * 16 * 64 * 2048 * (576 + 512)


def test_sparse_pool_holds_4x_the_l2_and_topk_tokens_in_whole_pages():
    assert sparse_benchmark.pool_pages(64, 1 << 16) == 7  # 4 * 64 KiB / 656 = 399.6 tokens
    assert sparse_benchmark.pool_pages(100, 0) == 2
    pages = sparse_benchmark.pool_pages(2048, benchmark.L2_BYTES)
    assert pages * 64 * 656 >= 4 * benchmark.L2_BYTES > (pages - 1) * 64 * 656


def pool_latents(pool, fp8):
    """float32 latents of a sparse pool, FP8 (dequantized) or bf16."""
    return np.asarray((dequantize_fp8_kvcache(pool) if fp8 else pool).astype(jnp.float32))


@pytest.mark.parametrize("fp8", [True, False])
def test_sparse_case_rotates_distinct_uniform_indices_beyond_l2(rng, fp8):
    row, l2_bytes = SparseRow(b=2, h_q=16, s_q=1, topk=64, fp8=fp8), 1 << 16
    case = sparse_benchmark.sparse_case(rng, row, l2_bytes)
    pages = sparse_benchmark.pool_pages(row.topk, l2_bytes)
    assert case.pool.shape == (pages, 64, 1, 656 if fp8 else 576)
    assert case.pool.dtype == (jnp.uint8 if fp8 else jnp.bfloat16)
    assert case.q.shape == (2, 1, 16, 576) and case.q.dtype == jnp.bfloat16
    keys = pool_latents(case.pool, fp8)
    assert np.isfinite(keys).all() and 0 < np.abs(keys).max() < 10  # random normal latents
    call_bytes = 2 * 1 * 64 * (656 if fp8 else 1152)
    copies = len(case.index_sets)
    assert copies * call_bytes >= 4 * l2_bytes > (copies - 1) * call_bytes
    for indices in case.index_sets:
        assert indices.dtype == np.int32 and indices.shape == (2, 1, 64)
        assert ((indices >= 0) & (indices < pages * 64)).all()
        assert all(len(set(query)) == 64 for query in indices.reshape(-1, 64).tolist())
    every = np.concatenate([i.ravel() for i in case.index_sets])
    assert set(every // 64) == set(range(pages))  # drawn from the whole pool
    assert not np.array_equal(case.index_sets[0], case.index_sets[1])


def test_flashmla_sparse_pads_heads_with_zero_heads(rng):
    heads = [flashmla_baseline.sparse_heads(h) for h in (1, 16, 32, 64, 65, 128, 129)]
    assert heads == [64, 64, 64, 64, 128, 128, None]
    assert not flashmla_baseline.FlashMLA.runs_sparse(256, 2048, True)
    assert not flashmla_baseline.FlashMLA.runs_sparse(64, 2000, True)  # topk not a multiple of 64
    q, bits = random_finite_bf16_bits(rng, (2, 3, 16, 8))
    padded = flashmla_baseline.pad_heads(q, 64)
    assert padded.shape == (2, 3, 64, 8) and padded.dtype == jnp.bfloat16
    padded_bits = flashmla_baseline.host_bytes(padded)
    np.testing.assert_array_equal(padded_bits[:, :, :16], bits)
    assert (padded_bits[:, :, 16:] == 0).all()  # +0.0


def test_bench_parses_the_sparse_option():
    parser = argparse.ArgumentParser()
    benchmark.add_arguments(parser)
    args = parser.parse_args(["--sparse", "--quick", "--batch", "128", "--flashmla"])
    assert args.sparse and args.quick and args.batch == 128 and args.flashmla
    assert not parser.parse_args([]).sparse
    full = sparse_benchmark.rows_by_section(quick=False, batch=None)
    assert [row for rows in full.values() for row in rows] == (
        sparse_benchmark.GRID_ROWS + sparse_benchmark.FEW_HEADS_ROWS + sparse_benchmark.BF16_ROWS)
    quick = sparse_benchmark.rows_by_section(quick=True, batch=None)
    assert sorted(row for rows in quick.values() for row in rows) == sorted(
        sparse_benchmark.QUICK_ROWS)
    assert len(quick) == 2  # no bf16 section
    assert list(sparse_benchmark.rows_by_section(quick=True, batch=2).values()) == [
        [SparseRow(2, 128, 2, 2048)]]
    assert all(row.b == 128 for rows in sparse_benchmark.rows_by_section(False, 128).values()
               for row in rows)


def test_one_sparse_row_runs_with_the_reference(rng):
    args = argparse.Namespace(calls=2, repeats=1, blocks=2)
    row = sparse_benchmark.measure(rng, SparseRow(2, 16, 1, 64), args, l2_bytes=1 << 16,
                                   with_reference=True)
    assert row["us"] > 0 and row["ref_us"] > 0 and row["gbps"] > 0 and row["tflops"] > 0
    assert row["reference_agrees"] is True and row["reference_out_diff"] < 2.0 ** -6
    assert row["us_span"] is None and row["flashmla_us"] is None and row["ratio"] is None
    assert row["pool_tokens"] == 7 * 64 and row["index_sets"] == 4 and row["cache"] == "fp8"


# Tiny rows with h_q 16: FlashMLA's fake pads them to 64 heads, as the real one does. --quick
# takes the FP8 ones.
TINY_SPARSE = dict(GRID_ROWS=[SparseRow(2, 16, 1, 64)], FEW_HEADS_ROWS=[SparseRow(2, 16, 2, 64)],
                   BF16_ROWS=[SparseRow(2, 16, 1, 64, fp8=False)])
TINY_QUICK = TINY_SPARSE["GRID_ROWS"] + TINY_SPARSE["FEW_HEADS_ROWS"]


@pytest.fixture
def tiny_sparse_bench(monkeypatch, tmp_path):
    """`bench --sparse` on TINY_SPARSE as on a GPU, with ours timed at OURS_S a call (SPAN_S by
    the profiler) and the plot stubbed (it is the dense one's, on the same keys); returns
    run(extra args) -> (exit code, bench.json, stdout lines, stderr), the inputs of each timing
    and the rows plotted."""
    monkeypatch.setattr(benchmark, "on_gpu", lambda: True)
    monkeypatch.setattr(benchmark, "device_time_per_call", lambda *args: SPAN_S)
    monkeypatch.setattr(benchmark, "L2_BYTES", 1 << 16)
    monkeypatch.setattr(benchmark, "measure_ceilings", lambda blocks: (1000.0, 100.0))
    for name, rows in dict(TINY_SPARSE, QUICK_ROWS=TINY_QUICK).items():
        monkeypatch.setattr(sparse_benchmark, name, rows)
    timed, plotted = [], []

    def time_per_call(fn, args, calls, repeats, blocks):
        timed.append((args, calls))
        return OURS_S

    monkeypatch.setattr(benchmark, "time_per_call", time_per_call)
    monkeypatch.setattr(benchmark, "plot", lambda rows, *args: plotted.extend(rows))

    def run(*extra, capsys):
        code = cli.main(["bench", "--sparse", "--calls", "3", "--out", str(tmp_path), *extra])
        with open(tmp_path / "bench.json") as f:
            data = json.load(f)
        captured = capsys.readouterr()
        return code, data, captured.out.splitlines(), captured.err

    return run, timed, plotted


def sparse_table_cells(lines, row):
    """The three |-separated groups of cells of `row`'s line in the sparse table."""
    key = [str(row.b), str(row.h_q), str(row.s_q), str(row.topk), "fp8" if row.fp8 else "bf16"]
    line, = [l for l in lines if l.split()[:5] == key]
    return [group.split() for group in line.split("|")[1:]]


def test_sparse_table_and_json_carry_flashmla_padded_and_the_ratio(tiny_sparse_bench, monkeypatch,
                                                                   capsys):
    run, timed, plotted = tiny_sparse_bench
    fake = FakeFlashMLA()
    monkeypatch.setattr(benchmark, "load_flashmla", lambda: fake)
    code, data, lines, _ = run("--flashmla", capsys=capsys)
    rows = [row for rows in TINY_SPARSE.values() for row in rows]
    assert code == 0 and data["flashmla"] is True and len(data["rows"]) == len(rows)
    assert plotted == data["rows"]
    for r, row in zip(data["rows"], rows):
        assert r["kind"] == "sparse_decode" and (r["b"], r["h_q"], r["s_q"], r["topk"]) == row[:4]
        assert r["us"] == pytest.approx(OURS_S * 1e6)
        assert r["us_span"] == pytest.approx(SPAN_S * 1e6) and r["reference_agrees"] is True
        nbytes, flops = sparse_benchmark.traffic(row)
        assert r["gbps"] == pytest.approx(nbytes / OURS_S / 1e9)
        assert r["tflops"] == pytest.approx(flops / OURS_S / 1e12)
        ours, flashmla, ref = sparse_table_cells(lines, row)
        assert ours[:2] == [f"{OURS_S * 1e6:.1f}", f"{SPAN_S * 1e6:.1f}"]
        assert ref == [f"{OURS_S * 1e6:.1f}"]  # the plain-JAX reference, timed without --quick
        if row.fp8:
            assert r["flashmla_us"] == pytest.approx(FLASHMLA_S * 1e6)
            assert r["ratio"] == pytest.approx(FLASHMLA_S / OURS_S)
            assert r["flashmla_h_q"] == 64 and r["flashmla_agrees"] is True
            assert flashmla == [f"{FLASHMLA_S * 1e6:.1f}", "64", f"{FLASHMLA_S / OURS_S:.2f}"]
        else:  # no bf16 sparse decode in FlashMLA
            assert r["flashmla_us"] is r["ratio"] is r["flashmla_h_q"] is None
            assert "flashmla_agrees" not in r and flashmla == ["-", "-", "-"]


def test_sparse_flashmla_is_timed_on_the_very_inputs_of_ours(tiny_sparse_bench, monkeypatch,
                                                            capsys):
    run, timed, _ = tiny_sparse_bench
    fake = FakeFlashMLA()
    monkeypatch.setattr(benchmark, "load_flashmla", lambda: fake)
    run("--flashmla", "--quick", capsys=capsys)
    assert [calls for _, calls in timed] == [3, 3]  # --quick: the FP8 rows, no reference
    assert len(fake.got) == len(timed)
    same = lambda a, b: flashmla_baseline.host_bytes(a).tobytes() == np.asarray(b).tobytes()
    for (case, scales), ((q, pool, index_sets, _), _) in zip(fake.got, timed):
        assert scales == benchmark.call_scales(3)
        assert same(case.q, q) and same(case.pool, pool)
        assert len(case.index_sets) == len(index_sets) > 1
        assert all(map(same, case.index_sets, index_sets))


@pytest.mark.parametrize("wrong", ["flashmla", "reference"])
def test_sparse_disagreement_fails_the_run(wrong, tiny_sparse_bench, monkeypatch, capsys):
    """FlashMLA's outputs off ours, or ours off the plain-JAX reference: the timings are not of
    the same (or a right) computation."""
    run, _, _ = tiny_sparse_bench
    monkeypatch.setattr(benchmark, "load_flashmla",
                        lambda: FakeFlashMLA(out_error=0.1 if wrong == "flashmla" else 0.0))
    if wrong == "reference":
        def off(*args, **kwargs):
            out, lse = reference.flash_mla_with_kvcache(*args, **kwargs)
            return out, lse + 1e-3
        monkeypatch.setattr(sparse_benchmark, "reference", types.SimpleNamespace(
            flash_mla_with_kvcache=off))
    assert_disagreement_fails(wrong, *run("--flashmla", "--quick", capsys=capsys), rows=2)


def assert_disagreement_fails(wrong, code, data, lines, err, *, rows):
    """A run whose `wrong` side ("flashmla" or "reference") disagreed on each of its `rows`
    rows: exit status 1, each row flagged in the table and in bench.json, one line on stderr."""
    assert code == 1
    flag = "FlashMLA DISAGREES" if wrong == "flashmla" else "REFERENCE DISAGREES"
    assert sum(flag in line for line in lines) == len(data["rows"]) == rows
    key = "flashmla_agrees" if wrong == "flashmla" else "reference_agrees"
    assert all(r[key] is False for r in data["rows"])
    assert ("FlashMLA and ours disagree" if wrong == "flashmla" else
            "disagrees with the plain-JAX reference") in err


# --- bench --sparse-prefill: the sparse prefill rows (sparse_prefill_benchmark.py) --------------

def test_sparse_prefill_rows_are_flashmlas_performance_grid():
    """s_q 4096, topk 2048, s_kv x h_q: FlashMLA's own sparse prefill cases, each once, all of
    which its Hopper kernel runs; --quick two of them."""
    rows = sparse_prefill_benchmark.GRID_ROWS
    assert len(rows) == len(set(rows)) == 6
    assert set(rows) == {(4096, s_kv, h_q, 2048) for s_kv in (8192, 32768, 131072)
                         for h_q in (64, 128)}
    quick = sparse_prefill_benchmark.QUICK_ROWS
    assert set(quick) <= set(rows) and len(quick) == len(set(quick)) == 2
    assert {row.h_q for row in quick} == {64, 128}
    assert all(flashmla_baseline.FlashMLA.runs_sparse_prefill(row.h_q, row.topk) for row in rows)
    runs = flashmla_baseline.FlashMLA.runs_sparse_prefill
    assert not runs(32, 2048) and not runs(256, 2048)  # h_q 64 or 128 only
    assert not runs(64, 2112) and runs(64, 2176)  # topk a multiple of 128, not only of 64


def test_sparse_prefill_traffic_formulas():
    nbytes, flops = sparse_prefill_benchmark.traffic(PrefillRow(4096, 8192, 128, 2048))
    assert nbytes == 4096 * 2048 * 576 * 2 + 4096 * 128 * (576 + 512) * 2
    assert flops == 2 * 4096 * 128 * 2048 * (576 + 512)
    # FlashMLA's own count of the same row, in the H200 sparse anchors of shared/anchors.
    assert flops / 4049.867685714454e-6 / 1e12 == pytest.approx(576.9230973312192)
    nbytes, flops = sparse_prefill_benchmark.traffic(PrefillRow(4, 100, 64, 128))
    assert nbytes == 4 * 128 * 1152 + 4 * 64 * 1088 * 2
    assert flops == 2 * 4 * 64 * 128 * 1088


def test_sparse_prefill_kv_copies_hold_4x_the_l2():
    for s_kv in (8192, 32768, 131072):
        copies = sparse_prefill_benchmark.kv_copies(s_kv, benchmark.L2_BYTES)
        assert copies * s_kv * 1152 >= 4 * benchmark.L2_BYTES > (copies - 1) * s_kv * 1152
    assert sparse_prefill_benchmark.kv_copies(131072, benchmark.L2_BYTES) == 2
    assert sparse_prefill_benchmark.kv_copies(100, 0) == 1


def test_sparse_prefill_case_draws_distinct_uniform_indices_and_rotates_kv(rng):
    row, l2_bytes = PrefillRow(s_q=64, s_kv=256, h_q=16, topk=64), 1 << 17
    case = sparse_prefill_benchmark.prefill_case(rng, row, l2_bytes)
    assert case.q.shape == (64, 16, 576) and case.q.dtype == jnp.bfloat16
    copies = len(case.kv_copies)
    assert copies == sparse_prefill_benchmark.kv_copies(256, l2_bytes) == 2
    for kv in case.kv_copies:
        assert kv.shape == (256, 1, 576) and kv.dtype == jnp.bfloat16
        latents = np.asarray(kv.astype(jnp.float32))
        assert np.isfinite(latents).all() and 0 < np.abs(latents).max() < 10  # random normal
    assert not np.array_equal(np.asarray(case.kv_copies[0]), np.asarray(case.kv_copies[1]))
    indices = case.indices
    assert indices.dtype == np.int32 and indices.shape == (64, 1, 64)
    assert ((indices >= 0) & (indices < 256)).all()
    assert all(len(set(query)) == 64 for query in indices.reshape(64, 64).tolist())
    assert set(indices.ravel().tolist()) == set(range(256))  # drawn from the whole kv
    assert len(sparse_prefill_benchmark.prefill_case(rng, row, 0).kv_copies) == 1


def test_sparse_prefill_checks_first_last_and_middle_tokens():
    assert sparse_prefill_benchmark.check_tokens(4096) == [0, 1, 2048, 4095]
    assert sparse_prefill_benchmark.check_tokens(1) == [0]


def test_bench_parses_the_sparse_prefill_option(capsys):
    parser = argparse.ArgumentParser()
    benchmark.add_arguments(parser)
    args = parser.parse_args(["--sparse-prefill", "--quick", "--flashmla"])
    assert args.sparse_prefill and args.quick and args.flashmla and not args.sparse
    assert not parser.parse_args([]).sparse_prefill
    with pytest.raises(SystemExit):
        parser.parse_args(["--sparse", "--sparse-prefill"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert sparse_prefill_benchmark.rows_for(quick=True) == sparse_prefill_benchmark.QUICK_ROWS
    assert sparse_prefill_benchmark.rows_for(quick=False) == sparse_prefill_benchmark.GRID_ROWS


def test_one_sparse_prefill_row_runs_with_the_reference(rng):
    args = argparse.Namespace(calls=2, repeats=1, blocks=2)
    row = sparse_prefill_benchmark.measure(rng, PrefillRow(8, 256, 16, 64), args,
                                           l2_bytes=1 << 17)
    assert row["us"] > 0 and row["gbps"] > 0 and row["tflops"] > 0
    assert row["reference_agrees"] is True and row["reference_out_diff"] < 2.0 ** -6
    assert row["reference_lse_diff"] < 1e-4 and row["reference_max_logits_diff"] < 1e-4
    assert row["us_span"] is None and row["flashmla_us"] is None and row["ratio"] is None
    assert row["kind"] == "sparse_prefill" and row["kv_copies"] == 2


# Tiny rows: FlashMLA's fake runs the h_q 64 one (topk a multiple of 128) and not the h_q 16
# one, as the real one would. --quick takes the first.
TINY_PREFILL = [PrefillRow(4, 256, 64, 128), PrefillRow(4, 128, 16, 64)]


@pytest.fixture
def tiny_prefill_bench(monkeypatch, tmp_path):
    """`bench --sparse-prefill` on TINY_PREFILL as on a GPU, ours timed at OURS_S a call (SPAN_S
    by the profiler), the plot stubbed; returns run(extra args) -> (exit code, bench.json,
    stdout lines, stderr), and the inputs of each timing."""
    monkeypatch.setattr(benchmark, "on_gpu", lambda: True)
    monkeypatch.setattr(benchmark, "device_time_per_call", lambda *args: SPAN_S)
    monkeypatch.setattr(benchmark, "L2_BYTES", 1 << 17)
    monkeypatch.setattr(benchmark, "measure_ceilings", lambda blocks: (1000.0, 100.0))
    monkeypatch.setattr(sparse_prefill_benchmark, "GRID_ROWS", TINY_PREFILL)
    monkeypatch.setattr(sparse_prefill_benchmark, "QUICK_ROWS", TINY_PREFILL[:1])
    monkeypatch.setattr(benchmark, "plot", lambda *args: None)
    timed = []

    def time_per_call(fn, args, calls, repeats, blocks):
        timed.append((args, calls))
        return OURS_S

    monkeypatch.setattr(benchmark, "time_per_call", time_per_call)

    def run(*extra, capsys):
        code = cli.main(["bench", "--sparse-prefill", "--calls", "3", "--out", str(tmp_path),
                         *extra])
        with open(tmp_path / "bench.json") as f:
            data = json.load(f)
        captured = capsys.readouterr()
        return code, data, captured.out.splitlines(), captured.err

    return run, timed


def prefill_table_cells(lines, row):
    """The three |-separated groups of cells of `row`'s line in the sparse prefill table."""
    line, = [l for l in lines if l.split()[:4] == [str(x) for x in row]]
    return [group.split() for group in line.split("|")[1:]]


def test_sparse_prefill_table_and_json_carry_flashmla_and_the_ratio(tiny_prefill_bench,
                                                                    monkeypatch, capsys):
    run, timed = tiny_prefill_bench
    monkeypatch.setattr(benchmark, "load_flashmla", lambda: FakeFlashMLA())
    code, data, lines, _ = run("--flashmla", capsys=capsys)
    assert code == 0 and data["flashmla"] is True and len(data["rows"]) == len(TINY_PREFILL)
    assert [calls for _, calls in timed] == [3, 3]
    for r, row in zip(data["rows"], TINY_PREFILL):
        assert r["kind"] == "sparse_prefill"
        assert (r["s_q"], r["s_kv"], r["h_q"], r["topk"]) == tuple(row)
        assert r["us"] == pytest.approx(OURS_S * 1e6)
        assert r["us_span"] == pytest.approx(SPAN_S * 1e6) and r["reference_agrees"] is True
        nbytes, flops = sparse_prefill_benchmark.traffic(row)
        assert r["gbps"] == pytest.approx(nbytes / OURS_S / 1e9)
        assert r["tflops"] == pytest.approx(flops / OURS_S / 1e12)
        ours, flashmla = prefill_table_cells(lines, row)
        assert ours == [f"{OURS_S * 1e6:.1f}", f"{SPAN_S * 1e6:.1f}", f"{r['tflops']:.1f}",
                        f"{r['tflops'] / 100.0 * 100:.0f}"]  # %roof: of the matmul rate only
        if row.h_q == 64:
            assert r["flashmla_us"] == pytest.approx(FLASHMLA_S * 1e6)
            assert r["ratio"] == pytest.approx(FLASHMLA_S / OURS_S)
            assert r["flashmla_agrees"] is True
            assert flashmla == [f"{FLASHMLA_S * 1e6:.1f}", f"{FLASHMLA_S / OURS_S:.2f}"]
        else:  # h_q 16: not a FlashMLA sparse prefill
            assert r["flashmla_us"] is r["ratio"] is None
            assert "flashmla_agrees" not in r and flashmla == ["-", "-"]


def test_sparse_prefill_flashmla_is_timed_on_the_very_inputs_of_ours(tiny_prefill_bench,
                                                                    monkeypatch, capsys):
    run, timed = tiny_prefill_bench
    fake = FakeFlashMLA()
    monkeypatch.setattr(benchmark, "load_flashmla", lambda: fake)
    run("--flashmla", "--quick", capsys=capsys)
    assert len(fake.got) == len(timed) == 1
    (case, scales), ((q, kvs, indices), calls) = fake.got[0], timed[0]
    assert scales == benchmark.call_scales(3) and calls == 3
    same = lambda a, b: flashmla_baseline.host_bytes(a).tobytes() == np.asarray(b).tobytes()
    assert same(case.q, q) and same(case.indices, indices)
    assert len(case.kv_copies) == len(kvs) == 2 and all(map(same, case.kv_copies, kvs))


@pytest.mark.parametrize("wrong", ["flashmla", "reference"])
def test_sparse_prefill_disagreement_fails_the_run(wrong, tiny_prefill_bench, monkeypatch,
                                                   capsys):
    run, _ = tiny_prefill_bench
    monkeypatch.setattr(benchmark, "load_flashmla",
                        lambda: FakeFlashMLA(out_error=0.1 if wrong == "flashmla" else 0.0))
    if wrong == "reference":
        def off(*args, **kwargs):
            out, max_logits, lse = reference.flash_mla_sparse_fwd(*args, **kwargs)
            return out, max_logits + 1e-3, lse
        monkeypatch.setattr(sparse_prefill_benchmark, "reference", types.SimpleNamespace(
            flash_mla_sparse_fwd=off))
    assert_disagreement_fails(wrong, *run("--flashmla", "--quick", capsys=capsys), rows=1)


# --- FlashMLA's CUDA-graph timing, through a fake torch ------------------------------------------

class FakeTensor:
    """What flashmla_baseline asks of a torch tensor, on a NumPy array."""

    def __init__(self, array):
        self.array = np.asarray(array)

    def view(self, dtype):
        return FakeTensor(self.array.view(dtype))

    def to(self, device):
        return self

    def float(self):
        return FakeTensor(self.array.astype(np.float32))

    def cpu(self):
        return self

    def numpy(self):
        return self.array


def fake_torch_and_flash_mla(events):
    """(torch, flash_mla) stand-ins that log what runs: each FlashMLA call (its arguments), the
    capture's start and end, each replay, the cache's release. A call's out and lse hold each
    head's number, to see which heads come back."""
    class Graph:
        def replay(self):
            events.append("replay")

    @contextlib.contextmanager
    def graph(g):
        events.append("capture")
        yield
        events.append("captured")

    cuda = types.SimpleNamespace(synchronize=lambda: None, CUDAGraph=Graph, graph=graph,
                                 empty_cache=lambda: events.append("empty_cache"))
    torch = types.SimpleNamespace(from_numpy=FakeTensor, bfloat16=jnp.bfloat16, cuda=cuda)
    schedule = object()

    def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, sched_meta,
                               **kwargs):
        events.append(dict(q=q.array, k_cache=k_cache.array, block_table=block_table,
                           cache_seqlens=cache_seqlens, head_dim_v=head_dim_v,
                           sched_meta=sched_meta, **kwargs))
        b, s_q, heads, _ = q.array.shape
        head = np.arange(heads, dtype=np.float32)
        return (FakeTensor(np.broadcast_to(head[:, None], (b, s_q, heads, 512))),
                FakeTensor(np.broadcast_to(head[:, None], (b, heads, s_q))))

    def flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v):
        """(out, max_logits, lse) as FlashMLA orders them: each head's number, plus 1000 in
        max_logits and 2000 in lse, to see which comes back as which."""
        events.append(dict(q=q.array, kv=kv.array, indices=indices.array, sm_scale=sm_scale,
                           d_v=d_v))
        s_q, heads, _ = q.array.shape
        head = np.broadcast_to(np.arange(heads, dtype=np.float32), (s_q, heads))
        return (FakeTensor(np.broadcast_to(head[..., None], (s_q, heads, d_v))),
                FakeTensor(head + 1000), FakeTensor(head + 2000))

    flash_mla = types.SimpleNamespace(get_mla_metadata=lambda: (schedule, None),
                                      flash_mla_with_kvcache=flash_mla_with_kvcache,
                                      flash_mla_sparse_fwd=flash_mla_sparse_fwd)
    return torch, flash_mla, schedule


def test_flashmla_sparse_graph_times_padded_calls_after_one_warm_call(rng):
    """One call outside the capture (it initializes FlashMLA's schedule), then every call of the
    block captured, each on its index set and scale, q padded to 64 heads with zeros; the graph
    replayed 2 + blocks * repeats times; the first call's real heads kept; torch's cache
    emptied for JAX's next row."""
    events = []
    torch, flash_mla, schedule = fake_torch_and_flash_mla(events)
    q, q_bits = random_finite_bf16_bits(rng, (2, 2, 16, 8))
    pool = rng.integers(0, 256, size=(3, 4, 1, 656), dtype=np.uint8)
    index_sets = tuple(rng.integers(0, 12, size=(2, 2, 4), dtype=np.int32) for _ in range(3))
    case = sparse_benchmark.SparseCase(q, jnp.asarray(pool), index_sets)
    scales = benchmark.call_scales(5)
    row = flashmla_baseline.FlashMLA(torch, flash_mla).measure_sparse(case, scales, blocks=3,
                                                                      repeats=2)
    calls = [e for e in events if isinstance(e, dict)]
    assert [e if isinstance(e, str) else "call" for e in events] == (
        ["call", "capture"] + ["call"] * 5 + ["captured"] + ["replay"] * 8 + ["empty_cache"])
    for i, call in enumerate(calls):
        scale = scales[0] if i == 0 else scales[i - 1]
        indices = index_sets[0] if i == 0 else index_sets[(i - 1) % 3]
        assert call["softmax_scale"] == scale and call["is_fp8_kvcache"] is True
        np.testing.assert_array_equal(call["indices"].array, indices)
        assert call["sched_meta"] is schedule and call["head_dim_v"] == 512
        assert call["block_table"] is None and call["cache_seqlens"] is None
        np.testing.assert_array_equal(call["k_cache"], pool)
        assert call["q"].shape == (2, 2, 64, 8)
        np.testing.assert_array_equal(call["q"][:, :, :16].view(np.int16), q_bits)
        assert (call["q"][:, :, 16:].view(np.int16) == 0).all()
    assert row.out.shape == (2, 2, 16, 512) and row.lse.shape == (2, 16, 2)
    np.testing.assert_array_equal(row.out[0, 0, :, 0], np.arange(16))
    np.testing.assert_array_equal(row.lse[0, :, 0], np.arange(16))
    assert row.seconds_per_call > 0


def test_flashmla_sparse_prefill_graph_times_rotated_kv_after_one_warm_call(rng):
    """One call outside the capture, then every call of the block captured, call i on kv copy
    i % copies with scales[i], all through the same indices; out, lse and max_logits of the
    first call kept by name (FlashMLA returns them as out, max_logits, lse)."""
    events = []
    torch, flash_mla, _ = fake_torch_and_flash_mla(events)
    q, q_bits = random_finite_bf16_bits(rng, (3, 64, 8))
    kvs = tuple(random_finite_bf16_bits(rng, (10, 1, 8))[0] for _ in range(2))
    indices = rng.integers(0, 10, size=(3, 1, 4), dtype=np.int32)
    case = sparse_prefill_benchmark.PrefillCase(q, kvs, indices)
    scales = benchmark.call_scales(3)
    row = flashmla_baseline.FlashMLA(torch, flash_mla).measure_sparse_prefill(
        case, scales, blocks=2, repeats=1)
    calls = [e for e in events if isinstance(e, dict)]
    assert [e if isinstance(e, str) else "call" for e in events] == (
        ["call", "capture"] + ["call"] * 3 + ["captured"] + ["replay"] * 4 + ["empty_cache"])
    for i, call in enumerate(calls):
        j = 0 if i == 0 else i - 1
        assert call["sm_scale"] == scales[j] and call["d_v"] == 512
        np.testing.assert_array_equal(call["kv"].view(np.int16),
                                      flashmla_baseline.host_bytes(kvs[j % 2]))
        np.testing.assert_array_equal(call["q"].view(np.int16), q_bits)
        np.testing.assert_array_equal(call["indices"], indices)
    assert row.out.shape == (3, 64, 512) and row.lse.shape == row.max_logits.shape == (3, 64)
    np.testing.assert_array_equal(row.out[0, :, 0], np.arange(64))
    np.testing.assert_array_equal(row.max_logits[0], np.arange(64) + 1000)
    np.testing.assert_array_equal(row.lse[0], np.arange(64) + 2000)


def test_flashmla_dense_graph_times_calls_after_one_warm_call(rng):
    """The dense measure, by the same graph timing: call i on tables[i % copies], scales[i]."""
    events = []
    torch, flash_mla, schedule = fake_torch_and_flash_mla(events)
    q, _ = random_bf16_bits(rng, (2, 1, 16, 8))
    tables = tuple(rng.integers(0, 6, size=(2, 3), dtype=np.int32) for _ in range(2))
    case = paged_inputs.RotatedCase(q, jnp.zeros((6, 64, 1, 8), jnp.bfloat16), tables,
                                    np.array([100, 150], np.int32))
    scales = benchmark.call_scales(3)
    row = flashmla_baseline.FlashMLA(torch, flash_mla).measure(case, scales, True, blocks=1,
                                                               repeats=1)
    calls = [e for e in events if isinstance(e, dict)]
    assert [e if isinstance(e, str) else "call" for e in events] == (
        ["call", "capture"] + ["call"] * 3 + ["captured"] + ["replay"] * 3 + ["empty_cache"])
    for i, call in enumerate(calls):
        j = 0 if i == 0 else i - 1
        assert call["softmax_scale"] == scales[j] and call["causal"] is True
        np.testing.assert_array_equal(call["block_table"].array, tables[j % 2])
        np.testing.assert_array_equal(call["cache_seqlens"].array, [100, 150])
        assert call["sched_meta"] is schedule and call["q"].shape == (2, 1, 16, 8)
    assert row.out.shape == (2, 1, 16, 512) and row.lse.shape == (2, 16, 1)


# --- torch gets the same bytes -----------------------------------------------------------------

def random_bf16_bits(rng, shape):
    """bfloat16 of every bit pattern (NaN payloads, infinities, -0, subnormals among them):
    anything that converts values instead of copying bytes changes some."""
    bits = rng.integers(-(1 << 15), 1 << 15, size=shape, dtype=np.int16)
    return jnp.asarray(bits.view(jnp.bfloat16)), bits


def random_finite_bf16_bits(rng, shape):
    """As random_bf16_bits without NaN and infinities (exponent bits all ones): what goes through
    a jnp op (padding) need not keep a NaN's payload, and older XLA CPU backends do not."""
    bits = rng.integers(-(1 << 15), 1 << 15, size=shape, dtype=np.int16)
    bits = np.where((bits & 0x7F80) == 0x7F80, bits & ~np.int16(0x4000), bits).astype(np.int16)
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
