"""Decode test cases: what one case is, the covering grids the kernel tests run, and the check
of one case against the reference on a given device.

The full products of the axes are far too large to run, so the grids are all-pairs covering
sets (every value of every axis meets every value of every other axis in at least one case),
the CPU one topped up with a random sample of the product. Both are seeded, so the set is the
same on every run, and capped in cost per case, so that CI stays fast.
"""

import dataclasses
import functools
import itertools
import random

import jax
import jax.numpy as jnp

import jax_flash_mla
from jax_flash_mla import reference, testing
from jax_flash_mla.paged_inputs import make_paged_inputs, random_seqlens

from comparisons import KERNEL_LSE_ATOL, KERNEL_OUT_ROUNDINGS, assert_attention_close

HEAD_DIM_V = 512
LENGTHS = ("fixed", "varlen", "fixed+zeros", "varlen+zeros")


@dataclasses.dataclass(frozen=True)
class Case:
    b: int = 2
    s_q: int = 1
    s_k: int = 64
    h_q: int = 16
    h_kv: int = 1
    page: int = 64
    dtype: str = "bfloat16"
    d: int = 576
    causal: bool = False
    lengths: str = "fixed"  # one of LENGTHS
    num_sm_parts: int | None = None  # None: the default of get_mla_metadata
    seqlens: tuple[int, ...] | None = None  # explicit lengths (b, s_k, lengths unused)
    invalid_pages: int = 0  # in-length block_table entries made invalid (masked)
    overflow: bool = False  # lengths beyond the table's capacity and negative ones
    q_scale: float = 1.0
    softmax_scale: float | None = None
    fp8: bool = False  # the 656-byte FP8 cache (bf16 q, d = 576, h_kv = 1), is_fp8_kvcache

    def __str__(self):
        always = {"s_q", "h_q", "h_kv", "page", "dtype", "d"}
        if self.seqlens is None:
            always |= {"b", "s_k"}
        parts = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                 if f.name in always or getattr(self, f.name) != f.default]
        return "-".join(parts).replace("bfloat16", "bf16").replace("float16", "fp16")

    def make_inputs(self, rng):
        if self.seqlens is not None:
            seqlens = self.seqlens
        else:
            seqlens = random_seqlens(rng, self.b, self.s_k, varlen="varlen" in self.lengths,
                                     with_zeros="zeros" in self.lengths)
        return make_paged_inputs(
            rng, seqlens, s_q=self.s_q, h_q=self.h_q, h_kv=self.h_kv, d=self.d, page=self.page,
            dtype=jnp.dtype(self.dtype), invalid_pages=self.invalid_pages, q_scale=self.q_scale,
            overflow=self.overflow, fp8=self.fp8)


def covering_cases(axes, *, max_cost, cost, seed=0, tries=20):
    """Greedy all-pairs covering set over `axes` ({name: values, cheapest first}), keeping
    cost(case) <= max_cost; a partial case is judged by its cheapest completion."""
    rnd = random.Random(seed)
    names = list(axes)

    def cheapest(partial):
        return cost({n: partial.get(n, axes[n][0]) for n in names})

    def pairs_of(case):
        items = [(n, case[n]) for n in names if n in case]
        return set(itertools.combinations(items, 2))

    uncovered = {}  # a dict, for a deterministic order
    for n1, n2 in itertools.combinations(names, 2):
        for v1, v2 in itertools.product(axes[n1], axes[n2]):
            if cheapest({n1: v1, n2: v2}) <= max_cost:
                uncovered[((n1, v1), (n2, v2))] = None

    cases = []
    while uncovered:
        best, best_gain = None, -1
        for _ in range(tries):
            case = dict(rnd.choice(list(uncovered)))
            for n in rnd.sample(names, len(names)):
                if n in case:
                    continue
                options = [v for v in axes[n] if cheapest({**case, n: v}) <= max_cost]
                case[n] = max(options, key=lambda v: (
                    len(pairs_of({**case, n: v}) & uncovered.keys()), rnd.random()))
            gain = len(pairs_of(case) & uncovered.keys())
            if gain > best_gain or (gain == best_gain and cost(case) < cost(best)):
                best, best_gain = case, gain
        cases.append(best)
        for pair in pairs_of(best):
            uncovered.pop(pair, None)
    return cases


