"""`jax-flash-mla bench --sparse-prefill`: the sparse prefill rows (DeepSeek-V3.2,
`jax_flash_mla.flash_mla_sparse_fwd`), ours and, with --flashmla, FlashMLA's on the same inputs
in the same run, timed by the dense benchmark's method (benchmark.py's docstring): a block of
`calls` back-to-back calls, a jitted function for ours and a CUDA graph for FlashMLA, the calls
apart by their softmax scale so that XLA cannot merge them.

Rows: s_q = 4096 prompt tokens x s_kv in {8192, 32768, 131072} x h_q in {64, 128}, topk 2048,
on bf16 kv [s_kv, 1, 576] (the only kv FlashMLA's sparse prefill reads): FlashMLA's own
performance cases. --quick: (s_kv 32768, h_q 128) and (s_kv 131072, h_q 64).

Inputs (prefill_case): q and kv random normal bf16, drawn on the device (hundreds of megabytes);
each query token's indices are `topk` distinct tokens drawn uniformly from [0, s_kv), as
FlashMLA's benchmark draws them (no causal structure). A call reads q (300 or 600 MB) and
writes out (270 or 540 MB) once, far beyond the L2; the kv it gathers from is the one input that
can be smaller (9.4 MB at s_kv 8192), so calls rotate over copies of kv, as many as make the kv
that consecutive calls read exceed 4x the L2 (as the dense bench rotates pool copies), all read
through the same indices. Within one call the L2 serves most gathers anyway: each kv row is named
by s_q * topk / s_kv queries (64 to 1024) of that call.

Formulas (per call, as FlashMLA counts them; 1152 bytes a bf16 kv token):
  bytes = s_q * topk * 1152 + s_q * h_q * (576 + 512) * 2
  FLOPs = 2 * s_q * h_q * topk * (576 + 512)
The bytes count every gathered token once per query, mostly L2 hits as said above: they are no
HBM traffic, so the table's %roof is TFLOP/s over the measured bf16 matmul rate only.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import jax
import jax.numpy as jnp

import jax_flash_mla
from jax_flash_mla import benchmark, reference
from jax_flash_mla.sparse_benchmark import (REFERENCE_LSE_ATOL, REFERENCE_OUT_ROUNDINGS,
                                            distinct_indices)

D, DV = benchmark.D, benchmark.DV
KV_BYTES_PER_TOKEN = D * 2  # bf16


class PrefillRow(NamedTuple):
    s_q: int
    s_kv: int
    h_q: int
    topk: int


GRID_ROWS = [PrefillRow(4096, s_kv, h_q, 2048) for s_kv in (8192, 32768, 131072)
             for h_q in (64, 128)]
QUICK_ROWS = [PrefillRow(4096, 32768, 128, 2048), PrefillRow(4096, 131072, 64, 2048)]
SECTION = "sparse prefill, bf16 kv"


class PrefillCase(NamedTuple):
    """One row's inputs: call i reads kv_copies[i % len(kv_copies)] through `indices`."""
    q: jax.Array  # bfloat16 [s_q, h_q, 576]
    kv_copies: tuple[jax.Array, ...]  # bfloat16 [s_kv, 1, 576] each
    indices: np.ndarray  # int32 [s_q, 1, topk]


def traffic(row: PrefillRow) -> tuple[float, float]:
    """(bytes, FLOPs) of one call, by the module docstring's formulas."""
    return (row.s_q * row.topk * KV_BYTES_PER_TOKEN + row.s_q * row.h_q * (D + DV) * 2,
            2.0 * row.s_q * row.h_q * row.topk * (D + DV))


def kv_copies(s_kv: int, l2_bytes: int) -> int:
    """Copies of a kv of s_kv tokens that together hold at least 4x l2_bytes."""
    return max(1, math.ceil(4 * l2_bytes / (s_kv * KV_BYTES_PER_TOKEN)))


