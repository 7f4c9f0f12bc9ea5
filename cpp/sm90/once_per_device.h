// Kernel attributes (shared-memory size and carveout) belong to one device's context, so they
// are set once per (kernel, device) rather than on every decode call (a driver call each time
// is host latency) or once per process (a second GPU in the process would launch without them).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <mutex>
#include <unordered_map>

#include "kernel_trace.h"

namespace jax_flash_mla {

// Runs `set` the first time it is reached on the calling thread's current device and returns
// its status then and on every later call there. Each call site (each lambda type) has its own
// record.
template <typename Setter>
cudaError_t once_per_device(Setter&& set) {
  static std::mutex mutex;
  static std::unordered_map<int, cudaError_t> status_by_device;
  int device = 0;
  if (const cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = status_by_device.find(device);
  if (it == status_by_device.end()) it = status_by_device.emplace(device, set()).first;
  return it->second;
}

// Launches the decode kernel kKernel on `stream` with kSmemBytes of dynamic shared memory,
// setting that attribute once per device first; in a trace build, the trace printer follows.
// The kernel is a template argument, not a pointer: each kernel then has its own
// once_per_device record (kernels of one signature share a pointer type).
template <auto kKernel, size_t kSmemBytes, typename... Args>
cudaError_t launch_decode_kernel(dim3 grid, int threads, cudaStream_t stream,
                                 const Args&... args) {
  static_assert(kSmemBytes <= 227 * 1024, "over the 227 KiB a Hopper CTA may use");
  const cudaError_t err = once_per_device([] {
    sm90::prepare_trace_output();
    return cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                kSmemBytes);
  });
  if (err != cudaSuccess) return err;
  kKernel<<<grid, threads, kSmemBytes, stream>>>(args...);
  sm90::launch_trace_print(stream);
  return cudaGetLastError();
}

}  // namespace jax_flash_mla
