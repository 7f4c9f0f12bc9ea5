"""The command line as a new user meets it: bad numbers get argparse's one-line error, the
demo's step latencies never include a compile (under --parallel or --sparse either), and
`check` says what its time per call measures."""

import logging
import types

import jax
import pytest

from jax_flash_mla import __main__ as cli
from jax_flash_mla import benchmark, demo

SMALL_DEMO = ["--batch", "8", "--layers", "1", "--hidden", "64", "--max-prompt", "6"]


@pytest.mark.parametrize("argv", [
    ["demo", "--tokens", "0"],
    ["demo", "--page-size", "0"],
    ["demo", "--max-prompt", "0"],
    ["demo", "--batch", "-2"],
    ["demo", "--heads", "many"],
    ["demo", "--seed", "-1"],
    ["demo", "--sparse", "--topk", "0"],
    ["check", "--iters", "0"],
    ["check", "--seqlen", "0"],
    ["check", "--page-size", "0"],
    ["bench", "--calls", "0"],
], ids=" ".join)
def test_bad_numbers_get_argparses_error(argv, monkeypatch, capsys):
    # Nothing may run: a demo, a check or a benchmark that starts fails the test at once.
    def ran(*args, **kwargs):
        raise AssertionError(f"{argv[0]} ran with {argv[1:]}")

    monkeypatch.setattr(benchmark, "measure_ceilings", ran)
    monkeypatch.setattr(cli.paged_inputs, "make_paged_inputs", ran)
    monkeypatch.setattr(demo.deepseek, "init_params", ran)
    option, value = argv[-2:]
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv + (SMALL_DEMO[2:] if argv[0] == "demo" else []))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {option}: expected a " in err and f"got '{value}'" in err, err


@pytest.fixture
def compile_and_clock_events(monkeypatch):
    """Returns the list into which, in order, every XLA compile logs "compile" and every clock
    read of the demo logs "clock"."""
    events = []

    class Compiles(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith(("Compiling ", "Finished XLA compilation")):
                events.append("compile")

    handler = Compiles()
    logging.getLogger("jax").addHandler(handler)
    clock = demo.time.perf_counter
    monkeypatch.setattr(demo, "time", types.SimpleNamespace(
        perf_counter=lambda: events.append("clock") or clock()))
    with jax.log_compiles():
        yield events
    logging.getLogger("jax").removeHandler(handler)


@pytest.mark.parametrize("layout", ["none", "tp", "dp", "sparse", "fp8_tp", "fp8_dp"])
def test_demo_latencies_exclude_every_compile(layout, compile_and_clock_events, capsys):
    """The demo's last 2 x tokens clock reads bracket its timed steps: no compile may fall
    between a step's two (the step's own, a second one for shardings that changed, the
    --check reference's). `sparse`: DeepSeek-V3.2 on one device, top-4 of prompts up to 6
    tokens, so that its indexer drops tokens. `fp8_*`: the dense model over the FP8 cache."""
    if layout.endswith(("tp", "dp")) and len(jax.devices()) < 2:
        pytest.skip("needs several devices")
    tokens = 3
    if layout == "sparse":
        model = ["--sparse", "--topk", "4"]
    elif layout.startswith("fp8_"):
        model = ["--fp8-cache", "--parallel", layout[4:]]
    else:
        model = ["--parallel", layout]
    assert cli.main(["demo", *model, "--check", "--tokens", str(tokens), *SMALL_DEMO]) == 0
    events = compile_and_clock_events
    clocks = [i for i, e in enumerate(events) if e == "clock"]
    assert len(clocks) >= 2 * tokens and "compile" in events[:clocks[-2 * tokens]]
    for start, end in zip(clocks[-2 * tokens::2], clocks[-2 * tokens + 1::2]):
        assert "compile" not in events[start:end], f"a timed step compiled: {events}"
    out = capsys.readouterr().out
    assert "compilation excluded" in out and ": OK" in out, out
    assert ("DeepSeek-V3.2 sparse attention: each query over the top 4 tokens" in out) == (
        layout == "sparse"), out
    assert ("FP8 latent cache (656 bytes a token)" in out) == layout.startswith("fp8_"), out


@pytest.mark.parametrize("argv, message", [
    (["--sparse", "--parallel", "tp"], "--sparse: one device only"),
    (["--topk", "8"], "--topk: only with --sparse"),
    (["--sparse", "--fp8-cache"], "--fp8-cache: for the dense model"),
])
def test_demo_refuses_options_the_sparse_model_lacks(argv, message, monkeypatch):
    monkeypatch.setattr(demo.deepseek, "init_params", lambda *args: pytest.fail("demo ran"))
    with pytest.raises(SystemExit, match=message):
        cli.main(["demo", *argv, *SMALL_DEMO])


def test_check_on_a_cpu_says_its_time_is_the_hosts(capsys):
    assert cli.main(["check", "--batch", "2", "--seqlen", "64", "--iters", "3"]) == 0
    line, = [l for l in capsys.readouterr().out.splitlines() if l.startswith("time per call:")]
    assert "host wall time, dispatch and sync included (median of 3 calls)" in line, line


def test_check_on_a_gpu_reports_the_kernels_span(monkeypatch, capsys):
    """On a GPU the figure is the profiler's span of the call's kernels, not the host's time
    (several times the kernels' at these sizes)."""
    timed = []

    def device_time_per_call(fn, args, calls, repeats):
        timed.append((calls, repeats))
        return 15e-6

    monkeypatch.setattr(cli, "on_gpu", lambda: True)
    monkeypatch.setattr(cli, "device_time_per_call", device_time_per_call)
    assert cli.main(["check", "--batch", "2", "--seqlen", "64", "--iters", "4"]) == 0
    line, = [l for l in capsys.readouterr().out.splitlines() if l.startswith("time per call:")]
    assert line.startswith("time per call: 15.0 us on the GPU") and "host" not in line, line
    assert timed == [(1, 4)]
