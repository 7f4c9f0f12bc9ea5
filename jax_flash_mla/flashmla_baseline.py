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
BUILD_HINT = ("build FlashMLA from source on the GPU machine with the recipe of "
              "shared/flashmla/README.md (benchmarks/run_on_device.sh flashmla does it from a "
              "copy in .flashmla/) and put the folder holding its flash_mla package on PYTHONPATH")


class FlashMLAUnavailable(ImportError):
    """torch or flash_mla cannot be imported; the message says how to get them."""


class FlashMLARow(NamedTuple):
    seconds_per_call: float
    out: np.ndarray  # float32 [b, s_q, h_q, 512] of the first call (tables[0], scales[0])
    lse: np.ndarray  # float32 [b, h_q, s_q] of the same call


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
    """FlashMLA's dense bf16 decode on the first CUDA device (JAX's first GPU)."""

    def __init__(self, torch, flash_mla):
        self.torch, self.flash_mla = torch, flash_mla
        self.device = "cuda:0"  # JAX's first GPU: both number the visible devices alike

    @staticmethod
    def runs(page: int, devices: int) -> bool:
        """Whether a benchmark row is one FlashMLA can run: one device, its page size."""
        return page == PAGE_BLOCK_SIZE and devices == 1

    def measure(self, case, scales, causal, blocks, repeats) -> FlashMLARow:
        """Seconds per call of a CUDA graph of len(scales) calls on `case`
        (paged_inputs.RotatedCase), and the first call's outputs."""
        torch, flash_mla = self.torch, self.flash_mla
        q = to_torch(torch, case.q, self.device)
        pool = to_torch(torch, case.pool, self.device)
        tables = [to_torch(torch, t, self.device) for t in case.tables]
        lengths = to_torch(torch, case.lengths, self.device)
        schedule, _ = flash_mla.get_mla_metadata()
        graph = None

        def call(i):
            return flash_mla.flash_mla_with_kvcache(
                q, pool, tables[i % len(tables)], lengths, HEAD_DIM_V, schedule,
                softmax_scale=scales[i], causal=causal)

        try:
            out, lse = call(0)  # computes the schedule
            first = (out.float().cpu().numpy(), lse.float().cpu().numpy())
            del out, lse
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for i in range(len(scales)):
                    call(i)
            seconds = wall_time_per_call(graph.replay, lambda _: torch.cuda.synchronize(),
                                         len(scales), blocks, repeats)
        finally:
            del q, pool, tables, lengths, schedule, graph
            torch.cuda.empty_cache()  # JAX allocates the next row's inputs
        return FlashMLARow(seconds, *first)