def sampled_cases(axes, count, *, max_cost, cost, seed=1):
    """`count` cases drawn uniformly from the product of `axes` with cost(case) <= max_cost:
    they reach some of the higher-order interactions that the pairs miss."""
    rnd = random.Random(seed)
    cases = []
    while len(cases) < count:
        case = {n: rnd.choice(values) for n, values in axes.items()}
        if cost(case) <= max_cost:
            cases.append(case)
    return cases


def decode_flops(case):
    return 2 * case["b"] * case["s_q"] * case["heads"][0] * case["s_k"] * (576 + HEAD_DIM_V)


def _grid(axes, *, max_cost, cost=decode_flops, samples=0):
    cases = []
    for c in (covering_cases(axes, max_cost=max_cost, cost=cost)
              + sampled_cases(axes, samples, max_cost=max_cost, cost=cost)):
        h_q, h_kv = c.pop("heads")
        cases.append(Case(h_q=h_q, h_kv=h_kv, **c))
    return cases


# (h_q, h_kv) is one axis, so that every pair it meets is a valid one (h_kv divides h_q).
CPU_AXES = {
    "heads": [(1, 1), (3, 1), (16, 1), (16, 2), (64, 1), (64, 2), (128, 1), (128, 2)],
    "b": [1, 2, 5],
    "s_q": [1, 2, 4],
    "s_k": [1, 20, 63, 64, 65, 140, 1000],
    "page": [16, 64, 1, 7, 32, 128, 256],
    "dtype": ["bfloat16", "float16"],
    "d": [576, 512],
    "causal": [False, True],
    "lengths": list(LENGTHS),
    "num_sm_parts": [1, 3, 16, 132],
}

# Cases the pairs do not reach on their own.
CORNER_CASES = [
    Case(seqlens=(0, 0, 0), s_q=2, causal=True),  # every request empty
    Case(seqlens=(0, 1, 2, 3, 4, 70), s_q=4, h_q=8, causal=True, page=16),  # rows see nothing
    Case(seqlens=(128, 0, 128, 40), page=64, overflow=True),  # lengths clamped to [0, cap]
    Case(seqlens=(300, 70, 5), page=16, invalid_pages=6, num_sm_parts=3),  # masked pages
    Case(seqlens=(2000, 1), h_q=16, s_q=2, causal=True, num_sm_parts=132),  # many splits
    Case(seqlens=(200, 500), h_q=32, h_kv=2, q_scale=8.0, num_sm_parts=16),  # peaky softmax
    Case(seqlens=(150, 90), softmax_scale=0.3, dtype="float16", num_sm_parts=3),
    Case(seqlens=(64, 128, 192), h_q=128, s_q=4, causal=True, num_sm_parts=16),  # 512 rows
]

CPU_GRID = _grid(CPU_AXES, max_cost=1.5e9, samples=64) + CORNER_CASES

# The FP8 cache (DeepSeek-V3.2's 656-byte tokens, dense decode through block_table): one KV
# head and bf16 queries of 576 columns; every other axis as above.
FP8_CPU_AXES = {
    "heads": [(1, 1), (3, 1), (16, 1), (64, 1), (128, 1)],
    "b": [1, 2, 5],
    "s_q": [1, 2, 4],
    "s_k": [1, 20, 63, 64, 65, 140, 1000],
    "page": [16, 64, 1, 7, 32, 128, 256],
    "causal": [False, True],
    "lengths": list(LENGTHS),
    "num_sm_parts": [1, 3, 16, 132],
    "fp8": [True],
}

FP8_CORNER_CASES = [
    Case(seqlens=(0, 0, 0), s_q=2, causal=True, fp8=True),
    Case(seqlens=(128, 0, 128, 40), page=64, overflow=True, fp8=True),
    Case(seqlens=(300, 70, 5), page=16, invalid_pages=6, num_sm_parts=3, fp8=True),
    Case(seqlens=(2000, 1), h_q=16, s_q=2, causal=True, num_sm_parts=132, fp8=True),
    Case(seqlens=(200, 500), h_q=32, q_scale=8.0, num_sm_parts=16, fp8=True),
    Case(seqlens=(150, 90), softmax_scale=0.3, num_sm_parts=3, fp8=True),
]