def prefill_case(rng, row: PrefillRow, l2_bytes: int) -> PrefillCase:
    """The module docstring's inputs for `row`: one kv for l2_bytes = 0."""
    indices = distinct_indices(rng, row.s_q, row.topk, row.s_kv).reshape(row.s_q, 1, row.topk)
    copies = kv_copies(row.s_kv, l2_bytes)
    q_key, *kv_keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 1 + copies)
    q = jax.random.normal(q_key, (row.s_q, row.h_q, D), jnp.bfloat16)
    kvs = tuple(jax.random.normal(key, (row.s_kv, 1, D), jnp.bfloat16) for key in kv_keys)
    return PrefillCase(q, kvs, indices)


def prefill_call(impl, q, kv, indices, scale):
    """(out, max_logits, lse) of one sparse prefill by `impl` (ours, or the reference)."""
    return impl(q, kv, indices, scale, DV)


# prefill_call compiled once per implementation, shapes and scale, not per row.
single_call = jax.jit(prefill_call, static_argnums=(0, 4))


def make_many_calls(impl, calls, copies):
    # As benchmark.make_many_calls: one element of every call's output kept, gathered by one
    # fusion at the end, so that no glue kernel runs between the prefill calls.
    def many(q, kvs, indices):
        kept = []
        for i, scale in enumerate(benchmark.call_scales(calls)):
            out, _, lse = prefill_call(impl, q, kvs[i % copies], indices, scale)
            kept += [out[0, 0, 0].astype(jnp.float32), lse[0, 0]]
        return jnp.sum(jnp.stack(kept))
    return jax.jit(many)


