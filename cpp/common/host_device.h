// Lets the shared scheduling and indexing code compile for both the CPU handler (plain C++)
// and the CUDA kernels, so the two paths cannot drift apart.
#pragma once

#if defined(__CUDACC__)
#define FMLA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FMLA_HOST_DEVICE inline
#endif
