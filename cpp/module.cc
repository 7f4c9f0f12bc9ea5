// The Python extension: one registrations() dict, {platform: {target name: capsule}}, that
// jax_flash_mla registers with jax.ffi at import.
#include <nanobind/nanobind.h>

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_flash_mla_get_mla_metadata_cpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_flash_mla_decode_cpu);
#ifdef JAX_FLASH_MLA_WITH_CUDA
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_flash_mla_get_mla_metadata_cuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_flash_mla_decode_cuda);
#endif

namespace nb = nanobind;

namespace {

template <typename T>
nb::capsule as_capsule(T* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, T, XLA_FFI_CallFrame*>,
                "an XLA FFI handler must take an XLA_FFI_CallFrame*");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_jax_flash_mla, m) {
  m.def("registrations", []() {
    nb::dict cpu;
    cpu["jax_flash_mla_get_mla_metadata"] = as_capsule(jax_flash_mla_get_mla_metadata_cpu);
    cpu["jax_flash_mla_decode"] = as_capsule(jax_flash_mla_decode_cpu);
    nb::dict platforms;
    platforms["cpu"] = cpu;
#ifdef JAX_FLASH_MLA_WITH_CUDA
    nb::dict cuda;
    cuda["jax_flash_mla_get_mla_metadata"] = as_capsule(jax_flash_mla_get_mla_metadata_cuda);
    cuda["jax_flash_mla_decode"] = as_capsule(jax_flash_mla_decode_cuda);
    platforms["CUDA"] = cuda;
#endif
    return platforms;
  });
  m.def("built_with_cuda", []() {
#ifdef JAX_FLASH_MLA_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