def check_tokens(s_q: int) -> list[int]:
    """The query tokens ours is checked against the reference on: the first two, one in the
    middle and the last, so that different parts of the schedule are seen."""
    return sorted({0, min(1, s_q - 1), s_q // 2, s_q - 1})


def differences(got, want, out_roundings, atol):
    """got, want: (out, lse, max_logits). (max |out diff|, max |lse diff|, max |max_logits
    diff|, whether out is within out_roundings bf16 roundings of max(1, max |want out|) and lse
    and max_logits within atol); NaN anywhere fails."""
    # On the host: FlashMLA's outputs arrive as NumPy, and need not travel to the device.
    got, want = ([np.asarray(x).astype(np.float32) for x in xs] for xs in (got, want))
    out_diff, lse_diff, max_diff = (float(np.abs(a - b).max()) for a, b in zip(got, want))
    bound = out_roundings * 2.0 ** -8 * max(1.0, float(np.abs(want[0]).max()))
    return out_diff, lse_diff, max_diff, bool(out_diff <= bound and lse_diff <= atol
                                              and max_diff <= atol)


def check_first_call(case: PrefillCase, flashmla_row):
    """Ours on a block's first call (kv_copies[0], the first scale), against the plain-JAX
    reference on check_tokens and, given flashmla_row, against FlashMLA's first call on every
    token."""
    scale = benchmark.call_scales(1)[0]
    indices = jnp.asarray(case.indices)
    out, max_logits, lse = single_call(jax_flash_mla.flash_mla_sparse_fwd, case.q,
                                       case.kv_copies[0], indices, scale)
    tokens = jnp.asarray(check_tokens(case.q.shape[0]))
    ref_out, ref_max_logits, ref_lse = single_call(reference.flash_mla_sparse_fwd,
                                                   case.q[tokens], case.kv_copies[0],
                                                   indices[tokens], scale)
    names = ("out_diff", "lse_diff", "max_logits_diff", "agrees")
    checks = dict(zip([f"reference_{n}" for n in names], differences(
        (out[tokens], lse[tokens], max_logits[tokens]), (ref_out, ref_lse, ref_max_logits),
        REFERENCE_OUT_ROUNDINGS, REFERENCE_LSE_ATOL)))
    if flashmla_row is not None:
        checks.update(zip([f"flashmla_{n}" for n in names], differences(
            (flashmla_row.out, flashmla_row.lse, flashmla_row.max_logits),
            (out, lse, max_logits), benchmark.AGREE_OUT_ROUNDINGS, benchmark.AGREE_LSE_ATOL)))
    return checks


def measure(rng, row: PrefillRow, args, l2_bytes, flashmla=None):
    """One row's time per call, ours (and FlashMLA's where it runs the row), with the checks of
    check_first_call. No plain-JAX timing: the reference gathers s_q * topk float32 latents, 19
    GB a call at these rows."""
    case = prefill_case(rng, row, l2_bytes)
    copies = len(case.kv_copies)
    inputs = (case.q, case.kv_copies, jnp.asarray(case.indices))
    fn = make_many_calls(jax_flash_mla.flash_mla_sparse_fwd, args.calls, copies)
    ours = benchmark.time_per_call(fn, inputs, args.calls, args.repeats, args.blocks)
    span = (benchmark.device_time_per_call(fn, inputs, args.calls, args.repeats)
            if benchmark.on_gpu() else None)
    result = dict(kind="sparse_prefill", s_q=row.s_q, s_kv=row.s_kv, h_q=row.h_q,
                  topk=row.topk, kv_copies=copies, us=ours * 1e6,
                  us_span=None if span is None else span * 1e6, flashmla_us=None, ratio=None)
    fm = None
    if flashmla is not None and flashmla.runs_sparse_prefill(row.h_q, row.topk):
        fm = flashmla.measure_sparse_prefill(case, benchmark.call_scales(args.calls),
                                             args.blocks, args.repeats)
        result.update(flashmla_us=fm.seconds_per_call * 1e6, ratio=fm.seconds_per_call / ours)
    result.update(check_first_call(case, fm))
    nbytes, flops = traffic(row)
    return dict(result, gbps=nbytes / ours / 1e9, tflops=flops / ours / 1e12)


def rows_for(quick: bool) -> list[PrefillRow]:
    return QUICK_ROWS if quick else GRID_ROWS


def disagreement_flags(r) -> str:
    """What the table appends to a row whose ours disagrees with FlashMLA or the reference."""
    flags = ""
    for who, label in (("flashmla", "FlashMLA"), ("reference", "REFERENCE")):
        if not r.get(f"{who}_agrees", True):
            flags += (f"  {label} DISAGREES: max |out diff| {r[f'{who}_out_diff']:.2e}, "
                      f"max |lse diff| {r[f'{who}_lse_diff']:.2e}, "
                      f"max |max_logits diff| {r[f'{who}_max_logits_diff']:.2e}")
    return flags


def print_table(title, results, mm_tflops):
    print(f"\n{title}")
    print(f"{'s_q':>5} {'s_kv':>6} {'h_q':>4} {'topk':>5} | "
          f"{'us':>8} {'us_span':>8} {'TFLOP/s':>7} {'%roof':>5} | {'FlashMLA':>8} {'ratio':>5}")
    for r in results:
        print(f"{r['s_q']:>5} {r['s_kv']:>6} {r['h_q']:>4} {r['topk']:>5} | "
              f"{r['us']:8.1f} {benchmark._cell(r['us_span'], '.1f', 8)} {r['tflops']:7.1f} "
              f"{r['tflops'] / mm_tflops * 100:5.0f} | "
              f"{benchmark._cell(r['flashmla_us'], '.1f', 8)} "
              f"{benchmark._cell(r['ratio'], '.2f', 5)}{disagreement_flags(r)}")


def measure_sections(rng, args, flashmla, copy_gbps, mm_tflops):
    """{section title: measured rows} of `bench --sparse-prefill`, the table printed once
    measured. copy_gbps is unused (see the module docstring's %roof); the signature is
    sparse_benchmark.measure_sections'."""
    del copy_gbps
    results = [measure(rng, row, args, benchmark.L2_BYTES, flashmla)
               for row in rows_for(args.quick)]
    print_table(SECTION, results, mm_tflops)
    return {SECTION: results}
