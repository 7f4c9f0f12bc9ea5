// The Python extension: one registrations() dict, {platform: {target name: capsule}}, that
// jax_flash_mla registers with jax.ffi at import; and the numbers and rules of the C++ side that
// the Python side needs (jax_flash_mla/_constants.py reads them), exported rather than copied so
// that the two cannot drift apart.
#include <nanobind/nanobind.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/tile_scheduler.h"
#ifdef JAX_FLASH_MLA_WITH_CUDA
#include "sm90/fp8_tile_slots.h"
#endif
#include "sm90/heuristics.h"
#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_flash_mla_get_mla_metadata_cpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_flash_mla_decode_cpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_flash_mla_sparse_decode_cpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_flash_mla_sparse_prefill_cpu);
#ifdef JAX_FLASH_MLA_WITH_CUDA
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_flash_mla_get_mla_metadata_cuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_flash_mla_decode_cuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_flash_mla_sparse_decode_cuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_flash_mla_sparse_prefill_cuda);
#endif

namespace nb = nanobind;

namespace {

template <typename T>
nb::capsule as_capsule(T* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, T, XLA_FFI_CallFrame*>,
                "an XLA FFI handler must take an XLA_FFI_CallFrame*");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

#ifdef JAX_FLASH_MLA_WITH_CUDA
// Every 16-byte chunk of an FP8 key tile, placed by the producer's slot arithmetic
// (sm90/fp8_tile_slots.h, as the kernels compose it) and by CuTe's tensor over the tile's
// swizzled layout, on the host: {"mismatches": chunks the two place apart, "uncovered": chunks
// no thread stores, "chunks": all of them}. CUDA builds only (the layout needs CuTe).
nb::dict fp8_tile_slot_check() {
  namespace s = jax_flash_mla::sm90;
  using Element = cutlass::bfloat16_t;
  using KLayout = s::TileLayouts<Element, jax_flash_mla::kSparseHeadDim, s::kRowBlock,
                                 s::KeyTileOrder::kKeyGroups>::K;
  constexpr int kChunksPerKey = jax_flash_mla::kSparseHeadDim / s::kChunkElems;
  static std::vector<Element> buffer(s::kBlockN * jax_flash_mla::kSparseHeadDim + 1024);
  Element* stage = reinterpret_cast<Element*>(
      (reinterpret_cast<uintptr_t>(buffer.data()) + 1023) & ~uintptr_t{1023});
  auto tile = cute::make_tensor(cute::make_smem_ptr(stage), KLayout{});
  const auto address = [&](int key, int column) {
    return static_cast<uint32_t>(reinterpret_cast<const char*>(&tile(key, column)) -
                                 reinterpret_cast<const char*>(stage));
  };
  std::vector<bool> covered(s::kBlockN * kChunksPerKey, false);
  int mismatches = 0;
  const auto place = [&](int key, int column, uint32_t offset) {
    mismatches += offset != address(key, column);
    covered[key * kChunksPerKey + column / s::kChunkElems] = true;
  };
  for (int thread = 0; thread < s::kProducerThreads; ++thread) {
    const s::Fp8StoreSlots slots = s::fp8_store_slots<KLayout>(stage, thread);
    const int quarter = s::fp8_quarter_of(thread);
    for (int round = 0; round < s::kFp8Rounds; ++round) {
      const int key = s::fp8_key_of(thread, round);
      for (int block = 0; block < 8; ++block)
        for (int half = 0; half < 2; ++half)
          place(key, 64 * block + 16 * quarter + s::kChunkElems * half,
                s::fp8_nope_chunk_offset<KLayout>(slots, round, block, half));
      for (int i = 0; i < 2; ++i)
        place(key, s::kFp8NopeColumns + s::kChunkElems * (quarter + 4 * i),
              s::fp8_rope_chunk_offset<KLayout>(slots, round, i));
    }
  }
  nb::dict result;
  result["mismatches"] = mismatches;
  result["uncovered"] = static_cast<int>(std::count(covered.begin(), covered.end(), false));
  result["chunks"] = static_cast<int>(covered.size());
  return result;
}
#endif

using jax_flash_mla::DispatchInputs;
using jax_flash_mla::SplitKvKernel;

// The names jax_flash_mla.testing takes for the decode target's `kernel` attribute.
struct NamedKernel {
  const char* name;
  SplitKvKernel kernel;
};
constexpr NamedKernel kSplitKvKernels[] = {
    {"dispatch", SplitKvKernel::kDispatch},
    {"transposed", SplitKvKernel::kTransposed},
    {"lockstep", SplitKvKernel::kLockstep},
    {"seesaw_alone", SplitKvKernel::kSeesawAlone},
    {"seesaw_paired", SplitKvKernel::kSeesawPaired},
};

const char* kernel_name(SplitKvKernel kernel) {
  for (const NamedKernel& named : kSplitKvKernels)
    if (named.kernel == kernel) return named.name;
  return "unknown";
}

nb::dict split_kv_kernels() {
  nb::dict kernels;
  for (const NamedKernel& named : kSplitKvKernels)
    kernels[named.name] = static_cast<int32_t>(named.kernel);
  return kernels;
}

nb::dict metadata_fields() {
  namespace j = jax_flash_mla;
  nb::dict fields;
  fields["begin_req"] = static_cast<int>(j::kBeginReq);
  fields["begin_tile"] = static_cast<int>(j::kBeginTile);
  fields["end_req"] = static_cast<int>(j::kEndReq);
  fields["end_tile"] = static_cast<int>(j::kEndTile);
  fields["begin_split"] = static_cast<int>(j::kBeginSplit);
  return fields;
}

// Binds `rule` (DispatchInputs -> result) as a Python function of the inputs' fields, each a
// keyword argument of the same name, so that the CPU tests can walk the dispatch rules.
template <typename Rule>
void def_dispatch_rule(nb::module_& m, const char* name, Rule rule, const char* doc) {
  m.def(
      name,
      [rule](int rows_per_kv, int head_dim, int64_t batch, int max_blocks_per_seq,
             int page_block_size, int num_sm_parts, int num_heads_k, bool keys_fit_tma,
             bool query_fits_tma, int sms, int max_resident_pairs) {
        DispatchInputs in;
        in.rows_per_kv = rows_per_kv;
        in.head_dim = head_dim;
        in.batch = batch;
        in.max_blocks_per_seq = max_blocks_per_seq;
        in.page_block_size = page_block_size;
        in.num_sm_parts = num_sm_parts;
        in.num_heads_k = num_heads_k;
        in.keys_fit_tma = keys_fit_tma;
        in.query_fits_tma = query_fits_tma;
        in.sms = sms;
        in.max_resident_pairs = max_resident_pairs;
        return rule(in);
      },
      nb::kw_only(), nb::arg("rows_per_kv"), nb::arg("head_dim"), nb::arg("batch"),
      nb::arg("max_blocks_per_seq"), nb::arg("page_block_size"), nb::arg("num_sm_parts"),
      nb::arg("num_heads_k"), nb::arg("keys_fit_tma"), nb::arg("query_fits_tma"), nb::arg("sms"),
      nb::arg("max_resident_pairs"), doc);
}

}  // namespace

