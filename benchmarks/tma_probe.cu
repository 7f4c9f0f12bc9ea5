// How fast can one SM's copy paths fill shared memory with the decode's key tiles?
//
// The paired seesaw's refills spend ~400-500 cycles issuing each multicast TMA box (the
// kernels' trace build, on an H200), more than L2 or DRAM throughput explain. This probe streams
// key tiles (64 tokens x 576 bf16 = 72 KiB, the kernels' page-64 tiles, through the same tensor
// map make_paged_kv_tensor_map builds) into a 2-stage ring, as the decode kernels do, with no
// compute: a consumer warp releases each stage the moment it lands. So the figures are the
// copy path's own ceiling at the kernels' buffer depth. Paths:
//   tma         one box per 64 columns (8 KiB), 9 a tile, from one warp
//   tma_pair    CTA pairs (cluster 1 x 2): each CTA issues every other box, multicast to both
//   tma_groups  3 boxes of 3 column blocks each (24 KiB) through a 4-D view of the cache
//   cpasync     16-byte cp.async by 128 threads (the LSU path), no TMA
//   mixed       columns [0, 256) by TMA, [256, 576) by cp.async, on one barrier
// each over a page pool that fits L2 (the copy path's limit) and one that does not (HBM's).
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
//     -Icpp -isystem <cutlass include> -isystem <cuda include>/cccl benchmarks/tma_probe.cu
// (benchmarks/run_on_device.sh probe builds and runs it.)
#include <cuda.h>
#include <cuda_runtime.h>

#include <cute/arch/cluster_sm90.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#include "sm90/once_per_device.h"
#include "sm90/paged_kv_tensor_map.h"

