// Kernel attributes (shared-memory size and carveout) belong to one device's context, so they
// are set once per (kernel, device) rather than on every decode call (a driver call each time
// is host latency) or once per process (a second GPU in the process would launch without them).
#pragma once

#include <cuda_runtime.h>

#include <mutex>
#include <unordered_map>

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

}  // namespace jax_flash_mla