FP8_CPU_GRID = _grid(FP8_CPU_AXES, max_cost=1e9, samples=16) + FP8_CORNER_CASES

# The FP8 cache on the GPU, at FlashMLA-grid sizes (DeepSeek's 128 heads, long requests).
FP8_GPU_AXES = {
    "heads": [(1, 1), (9, 1), (16, 1), (63, 1), (64, 1), (128, 1)],
    "b": [1, 2, 6, 64],
    "s_q": [1, 2, 4],
    "s_k": [20, 140, 4096],
    "page": [64, 16, 1, 7, 256],
    "causal": [False, True],
    "lengths": ["fixed", "varlen"],
    "num_sm_parts": [None, 16, 132],
    "fp8": [True],
}

# FlashMLA's own test grid (tests/test_flash_mla_decoding.py), on the GPU.
FLASHMLA_AXES = {
    "heads": [(1, 1), (3, 3), (9, 1), (63, 3), (64, 8), (126, 2), (128, 1), (128, 8)],
    "b": [1, 2, 6, 64],
    "s_q": [1, 2, 4],
    "s_k": [20, 140, 4096],
    "page": [64, 16, 32, 128, 256],
    "dtype": ["bfloat16", "float16"],
    "causal": [False, True],
    "lengths": ["fixed", "varlen"],
    "num_sm_parts": [None, 16, 132],
}


def _gpu_cost(case):
    # Bounds both the work and the host-side cache generation (elements of k_cache).
    cache_elements = case["b"] * case["s_k"] * case["heads"][1] * 576
    return max(decode_flops(case) / 1e12, cache_elements / 2e8)


FLASHMLA_GRID = _grid(FLASHMLA_AXES, max_cost=1.0, cost=_gpu_cost)
FP8_GPU_GRID = _grid(FP8_GPU_AXES, max_cost=1.0, cost=_gpu_cost)


@functools.partial(jax.jit, static_argnames=("num_sm_parts", "softmax_scale", "causal",
                                             "kernel", "fp8"))
def poisoned_decode(q, k_cache, block_table, cache_seqlens, *, num_sm_parts, softmax_scale,
                    causal, kernel="dispatch", fp8=False):
    """The kernel with NaN-filled outputs; num_sm_parts None leaves the metadata to it, and
    `kernel` names the split-KV kernel (testing.SPLIT_KV_KERNELS) a test forces."""
    metadata = None
    if num_sm_parts is not None:
        h_kv = k_cache.shape[2]
        metadata = jax_flash_mla.get_mla_metadata(
            cache_seqlens, q.shape[1] * q.shape[2] // h_kv, h_kv, num_sm_parts=num_sm_parts)
    return testing.flash_mla_with_kvcache_poisoned(
        q, k_cache, block_table, cache_seqlens, HEAD_DIM_V, metadata=metadata,
        softmax_scale=softmax_scale, causal=causal, is_fp8_kvcache=fp8, kernel=kernel)


@functools.partial(jax.jit, static_argnames=("softmax_scale", "causal", "fp8"))
def reference_decode(q, k_cache, block_table, cache_seqlens, *, softmax_scale=None,
                     causal=False, fp8=False):
    return reference.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, HEAD_DIM_V,
                                            softmax_scale=softmax_scale, causal=causal,
                                            is_fp8_kvcache=fp8)


def check_case(case, rng, device, kernel="dispatch"):
    """The poisoned kernel on `device` against the reference, on fresh inputs of `case`; run by
    the split-KV kernel named `kernel` (the dispatch's pick by default)."""
    args = jax.device_put(tuple(case.make_inputs(rng)), device)
    out, lse = poisoned_decode(*args, num_sm_parts=case.num_sm_parts,
                               softmax_scale=case.softmax_scale, causal=case.causal,
                               kernel=kernel, fp8=case.fp8)
    ref_out, ref_lse = reference_decode(*args, softmax_scale=case.softmax_scale,
                                        causal=case.causal, fp8=case.fp8)
    assert_attention_close(out, lse, ref_out, ref_lse, dtype=jnp.dtype(case.dtype),
                           out_roundings=KERNEL_OUT_ROUNDINGS, lse_atol=KERNEL_LSE_ATOL)