NB_MODULE(_jax_flash_mla, m) {
  m.def("registrations", []() {
    nb::dict cpu;
    cpu["jax_flash_mla_get_mla_metadata"] = as_capsule(jax_flash_mla_get_mla_metadata_cpu);
    cpu["jax_flash_mla_decode"] = as_capsule(jax_flash_mla_decode_cpu);
    cpu["jax_flash_mla_sparse_decode"] = as_capsule(jax_flash_mla_sparse_decode_cpu);
    cpu["jax_flash_mla_sparse_prefill"] = as_capsule(jax_flash_mla_sparse_prefill_cpu);
    nb::dict platforms;
    platforms["cpu"] = cpu;
#ifdef JAX_FLASH_MLA_WITH_CUDA
    nb::dict cuda;
    cuda["jax_flash_mla_get_mla_metadata"] = as_capsule(jax_flash_mla_get_mla_metadata_cuda);
    cuda["jax_flash_mla_decode"] = as_capsule(jax_flash_mla_decode_cuda);
    cuda["jax_flash_mla_sparse_decode"] = as_capsule(jax_flash_mla_sparse_decode_cuda);
    cuda["jax_flash_mla_sparse_prefill"] = as_capsule(jax_flash_mla_sparse_prefill_cuda);
    platforms["CUDA"] = cuda;
#endif
    return platforms;
  });
  // The jaxlib and XLA FFI API version of the headers the handlers were built against (see
  // CMakeLists.txt): a runtime older than these rejects the handlers.
  m.attr("BUILT_WITH_JAXLIB") = JAX_FLASH_MLA_BUILT_WITH_JAXLIB;
  m.attr("XLA_FFI_API_VERSION") = nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
#ifdef JAX_FLASH_MLA_WITH_CUDA
  m.def("fp8_tile_slot_check", &fp8_tile_slot_check,
        "Where the FP8 key producer stores each chunk of a tile against CuTe's swizzled layout "
        "(CUDA builds only): {'mismatches', 'uncovered', 'chunks'}.");
#endif
  m.def("built_with_cuda", []() {
#ifdef JAX_FLASH_MLA_WITH_CUDA
    return true;
#else
    return false;
#endif
  });

  // The tile schedule (common/tile_scheduler.h): its metadata rows, its tiles and the split
  // slots a call's scratch holds.
  m.attr("METADATA_INTS") = static_cast<int>(jax_flash_mla::kMetadataInts);
  m.attr("METADATA_FIELDS") = metadata_fields();
  m.attr("TOKENS_PER_TILE") = jax_flash_mla::kTokensPerTile;
  m.attr("FIXED_OVERHEAD_TILES") = jax_flash_mla::kFixedOverheadTiles;
  m.def(
      "max_split_slots",
      [](int64_t batch, int64_t num_sm_parts) {
        return jax_flash_mla::max_split_slots(batch, num_sm_parts);
      },
      nb::arg("batch"), nb::arg("num_sm_parts"),
      "Split slots (rows of o_accum / lse_accum) any schedule of this shape may use.");

  // The split-KV kernels and the rules that pick one (sm90/heuristics.h).
  m.attr("ROWS_PER_CTA") = jax_flash_mla::kRowsPerCta;
  m.attr("TRANSPOSED_MAX_ROWS") = jax_flash_mla::kTransposedMaxRows;
  m.attr("SEESAW_HEAD_DIM") = jax_flash_mla::kSeesawHeadDim;
  m.def("split_kv_kernels", &split_kv_kernels,
        "{name: value} of the decode target's `kernel` attribute; 'dispatch' lets the rules "
        "pick, any other forces that kernel.");
  def_dispatch_rule(
      m, "choose_split_kv_kernel",
      [](const DispatchInputs& in) {
        return kernel_name(jax_flash_mla::choose_split_kv_kernel(in));
      },
      "The name of the kernel the CUDA dispatch picks for a call of these inputs.");
  def_dispatch_rule(
      m, "runnable_split_kv_kernels",
      [](const DispatchInputs& in) {
        nb::list names;
        for (const NamedKernel& named : kSplitKvKernels)
          if (jax_flash_mla::split_kv_kernel_can_run(in, named.kernel)) names.append(named.name);
        return names;
      },
      "The names of the kernels that can run a call of these inputs, whatever their speed.");
}
