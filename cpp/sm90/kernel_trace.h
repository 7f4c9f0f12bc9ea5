// Timestamps of a kernel's steps inside a few CTAs: where a tile's time goes, measured on the
// GPU itself (ncu's warp-state sampling does not work on the device machine).
//
// Compiled in only with -DJAX_FLASH_MLA_TRACE (CMake: -DJAX_FLASH_MLA_TRACE=ON); otherwise
// every call below is empty and the kernels are unchanged. When on, the leader thread of each
// warpgroup of CTAs (x < kTraceCtas, 0, 0) records (event, tile, clock64) in global memory, and
// a one-thread kernel launched after the traced one prints the records, one line each:
//     TRACE <cta> <warpgroup> <index> <event> <tile> <clock>
// benchmarks/trace_tiles.py runs a few shapes and turns the lines into per-step durations.
// clock64 counts SM cycles, so times compare only within a CTA (one SM).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

namespace jax_flash_mla {
namespace sm90 {

// What a record marks. Math warpgroups: a tile's steps, in order; the producer: its copies.
enum TraceEvent : int {
  kTraceSegmentBegin = 0,   // math: a segment starts (tile = its tile count)
  kTraceQueryLanded = 1,    // math: the query rows' wait returned
  kTraceKeysLanded = 2,     // math: the tile's "full" wait returned
  kTraceScoresDone = 3,     // math: S (or S^T) has completed
  kTraceMaxShared = 4,      // math: the row maxima are exchanged (barrier passed)
  kTraceProbsShared = 5,    // math: P is in shared memory for every math warp (barrier passed)
  kTraceValuesDone = 6,     // math: P V has completed; the stage is released
  kTraceSegmentEnd = 7,     // math: the segment's output is stored
  kTracePartialsShared = 8, // math: partial scores exchanged between the math warpgroups
  kTraceRowsReady = 9,      // math: denominators known, the output's stores begin
  kTraceStageFree = 10,     // producer: the stage's "empty" wait returned
  kTraceKeysIssued = 11,    // producer: the tile's copies are issued
  kTraceQueryFree = 12,     // producer: the query buffer's "empty" wait returned
  kTraceQueryIssued = 13,   // producer: the query rows' copies are issued
  kTraceHandoffIn = 14,     // math (seesaw): a wait on the other math warpgroup returned
  kTraceGroupLanded = 15,   // math (seesaw): the last piece of a group of S's pieces landed
};

constexpr int kTraceCtas = 2;
// Slots: each warpgroup's first thread (0-2), and the producer's second warp (3), which issues
// the seesaw kernel's stage-1 copies.
constexpr int kTraceWarpgroups = 4;
constexpr int kTraceSecondProducerWarp = 3;
constexpr int kTraceEvents = 4096;

#ifdef JAX_FLASH_MLA_TRACE
struct TraceRecord {
  long long clock;
  int event;
  int tile;
};

// Per translation unit (static): each kernel file records and prints its own launches.
static __device__ TraceRecord g_trace_records[kTraceCtas][kTraceWarpgroups][kTraceEvents];
static __device__ int g_trace_counts[kTraceCtas][kTraceWarpgroups];

class WarpgroupTrace {
 public:
  __device__ WarpgroupTrace()
      : warpgroup_(threadIdx.x == 32 ? kTraceSecondProducerWarp : threadIdx.x / 128),
        on_(blockIdx.x < kTraceCtas && blockIdx.y == 0 && blockIdx.z == 0 &&
            (threadIdx.x % 128 == 0 || threadIdx.x == 32)) {}
  __device__ void mark(int event, int tile) {
    if (on_ && count_ < kTraceEvents)
      g_trace_records[blockIdx.x][warpgroup_][count_++] = {clock64(), event, tile};
  }
  // At the kernel's end: how many records there are. The printing is another kernel's
  // (print_trace_records): a printf call inside the traced kernel made ptxas serialize every
  // wgmma in it (C7510, "pipeline crossing function boundary"), skewing the timings.
  __device__ void publish() const {
    if (on_) g_trace_counts[blockIdx.x][warpgroup_] = count_;
  }

 private:
  int warpgroup_;
  bool on_;
  int count_ = 0;
};

static __global__ void print_trace_records() {
  for (int cta = 0; cta < kTraceCtas; ++cta) {
    for (int wg = 0; wg < kTraceWarpgroups; ++wg) {
      for (int i = 0; i < g_trace_counts[cta][wg]; ++i) {
        const TraceRecord& r = g_trace_records[cta][wg][i];
        printf("TRACE %d %d %d %d %d %lld\n", cta, wg, i, r.event, r.tile, r.clock);
      }
      g_trace_counts[cta][wg] = 0;
    }
  }
}

// After each launch of a traced kernel, on its stream. Static like the records: each
// translation unit launches its own printer.
static inline void launch_trace_print(cudaStream_t stream) {
  print_trace_records<<<1, 1, 0, stream>>>();
}

// The device's printf buffer holds a launch's records (1 MiB by default does not). Host side,
// before the kernel's first launch; a later call fails once a printing kernel has run, and that
// error is cleared.
inline void prepare_trace_output() {
  cudaDeviceSetLimit(cudaLimitPrintfFifoSize, size_t{64} << 20);
  cudaGetLastError();
}
#else
class WarpgroupTrace {
 public:
  __device__ void mark(int, int) {}
  __device__ void publish() const {}
};
static inline void launch_trace_print(cudaStream_t) {}
inline void prepare_trace_output() {}
#endif

}  // namespace sm90
}  // namespace jax_flash_mla
