"""DeepSeek's FlashMLA, timed beside ours by `jax-flash-mla bench --flashmla`.

FlashMLA runs through its own public Python API (`flash_mla.get_mla_metadata`,
`flash_mla.flash_mla_with_kvcache`, on torch tensors) on the very inputs ours is timed on: the
benchmark's q, page-pool copies, block tables and lengths (paged_inputs.rotated_case) go to
torch as the same bytes (bfloat16 through an int16 view, nothing rounded), and call i of a
block reads tables[i % copies] with softmax scale scales[i], as ours does. The timed unit is a
CUDA graph of `calls` calls, replayed `blocks` times without host sync
(device_timing.wall_time_per_call, the method ours is timed by); FlashMLA computes its schedule
on the first call of a FlashMLASchedMeta, which runs once before the capture, outside the timed
region, and its result is kept to check FlashMLA against ours on the same inputs.

Sparse decode (`bench --sparse`, sparse_benchmark.SparseCase) is timed the same way: the same
FP8 pool bytes, call i reading index_sets[i % len(index_sets)]. FlashMLA's sparse kernels take
only 64 or 128 query heads, so a row with fewer runs with zero heads padded in, as a caller
must (a zero query attends uniformly and changes no other head); its time is what that caller
pays, and the padded heads are sliced off the kept outputs.

Sparse prefill (`bench --sparse-prefill`, sparse_prefill_benchmark.PrefillCase), the same way
again: `flash_mla.flash_mla_sparse_fwd` on the same q, kv copies and indices, call i reading
kv_copies[i % len(kv_copies)]; the first call's max_logits are kept beside out and lse.

torch and flash_mla are imported only here, only for --flashmla: FlashMLA is built from source on
the GPU machine (its Hopper kernels need sm_90a), never a dependency of the package.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import jax.numpy as jnp

from .device_timing import wall_time_per_call

HEAD_DIM_V = 512
PAGE_BLOCK_SIZE = 64  # the only page size of FlashMLA's dense decode
# FlashMLA's sparse decode (csrc/api/sparse_decode.h): h_q 64 or 128 only, and topk a multiple
# of 64, the token block its Hopper kernel loads (TOPK_BLOCK_SIZE, asserted in splitkv_mla.cuh);
# any page size (it splits indices by division) but only the FP8 cache.
SPARSE_HEADS = (64, 128)
SPARSE_TOPK_BLOCK = 64
# FlashMLA's sparse prefill on Hopper (csrc/api/sparse_fwd.h, sm90/prefill/sparse): h_q 64 or
# 128 (no padding here: the benchmark's rows have one of them) and topk a multiple of 128, two
# 64-token blocks a loop step (asserted in phase1.cuh "to save some boundary checkings").
SPARSE_PREFILL_TOPK_BLOCK = 128
BUILD_HINT = ("build FlashMLA from source on the GPU machine with the recipe of "
              "shared/flashmla/README.md (benchmarks/run_on_device.sh flashmla does it from a "
              "copy in .flashmla/) and put the folder holding its flash_mla package on PYTHONPATH")


class FlashMLAUnavailable(ImportError):
    """torch or flash_mla cannot be imported; the message says how to get them."""


class FlashMLARow(NamedTuple):
    seconds_per_call: float
    # float32 [b, s_q, h_q, 512] of the first call (tables[0] or index_sets[0], scales[0]);
    # sparse prefill: [s_q, h_q, 512] (kv_copies[0], scales[0])
    out: np.ndarray
    lse: np.ndarray  # float32 [b, h_q, s_q] of the same call; sparse prefill: [s_q, h_q]
    max_logits: np.ndarray | None = None  # float32 [s_q, h_q]: sparse prefill only


def load() -> "FlashMLA":
    """The baseline, or FlashMLAUnavailable naming what is missing and how to build it."""
    try:
        import torch
    except ImportError as e:
        raise FlashMLAUnavailable(f"--flashmla needs torch, which cannot be imported ({e}); "
                                  f"{BUILD_HINT}") from e
    try:
        import flash_mla
    except ImportError as e:
        raise FlashMLAUnavailable(f"--flashmla needs FlashMLA's flash_mla package, which cannot "
                                  f"be imported ({e}); {BUILD_HINT}") from e
    return FlashMLA(torch, flash_mla)


def host_bytes(x) -> np.ndarray:
    """x (a JAX or NumPy array) on the host as an array torch.from_numpy takes, with the same
    bytes: bfloat16, which NumPy only knows through ml_dtypes, as an int16 view."""
    host = np.ascontiguousarray(np.asarray(x))
    return host.view(np.int16) if host.dtype == jnp.bfloat16 else host


def sparse_heads(h_q: int) -> int | None:
    """The query heads FlashMLA's sparse decode runs h_q heads with: the fewest of SPARSE_HEADS
    that hold them (zero heads padded in), or None where none does."""
    return next((heads for heads in SPARSE_HEADS if heads >= h_q), None)


def pad_heads(q, heads: int):
    """q [b, s_q, h_q, d] with heads - h_q zero heads appended on axis 2, same dtype."""
    return jnp.pad(q, ((0, 0), (0, 0), (0, heads - q.shape[2]), (0, 0)))


def to_torch(torch, x, device):
    """x as a torch tensor on `device`, bit for bit."""
    host = host_bytes(x)
    with warnings.catch_warnings():  # a read-only array is fine: it is copied, never written
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(host)
    if np.asarray(x).dtype == jnp.bfloat16:
        tensor = tensor.view(torch.bfloat16)
    return tensor.to(device)


class FlashMLA:
    """FlashMLA's dense bf16 and sparse FP8 decode on the first CUDA device (JAX's first GPU)."""

    def __init__(self, torch, flash_mla):
        self.torch, self.flash_mla = torch, flash_mla
        self.device = "cuda:0"  # JAX's first GPU: both number the visible devices alike

    @staticmethod
    def runs(page: int, devices: int) -> bool:
        """Whether a benchmark row is one FlashMLA can run: one device, its page size."""
        return page == PAGE_BLOCK_SIZE and devices == 1

    @staticmethod
    def runs_sparse(h_q: int, topk: int, fp8: bool) -> bool:
        """Whether a sparse benchmark row is one FlashMLA's sparse decode can run (h_q padded to
        sparse_heads(h_q))."""
        return fp8 and topk % SPARSE_TOPK_BLOCK == 0 and sparse_heads(h_q) is not None

    @staticmethod
    def runs_sparse_prefill(h_q: int, topk: int) -> bool:
        """Whether a sparse prefill benchmark row is one FlashMLA's Hopper kernel can run."""
        return h_q in SPARSE_HEADS and topk % SPARSE_PREFILL_TOPK_BLOCK == 0

    def measure(self, case, scales, causal, blocks, repeats) -> FlashMLARow:
        """Seconds per call of a CUDA graph of len(scales) calls on `case`
        (paged_inputs.RotatedCase), and the first call's outputs."""
        torch, flash_mla = self.torch, self.flash_mla
        q = to_torch(torch, case.q, self.device)
        pool = to_torch(torch, case.pool, self.device)
        tables = [to_torch(torch, t, self.device) for t in case.tables]
        lengths = to_torch(torch, case.lengths, self.device)
        schedule, _ = flash_mla.get_mla_metadata()

        def call(i):
            return flash_mla.flash_mla_with_kvcache(
                q, pool, tables[i % len(tables)], lengths, HEAD_DIM_V, schedule,
                softmax_scale=scales[i], causal=causal)

        try:
            seconds, (out, lse) = self._graph_time(call, len(scales), blocks, repeats)
        finally:
            del q, pool, tables, lengths, schedule, call
            torch.cuda.empty_cache()  # JAX allocates the next row's inputs
        return FlashMLARow(seconds, out, lse)

    def measure_sparse(self, case, scales, blocks, repeats) -> FlashMLARow:
        """Seconds per call of a CUDA graph of len(scales) sparse FP8 decode calls on `case`
        (sparse_benchmark.SparseCase) with q padded to sparse_heads(h_q) heads, and the first
        call's outputs of the h_q heads of case.q."""
        torch, flash_mla = self.torch, self.flash_mla
        h_q = case.q.shape[2]
        q = to_torch(torch, pad_heads(case.q, sparse_heads(h_q)), self.device)
        pool = to_torch(torch, case.pool, self.device)
        index_sets = [to_torch(torch, indices, self.device) for indices in case.index_sets]
        schedule, _ = flash_mla.get_mla_metadata()

        def call(i):
            return flash_mla.flash_mla_with_kvcache(
                q, pool, None, None, HEAD_DIM_V, schedule, softmax_scale=scales[i],
                is_fp8_kvcache=True, indices=index_sets[i % len(index_sets)])

        try:
            seconds, (out, lse) = self._graph_time(call, len(scales), blocks, repeats)
        finally:
            del q, pool, index_sets, schedule, call
            torch.cuda.empty_cache()
        return FlashMLARow(seconds, out[:, :, :h_q], lse[:, :h_q])

    def measure_sparse_prefill(self, case, scales, blocks, repeats) -> FlashMLARow:
        """Seconds per call of a CUDA graph of len(scales) sparse prefill calls on `case`
        (sparse_prefill_benchmark.PrefillCase), and the first call's out, lse and max_logits."""
        torch, flash_mla = self.torch, self.flash_mla
        q = to_torch(torch, case.q, self.device)
        kvs = [to_torch(torch, kv, self.device) for kv in case.kv_copies]
        indices = to_torch(torch, case.indices, self.device)

        def call(i):
            out, max_logits, lse = flash_mla.flash_mla_sparse_fwd(
                q, kvs[i % len(kvs)], indices, scales[i], HEAD_DIM_V)
            return out, lse, max_logits

        try:
            seconds, (out, lse, max_logits) = self._graph_time(call, len(scales), blocks,
                                                               repeats)
        finally:
            del q, kvs, indices, call
            torch.cuda.empty_cache()
        return FlashMLARow(seconds, out, lse, max_logits)

    def _graph_time(self, call, calls, blocks, repeats):
        """(seconds per call of a CUDA graph of call(0), ..., call(calls - 1), call(0)'s
        outputs (out, lse, ...) as float32 NumPy). call(0) first runs alone, outside the
        capture: it computes FlashMLA's schedule (where it has one), which the captured calls
        then reuse."""
        torch = self.torch
        graph = None
        try:
            first = tuple(x.float().cpu().numpy() for x in call(0))
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for i in range(calls):
                    call(i)
            seconds = wall_time_per_call(graph.replay, lambda _: torch.cuda.synchronize(),
                                         calls, blocks, repeats)
        finally:
            del graph  # its memory pool, before the caller empties torch's cache
        return seconds, first