namespace {

using cutlass::arch::ClusterBarrier;
using cutlass::arch::ClusterTransactionBarrier;

constexpr int kTokens = 64;  // a tile: one page of 64 tokens
constexpr int kHeadDim = 576;
constexpr int kPieces = kHeadDim / 64;
constexpr int kPieceBytes = kTokens * 64 * 2;  // 8 KiB: 64 tokens x 128 bytes
constexpr int kTileBytes = kPieces * kPieceBytes;
constexpr int kStages = 2;
constexpr int kCopyThreads = 128;  // cp.async: 4 warps; TMA: warp 0 issues
constexpr int kThreads = kCopyThreads + 32;  // + the consumer warp
constexpr int kGroupPieces = 3;  // tma_groups: column blocks per box
constexpr int kTmaPiecesMixed = 4;  // mixed: pieces [0, 4) by TMA, the rest by cp.async
constexpr int kRecorded = 256;  // tiles whose timestamps CTA 0 records

enum Path : int { kTma, kTmaPair, kTmaGroups, kCpAsync, kMixed };
const char* const kPathNames[] = {"tma", "tma_pair", "tma_groups", "cpasync", "mixed"};

struct Params {
  const char* pool;     // num_pages x 64 tokens x 576 bf16
  const int* pages;     // the page of each CTA's tile t: pages[(cta * 977 + t) % num_pages]
  int num_pages;
  int tiles;            // per CTA
  Path path;
  long long* spans;     // per CTA: start, end clock
  long long* issue;     // CTA 0, per recorded tile: cycles its producer spent issuing
  long long* latency;   // CTA 0, per recorded tile: issue start -> landed
};

struct alignas(1024) Shared {
  char k[kStages][kTileBytes];
  uint64_t full[kStages];
  uint64_t empty[kStages];
  long long issued_at[kStages];
};

__device__ __forceinline__ uint32_t cluster_rank(Path path) {
  return path == kTmaPair ? cute::block_rank_in_cluster() : 0;
}

// One tile's 16-byte chunks [first_piece, kPieces) by cp.async from every copy thread, into the
// 128-byte swizzled layout the TMA boxes land in (chunk c of a token's row at c ^ token % 8);
// each thread's arrival on `full` fires when its copies land.
__device__ void gather_cpasync(const char* page, char* stage, int first_piece, uint64_t* full) {
  const int chunks = (kPieces - first_piece) * kTokens * 8;
  for (int i = threadIdx.x; i < chunks; i += kCopyThreads) {
    const int piece = first_piece + i / (kTokens * 8);
    const int token = i / 8 % kTokens;
    const int chunk = i % 8;
    const char* src = page + token * kHeadDim * 2 + piece * 128 + chunk * 16;
    char* dst = stage + piece * kPieceBytes + token * 128 + ((chunk ^ token % 8) * 16);
    cute::SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>::copy(
        *reinterpret_cast<const cute::uint128_t*>(src), *reinterpret_cast<cute::uint128_t*>(dst));
  }
  cutlass::arch::cpasync_barrier_arrive_noinc(full);
}

__global__ void __launch_bounds__(kThreads, 1)
    stream_tiles(const __grid_constant__ Params p, const __grid_constant__ CUtensorMap k_map,
                 const __grid_constant__ CUtensorMap group_map) {
  extern __shared__ __align__(1024) unsigned char smem_bytes[];
  auto& smem = *reinterpret_cast<Shared*>(smem_bytes);
  const Path path = p.path;
  const bool pair = path == kTmaPair;
  const uint32_t rank = cluster_rank(path);
  // The cluster's CTAs share the schedule: the pair's first CTA's index.
  const int cta = pair ? blockIdx.x - rank : blockIdx.x;
  const bool uses_cpasync = path == kCpAsync || path == kMixed;
  if (threadIdx.x == 0) {
    cute::prefetch_tma_descriptor(&k_map);
    cute::prefetch_tma_descriptor(&group_map);
    for (int s = 0; s < kStages; ++s) {
      // cp.async: every copy thread's noinc arrival, plus warp 0's expect_tx in mixed.
      const int arrivals = path == kCpAsync ? kCopyThreads : path == kMixed ? kCopyThreads + 1 : 1;
      ClusterBarrier::init(&smem.full[s], arrivals);
      ClusterBarrier::init(&smem.empty[s], pair ? 2 : 1);  // each reading CTA's consumer
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
  if (pair) cute::cluster_sync();
  const long long start = clock64();
  const auto page_of = [&](int t) {
    return p.pages[(static_cast<long long>(cta) * 977 + t) % p.num_pages];
  };

  // With TMA only warp 0 copies (thread 0 issues); with cp.async all 4 warps.
  if (threadIdx.x < (uses_cpasync ? kCopyThreads : 32)) {
    // ---- producer ----
    for (int t = 0; t < p.tiles; ++t) {
      const int s = t % kStages;
      const uint32_t phase = (t / kStages) & 1;
      ClusterBarrier::wait(&smem.empty[s], phase ^ 1);
      const int page = page_of(t);
      const long long t0 = clock64();
      // Published to the consumer by this thread's arrival on the stage's barrier below.
      if (threadIdx.x == 0) smem.issued_at[s] = t0;
      if (threadIdx.x == 0 && path != kCpAsync) {
        constexpr uint64_t kHint = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL);
        const int slot = page * kTokens;
        switch (path) {
          case kTma:
          case kTmaPair:
            ClusterTransactionBarrier::arrive_and_expect_tx(&smem.full[s], kTileBytes);
            for (int piece = 0; piece < kPieces; ++piece) {
              if (!pair)
                cute::SM90_TMA_LOAD_3D::copy(&k_map, &smem.full[s], kHint,
                                             smem.k[s] + piece * kPieceBytes, piece * 64, 0, slot);
              else if (piece % 2 == static_cast<int>(rank))
                cute::SM90_TMA_LOAD_MULTICAST_3D::copy(&k_map, &smem.full[s], 0b11, kHint,
                                                       smem.k[s] + piece * kPieceBytes,
                                                       piece * 64, 0, slot);
            }
            break;
          case kTmaGroups:
            ClusterTransactionBarrier::arrive_and_expect_tx(&smem.full[s], kTileBytes);
            for (int piece = 0; piece < kPieces; piece += kGroupPieces)
              cute::SM90_TMA_LOAD_4D::copy(&group_map, &smem.full[s], kHint,
                                           smem.k[s] + piece * kPieceBytes, 0, 0, slot, piece);
            break;
          case kMixed:
            ClusterTransactionBarrier::arrive_and_expect_tx(&smem.full[s],
                                                            kTmaPiecesMixed * kPieceBytes);
            for (int piece = 0; piece < kTmaPiecesMixed; ++piece)
              cute::SM90_TMA_LOAD_3D::copy(&k_map, &smem.full[s], kHint,
                                           smem.k[s] + piece * kPieceBytes, piece * 64, 0, slot);
            break;
          default:
            break;
        }
      }
      if (uses_cpasync) {
        const char* src = p.pool + static_cast<long long>(page) * kTileBytes;
        gather_cpasync(src, smem.k[s], path == kMixed ? kTmaPiecesMixed : 0, &smem.full[s]);
      }
      if (threadIdx.x == 0 && blockIdx.x == 0 && t < kRecorded) p.issue[t] = clock64() - t0;
    }
  } else if (threadIdx.x == kCopyThreads) {
    // ---- consumer: release each stage as soon as it lands ----
    for (int t = 0; t < p.tiles; ++t) {
      const int s = t % kStages;
      ClusterBarrier::wait(&smem.full[s], (t / kStages) & 1);
      const long long landed = clock64();
      if (blockIdx.x == 0 && t < kRecorded) p.latency[t] = landed - smem.issued_at[s];
      if (pair) {
        ClusterBarrier::arrive(&smem.empty[s], 0u, 1u);
        ClusterBarrier::arrive(&smem.empty[s], 1u, 1u);
      } else {
        ClusterBarrier::arrive(&smem.empty[s]);
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    p.spans[2 * blockIdx.x] = start;
    p.spans[2 * blockIdx.x + 1] = clock64();
  }
  // No CTA may exit while its peer's multicast or arrivals may still reach it.
  if (pair) cute::cluster_sync();
}

#define CHECK(call)                                                                    \
  do {                                                                                 \
    const cudaError_t err_ = (call);                                                   \
    if (err_ != cudaSuccess) {                                                         \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(err_)); \
      std::exit(1);                                                                    \
    }                                                                                  \
  } while (0)

long long median(std::vector<long long> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// The cache as (64 columns, 1 head, token slots, 9 column blocks): a box of (64, 1, 64,
// kGroupPieces) lands as kGroupPieces consecutive 8 KiB pieces, each 128-byte swizzled.
bool make_group_map(const void* pool, int num_pages, CUtensorMap* map) {
  const cuuint64_t row_bytes = kHeadDim * 2;
  const cuuint64_t sizes[4] = {64, 1, static_cast<cuuint64_t>(num_pages) * kTokens, kPieces};
  const cuuint64_t strides[3] = {row_bytes, row_bytes, 128};
  const cuuint32_t box[4] = {64, 1, kTokens, kGroupPieces};
  return jax_flash_mla::encode_swizzled_tensor_map(jax_flash_mla::ElementType::kBF16, pool,
                                                   sizes, strides, box, map);
}

}  // namespace

int main() {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int grid = sms / 2 * 2;  // whole pairs
  const int tiles = 512;
  CHECK(cudaFuncSetAttribute(stream_tiles, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             sizeof(Shared)));
  long long *spans, *issue, *latency;
  CHECK(cudaMalloc(&spans, sizeof(long long) * 2 * grid));
  CHECK(cudaMalloc(&issue, sizeof(long long) * kRecorded));
  CHECK(cudaMalloc(&latency, sizeof(long long) * kRecorded));
  std::printf("%d SMs, grid %d CTAs, %d tiles of %d KiB each, 2 stages; clock64 cycles\n", sms,
              grid, tiles, kTileBytes / 1024);
  std::printf("%-10s %-5s %9s %9s %11s %13s %15s\n", "path", "pool", "us", "TB/s", "B/cycle/SM",
              "issue cycles", "landed cycles");
  // 160 pages (11.5 MB) stay in L2; 16384 (1.2 GB) come from HBM.
  for (const int num_pages : {160, 16384}) {
    char* pool;
    CHECK(cudaMalloc(&pool, static_cast<size_t>(num_pages) * kTileBytes));
    CHECK(cudaMemset(pool, 0, static_cast<size_t>(num_pages) * kTileBytes));
    std::vector<int> order(num_pages);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), std::mt19937(7));
    int* pages;
    CHECK(cudaMalloc(&pages, sizeof(int) * num_pages));
    CHECK(cudaMemcpy(pages, order.data(), sizeof(int) * num_pages, cudaMemcpyHostToDevice));
    jax_flash_mla::DecodeParams dp{};
    dp.k_cache = pool;
    dp.num_blocks = num_pages;
    dp.page_block_size = kTokens;
    dp.num_heads_k = 1;
    dp.head_dim = kHeadDim;
    dp.dtype = jax_flash_mla::ElementType::kBF16;
    CUtensorMap k_map{}, group_map{};
    const bool maps = jax_flash_mla::make_paged_kv_tensor_map(dp, &k_map) &&
                      make_group_map(pool, num_pages, &group_map);
    if (!maps) std::printf("tensor map encoding failed: TMA paths skipped\n");
    for (const Path path : {kTma, kTmaPair, kTmaGroups, kCpAsync, kMixed}) {
      if (!maps && path != kCpAsync) continue;
      Params params{pool, pages, num_pages, tiles, path, spans, issue, latency};
      const jax_flash_mla::ClusterLaunch launch(dim3(grid), dim3(path == kTmaPair ? 2 : 1),
                                                kThreads, sizeof(Shared), nullptr);
      cudaEvent_t begin, end;
      CHECK(cudaEventCreate(&begin));
      CHECK(cudaEventCreate(&end));
      std::vector<float> times;
      for (int run = 0; run < 6; ++run) {  // the first is warm-up
        CHECK(cudaEventRecord(begin));
        CHECK(cudaLaunchKernelEx(&launch.config, stream_tiles, params, k_map, group_map));
        CHECK(cudaEventRecord(end));
        CHECK(cudaEventSynchronize(end));
        float ms = 0;
        CHECK(cudaEventElapsedTime(&ms, begin, end));
        if (run > 0) times.push_back(ms);
      }
      std::sort(times.begin(), times.end());
      const double us = times[times.size() / 2] * 1e3;
      std::vector<long long> span(2 * grid), issued(kRecorded), landed(kRecorded);
      CHECK(cudaMemcpy(span.data(), spans, sizeof(long long) * 2 * grid, cudaMemcpyDeviceToHost));
      CHECK(cudaMemcpy(issued.data(), issue, sizeof(long long) * kRecorded,
                       cudaMemcpyDeviceToHost));
      CHECK(cudaMemcpy(landed.data(), latency, sizeof(long long) * kRecorded,
                       cudaMemcpyDeviceToHost));
      std::vector<long long> cycles(grid);
      for (int c = 0; c < grid; ++c) cycles[c] = span[2 * c + 1] - span[2 * c];
      const double bytes = static_cast<double>(grid) * tiles * kTileBytes;  // landed in smem
      std::printf("%-10s %-5s %9.1f %9.2f %11.1f %13lld %15lld\n", kPathNames[path],
                  num_pages <= 160 ? "L2" : "HBM", us, bytes / us / 1e6,
                  static_cast<double>(tiles) * kTileBytes / median(cycles), median(issued),
                  median(landed));
      CHECK(cudaEventDestroy(begin));
      CHECK(cudaEventDestroy(end));
    }
    CHECK(cudaFree(pages));
    CHECK(cudaFree(pool));
  }
  std::printf("(TB/s counts bytes landed in shared memory, so a pair's multicast counts twice;\n"
              " issue: producer thread 0's cycles issuing a tile; landed: from that issue's\n"
              " start to the tile's barrier, CTA 0, median of its first %d tiles)\n", kRecorded);
  return 0;
}
