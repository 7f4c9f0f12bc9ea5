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
// its result then and on every later call there (uncached if the device cannot be named). Each
// call site (each lambda type) has its own record.
template <typename Setter>
auto once_per_device(Setter&& set) {
  using Result = decltype(set());
  static std::mutex mutex;
  static std::unordered_map<int, Result> result_by_device;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return set();
  std::lock_guard<std::mutex> lock(mutex);
  auto it = result_by_device.find(device);
  if (it == result_by_device.end()) it = result_by_device.emplace(device, set()).first;
  return it->second;
}

// A launch configuration of `grid` in clusters of `cluster` CTAs (cudaLaunchKernelEx's and
// cudaOccupancyMaxActiveClusters' argument). Not copyable: `config` points at `attribute`.
struct ClusterLaunch {
  cudaLaunchAttribute attribute = {};
  cudaLaunchConfig_t config = {};
  ClusterLaunch(dim3 grid, dim3 cluster, int threads, size_t smem_bytes, cudaStream_t stream) {
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = cluster.x;
    attribute.val.clusterDim.y = cluster.y;
    attribute.val.clusterDim.z = cluster.z;
    config.gridDim = grid;
    config.blockDim = dim3(threads);
    config.dynamicSmemBytes = smem_bytes;
    config.stream = stream;
    config.attrs = &attribute;
    config.numAttrs = 1;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;
  ClusterLaunch& operator=(const ClusterLaunch&) = delete;
};

// Launches the decode kernel kKernel on `stream` with kSmemBytes of dynamic shared memory,
// setting that attribute once per device first; in a trace build, the trace printer follows.
// With `cluster` other than 1 x 1 x 1, the grid is launched in clusters of that shape.
// The kernel is a template argument, not a pointer: each kernel then has its own
// once_per_device record (kernels of one signature share a pointer type).
template <auto kKernel, size_t kSmemBytes, typename... Args>
cudaError_t launch_decode_kernel_in_clusters(dim3 grid, dim3 cluster, int threads,
                                             cudaStream_t stream, const Args&... args) {
  static_assert(kSmemBytes <= 227 * 1024, "over the 227 KiB a Hopper CTA may use");
  const cudaError_t err = once_per_device([] {
    sm90::prepare_trace_output();
    return cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                kSmemBytes);
  });
  if (err != cudaSuccess) return err;
  if (cluster.x * cluster.y * cluster.z == 1) {
    kKernel<<<grid, threads, kSmemBytes, stream>>>(args...);
  } else {
    const ClusterLaunch launch(grid, cluster, threads, kSmemBytes, stream);
    if (const cudaError_t status = cudaLaunchKernelEx(&launch.config, kKernel, args...);
        status != cudaSuccess)
      return status;
  }
  sm90::launch_trace_print(stream);
  return cudaGetLastError();
}

template <auto kKernel, size_t kSmemBytes, typename... Args>
cudaError_t launch_decode_kernel(dim3 grid, int threads, cudaStream_t stream,
                                 const Args&... args) {
  return launch_decode_kernel_in_clusters<kKernel, kSmemBytes>(grid, dim3(1, 1, 1), threads,
                                                               stream, args...);
}

// How many clusters of `cluster` CTAs of kKernel (kSmemBytes of shared memory each) the
// current device holds at once; 0 if it cannot say.
template <auto kKernel, size_t kSmemBytes>
int max_active_clusters(int threads, dim3 cluster) {
  if (cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes) !=
      cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  const ClusterLaunch launch(cluster, cluster, threads, kSmemBytes, nullptr);
  int count = 0;
  if (cudaOccupancyMaxActiveClusters(&count, kKernel, &launch.config) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return count;
}

}  // namespace jax_flash_mla
