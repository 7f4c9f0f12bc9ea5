#!/usr/bin/env bash
# The whole GPU round trip in one device-tool call: by default the README's GPU block verbatim
# (build the package with its sm_90a kernels, the GPU tests, the smoke command), then a
# compute-sanitizer pass. The GPU machine has no network:
# the build uses its preinstalled scikit-build-core, nanobind and jax (no build isolation).
# Editable, so that python run from the repository root imports the built package.
#
#   bash benchmarks/run_on_device.sh [readme] [wheel] [build | prebuilt] [flashmla] [test] [quicktest] [main] [sanitize]
#                                    [profile] [devicetest] [detail] [timeline] [calls]
#                                    [graphbench] [multigpu] [graphs] [demo] [bench] [quickbench] [sparsebench]
#                                    [sparseprefillbench] [fp8bench]
#                                    [flashmla] [before] [probe] [ab] [abprebuilt] [smem] [pages] [traceprebuilt]
#                                    [trace] (last: it leaves the diagnostic build)
#                                    [pack] (last: one archive of every log)
#   (default: readme sanitize; STOP_ON_FAILURE=1 stops at the first step that fails)
# Logs go under $OUT (the device tool brings that folder back). bench and quickbench time
# FlashMLA beside ours: they need its sources in the git-ignored .flashmla/ (a copy of
# shared/flashmla, carried with the tree) and build it first if `build` did not start it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/jax_flash_mla_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
[ -d /usr/local/cuda/bin ] && export PATH="/usr/local/cuda/bin:$PATH"
export CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
# The GPU machine lacks nvidia-cutlass (the CUTLASS/CuTe headers): carried as a wheel in .whl/
# (see README), unpacked where CMake's Python finds it.
if ls .whl/nvidia_cutlass-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/nvidia_cutlass-*.whl && export PYTHONPATH=/tmp/site
fi
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(readme sanitize)
status=0

step_build() {
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee "$OUT/gpu.txt"
  # FlashMLA builds beside ours when a later step times it (they share the CPU cores).
  if wants_flashmla && [ -d .flashmla ]; then flashmla_start; fi
  # The trace option is cached by CMake: a release build names it off.
  python3 -m pip install --no-build-isolation --no-deps -v -e . \
    -Ccmake.define.JAX_FLASH_MLA_TRACE=OFF >"$OUT/build.log" 2>&1 \
    || { tail -60 "$OUT/build.log"; return 1; }
  grep -E "ptxas|spill|registers" "$OUT/build.log" | sort -u | tail -20
  python3 -c "import jax, jax_flash_mla as m; print(jax.__version__, jax.devices(), 'cuda handlers:', m.BUILT_WITH_CUDA)"
}

# Instead of build: the module built on this side (`pip wheel` here, its .so unpacked into
# jax_flash_mla/ and carried: the device tool copies ignored paths only when named), imported
# from the repository root as the steps run it; FlashMLA starts building as with build.
step_prebuilt() {
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee "$OUT/gpu.txt"
  if wants_flashmla && [ -d .flashmla ]; then flashmla_start; fi
  ls jax_flash_mla/_jax_flash_mla.*.so >/dev/null 2>&1 \
    || { echo "no jax_flash_mla/_jax_flash_mla.*.so: unpack a wheel built here and carry it"; return 1; }
  # Nothing is installed: the steps that run a script by its path import the package from here.
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  python3 -c "import jax, jax_flash_mla as m; print(jax.__version__, jax.devices(), 'cuda handlers:', m.BUILT_WITH_CUDA)"
}

# checked COMMAND...: COMMAND as the steps that check the kernels against the references run
# it (tests, calls and so ab). XLA does not autotune the references' matmuls: every case has
# its own shapes, so each would be autotuned once, on the host's clock (minutes for pytest -m
# gpu); the algorithm cuBLAS picks changes the float32 references by rounding only, far under
# the kernels' tolerances. A TMA tensor map the driver
# refuses stops the run (JAX_FLASH_MLA_EXPECT_TMA, paged_kv_tensor_map.h) instead of passing
# on, or being timed on, the cp.async path.
checked() {
  JAX_FLASH_MLA_EXPECT_TMA=1 XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" "$@"
}

# run_pytest LOG SECONDS LINES PYTEST_ARGS...: the suite under a time limit, its whole output
# in $OUT/LOG and its last LINES on the console (without pytest-benchmark's xdist warnings).
# Several pytest workers: the GPU cases are bound by XLA compilation on the host, not by the
# GPU. Each worker allocates GPU memory on demand instead of preallocating 75% of it. The
# slowest cases are listed (--durations), to see what remains.
run_pytest() {
  local log=$1 seconds=$2 lines=$3
  shift 3
  XLA_PYTHON_CLIENT_PREALLOCATE=false checked \
    timeout "$seconds" python3 -m pytest -q -p no:cacheprovider --durations=15 \
    -n "${TEST_WORKERS:-8}" "$@" tests 2>&1 | tee "$OUT/$log" | \
    grep -v -e PytestBenchmarkWarning -e "warner(" | tail -"$lines"
  return "${PIPESTATUS[0]}"
}

step_test() {
  run_pytest pytest_gpu.log "${TEST_TIMEOUT:-500}" 40 -m gpu
}

# The README's GPU block, verbatim: the first ```bash block under "## Building and testing on a
# GPU machine", run line by line as a user would paste it (bash -e: the first failing command
# fails the step), so that the README and this script cannot drift apart.
step_readme() {
  awk '/^## Building and testing on a GPU machine/ {section = 1; next}
       section && /^## / {exit}
       section && /^```bash/ {inside = 1; next}
       inside && /^```/ {exit}
       inside {print}' README.md >"$OUT/readme_gpu_block.sh"
  [ -s "$OUT/readme_gpu_block.sh" ] || { echo "README.md has no GPU block"; return 1; }
  cat "$OUT/readme_gpu_block.sh"
  timeout "${TEST_TIMEOUT:-900}" bash -e -x "$OUT/readme_gpu_block.sh" 2>&1 | \
    tee "$OUT/readme_gpu.log" | grep -v -e PytestBenchmarkWarning -e "warner(" | tail -30
  return "${PIPESTATUS[0]}"
}

# The wheel a user ships (README: "Building a wheel to ship"), built elsewhere by the isolated
# `pip wheel` against the oldest admitted jaxlib and carried in the ignored .wheelhouse/: installed
# alone (the editable build uninstalled, its import hook outranks PYTHONPATH) beside this
# machine's JAX, then the smoke command and the GPU tests (WHEEL_TESTS, a -k filter) run against
# it from outside the tree. `build` again after it.
step_wheel() {
  local wheel
  wheel="$(ls .wheelhouse/jax_flash_mla-*.whl 2>/dev/null | head -1)"
  [ -n "$wheel" ] || { echo "no wheel in .wheelhouse/"; return 1; }
  python3 -m pip uninstall -y -q jax-flash-mla
  rm -rf /tmp/wheel_site
  python3 -m pip install -q --no-deps --no-compile --target /tmp/wheel_site "$wheel" || return 1
  local tests="$PWD/tests"
  (cd /tmp && export PYTHONPATH="/tmp/wheel_site:${PYTHONPATH:-}" &&
    python3 -c "import jax, jaxlib.version, jax_flash_mla as m; print('jax', jax.__version__, \
'jaxlib', jaxlib.version.__version__, '| wheel built against jaxlib', m._registration.BUILT_WITH_JAXLIB, \
'| CUDA handlers', m.BUILT_WITH_CUDA)" &&
    python3 -m jax_flash_mla &&
    checked timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-8}" \
      -m gpu -k "${WHEEL_TESTS:-flashmla_grid}" "$tests") 2>&1 | tee "$OUT/wheel.log" | \
    grep -v -e PytestBenchmarkWarning -e "warner(" | tail -25
  return "${PIPESTATUS[0]}"
}

step_main() {
  python3 -m jax_flash_mla --batch 64 --seqlen 4096 --heads 16 2>&1 | tee "$OUT/main.log"
  return "${PIPESTATUS[0]}"
}

# Each buffer its own cudaMalloc (no XLA pool), so memcheck sees any out-of-bounds access.
step_sanitize() {
  XLA_PYTHON_CLIENT_ALLOCATOR=platform timeout "${SANITIZE_TIMEOUT:-300}" compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 -m benchmarks.sanitize_cases 2>&1 | tee "$OUT/memcheck.log" | tail -25
  return "${PIPESTATUS[0]}"
}

# The rest of the suite (vmap, cache, DeepSeek model, export, README) with the GPU as JAX's
# default device: the same tests CI runs on the CPU, now through the CUDA lowering.
step_devicetest() {
  run_pytest pytest_default_device.log "${TEST_TIMEOUT:-500}" 25 -m "not gpu"
}

# Fast correctness pass for kernel iterations: the FlashMLA shape grid only.
step_quicktest() {
  run_pytest pytest_quick.log "${TEST_TIMEOUT:-300}" 15 -m gpu -k "${QUICK_TESTS:-flashmla_grid}"
}

# DeepSeek's FlashMLA (shared/flashmla, carried as the git-ignored .flashmla/) for bench
# --flashmla, by the recipe of its README: setup.py build_ext --inplace with the CUTLASS wheel on
# PYTHONPATH. It builds in a writable copy, build/flashmla (the copy of shared/ has no write
# bits; build/ is ignored and stays between calls on a warm machine, so ninja rebuilds only
# what changed), in the background from `build` on when a later step needs it. FLASHMLA_JOBS:
# its parallel nvcc jobs (default 10 of the 16 cores).
FLASHMLA_DIR="$PWD/build/flashmla"
flashmla_state=none  # none, building (flashmla_pid), ready or failed

wants_flashmla() {
  local s
  for s in "${steps[@]}"; do
    case $s in flashmla|bench|quickbench|sparsebench|sparseprefillbench|fp8bench) return 0 ;; esac
  done
  return 1
}

flashmla_start() {
  [ "$flashmla_state" = none ] || return 0
  mkdir -p "$FLASHMLA_DIR" && cp -r -u --no-preserve=mode .flashmla/. "$FLASHMLA_DIR"/ \
    && chmod -R u+w "$FLASHMLA_DIR" || { flashmla_state=failed; return 1; }
  (cd "$FLASHMLA_DIR" && MAX_JOBS="${FLASHMLA_JOBS:-10}" python3 setup.py build_ext --inplace) \
    >"$OUT/flashmla_build.log" 2>&1 &
  flashmla_pid=$!
  flashmla_state=building
}

# Waits for the FlashMLA build (starting it if `build` did not), then puts it on PYTHONPATH so
# that `import flash_mla` works in the steps after it.
step_flashmla() {
  if [ ! -d .flashmla ]; then
    echo "no .flashmla/: copy shared/flashmla there (cp -r ../shared/flashmla .flashmla, git-ignored) and carry it with the tree"
    return 1
  fi
  flashmla_start
  if [ "$flashmla_state" = building ]; then
    if wait "$flashmla_pid"; then flashmla_state=ready; else flashmla_state=failed; fi
    export PYTHONPATH="$FLASHMLA_DIR${PYTHONPATH:+:$PYTHONPATH}"
  fi
  [ "$flashmla_state" = ready ] || { tail -30 "$OUT/flashmla_build.log"; return 1; }
  python3 -c "import torch, flash_mla; print('flash_mla', flash_mla.__version__, 'torch', torch.__version__)"
}

# bench_with_flashmla LOG SECONDS ARGS...: the benchmark with FlashMLA beside each row (same
# inputs, same method), its output in $OUT/LOG; SECONDS 0 for no time limit. Torch and JAX share
# the GPU, so JAX allocates on demand instead of preallocating 75% of its memory. The step runs
# step_flashmla first, outside any pipeline: it waits on the build job and exports PYTHONPATH,
# which a subshell could do neither of.
bench_with_flashmla() {
  local log=$1 seconds=$2
  shift 2
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "$seconds" \
    python3 -m jax_flash_mla bench --flashmla --out "$OUT" "$@" 2>&1 | tee "$OUT/$log"
  return "${PIPESTATUS[0]}"
}

step_quickbench() {
  step_flashmla || return 1
  bench_with_flashmla bench_quick.log "${BENCH_TIMEOUT:-400}" --quick | tail -40
  return "${PIPESTATUS[0]}"
}

# A same-run A/B of a change too wide for a patch (`ab` takes patches): an earlier tree, unpacked
# into the ignored .before/ (`git archive REV | tar -x -C .before`, carried), and this tree, each
# built into a folder of its own, timed by benchmarks/before_after.py on identical inputs, after,
# before, after, before (the clock's drift falls on both). BEFORE_ROWS: the rows (default: the
# benchmark's target rows). The editable install's import hook outranks PYTHONPATH, so this step
# uninstalls it: `build` again after it.
step_before() {
  [ -d .before ] || { echo "no .before/ tree"; return 1; }
  python3 -m pip uninstall -y -q jax-flash-mla
  rm -rf /tmp/before_site /tmp/after_site
  python3 -m pip install --no-build-isolation --no-deps --target /tmp/after_site . \
    >"$OUT/build_after.log" 2>&1 &
  local after_build=$!
  python3 -m pip install --no-build-isolation --no-deps --target /tmp/before_site ./.before \
    >"$OUT/build_before.log" 2>&1 || { tail -30 "$OUT/build_before.log"; return 1; }
  wait "$after_build" || { tail -30 "$OUT/build_after.log"; return 1; }
  local rows="${BEFORE_ROWS:-$(PYTHONPATH="/tmp/after_site:${PYTHONPATH:-}" python3 -P -c \
    "from jax_flash_mla.benchmark import TARGET_ROWS as R; print(' '.join(','.join(str(int(x)) for x in r) for r in R))")}"
  local script="$PWD/benchmarks/before_after.py" rc=0 round side
  for round in 1 2; do
    for side in after before; do
      echo "--- $side ($round)"
      (cd /tmp && PYTHONPATH="/tmp/${side}_site:${PYTHONPATH:-}" XLA_PYTHON_CLIENT_PREALLOCATE=false \
        timeout "${BENCH_TIMEOUT:-400}" python3 "$script" "$side" $rows) 2>&1 | \
        grep -v -e "^W0000" -e "^I0000" -e "^E0000" >>"$OUT/before_after.log" || rc=1
    done
  done
  python3 benchmarks/before_after.py --summary "$OUT/before_after.log" | tee "$OUT/before_after.txt"
  return $rc
}

# Where the package's extension module goes for this Python (a module built elsewhere is
# unpacked there).
extension_module() {
  echo "jax_flash_mla/_jax_flash_mla$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
}

# `ab` without building on this machine: modules built elsewhere (`pip wheel` of the tree and of
# the tree with each patch, each module's .so compressed by xz into the ignored .ab/ as NAME.so.xz,
# base.so.xz the tree's; benchmarks/build_ab_modules.sh does it; carry .ab), each unpacked in turn
# into jax_flash_mla/ and timed by call_timeline.py on CALL_ROWS as `ab` times its builds: base,
# every other module, base again, with the same logs for ab_verdict.py; base's module is left in
# jax_flash_mla/ for the steps after it. A build costs minutes of device time here and nothing
# there.
step_abprebuilt() {
  [ -f .ab/base.so.xz ] || { echo "no .ab/base.so.xz: run benchmarks/build_ab_modules.sh and carry .ab"; return 1; }
  local so module label out=$OUT rc=0
  so=$(extension_module)
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  for module in .ab/base.so.xz $(ls .ab/*.so.xz | grep -v '/base.so.xz$') .ab/base.so.xz; do
    label=$(basename "${module%.so.xz}")
    if [ "$label" = base ] && [ -d "$out/ab_base" ]; then label=base_again
    elif [ "$label" != base ]; then label="change_$label"; fi
    xz -d -c "$module" >"$so" || return 1
    mkdir -p "$out/ab_$label"
    echo "--- $label"
    OUT="$out/ab_$label" CALLS_TIMEOUT="${AB_CALL_TIMEOUT:-150}" step_calls | \
      grep -E "^b=|split_kv|check" || rc=1
  done
  python3 benchmarks/ab_verdict.py "$out" | tee "$out/ab_verdict.txt"
  return $rc
}

# Sparse decode (DeepSeek-V3.2) beside FlashMLA's sparse FP8 decode: --quick for DESIGN.md's
# eight rows, SPARSE_ARGS for more (e.g. "" for the whole grid).
step_sparsebench() {
  step_flashmla || return 1
  bench_with_flashmla bench_sparse.log "${BENCH_TIMEOUT:-400}" --sparse ${SPARSE_ARGS---quick} | tail -40
  return "${PIPESTATUS[0]}"
}

# Sparse prefill (DeepSeek-V3.2 flash_mla_sparse_fwd) beside FlashMLA's: --quick for two of its
# performance rows, SPARSE_PREFILL_ARGS for more (e.g. "" for all six).
step_sparseprefillbench() {
  step_flashmla || return 1
  bench_with_flashmla bench_sparse_prefill.log "${BENCH_TIMEOUT:-400}" --sparse-prefill ${SPARSE_PREFILL_ARGS---quick} | tail -40
  return "${PIPESTATUS[0]}"
}

# Dense decode over the FP8 cache beside our bf16 and FlashMLA's: --quick for three rows,
# FP8_ARGS for more (e.g. "" for all of them).
step_fp8bench() {
  step_flashmla || return 1
  bench_with_flashmla bench_fp8.log "${BENCH_TIMEOUT:-400}" --fp8-cache ${FP8_ARGS---quick} | tail -30
  return "${PIPESTATUS[0]}"
}

step_bench() {
  step_flashmla || return 1
  bench_with_flashmla bench.log "${BENCH_TIMEOUT:-0}" | tail -60
  return "${PIPESTATUS[0]}"
}

# Device-side kernel durations from Nsight Compute (clocks left as they are).
step_profile() {
  timeout 240 ncu --clock-control none --metrics gpu__time_duration.sum \
    -k regex:"split_kv|combine|tile_schedule" python3 benchmarks/profile_kernels.py \
    >"$OUT/ncu.log" 2>&1
  local rc=$?
  grep -E "profiled|split_kv|combine|tile_schedule|gpu__time_duration" "$OUT/ncu.log" | \
    sed -e 's/(const jax_flash_mla::DecodeParams)//' | cut -c1-120 | tail -60
  return $rc
}

# Where the split-KV kernel's time goes, for one memory-bound and one compute-bound row:
# throughput of DRAM, shared memory and the tensor pipe, and the warps' stall reasons.
step_detail() {
  timeout 300 ncu --clock-control none -k regex:split_kv --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    --section WarpStateStats --section Occupancy \
    python3 benchmarks/profile_kernels.py 64,16,4096 >"$OUT/ncu_detail_h16.log" 2>&1
  timeout 300 ncu --clock-control none -k regex:split_kv --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
    python3 benchmarks/profile_kernels.py 64,128,4096 >"$OUT/ncu_detail_h128.log" 2>&1
  grep -E "Throughput|Pipe|Stall|Busy|Bandwidth|Duration|Warp Cycles|Issued" "$OUT"/ncu_detail_h16.log | head -40
}

# Page sizes side by side: one split-KV launch
# of each row of PAGE_ROWS (b,h_q,s_k,page; default page 16 and 64 at b=64 h=16 s_k=4096) under
# Nsight Compute, its throughput, memory and warp-state sections, one log a row.
step_pages() {
  local row rc=0
  for row in ${PAGE_ROWS:-64,16,4096,16 64,16,4096,64}; do
    timeout 300 ncu --clock-control none -k regex:split_kv --launch-skip 1 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
      --section SchedulerStats python3 benchmarks/profile_kernels.py "$row" \
      >"$OUT/ncu_page_${row//,/_}.log" 2>&1 || rc=1
    echo "--- $row"
    grep -E "Duration|Memory Throughput|DRAM Throughput|L2 Cache Throughput|L1/TEX Hit|L2 Hit|Stall|Issued Warp|No Eligible" \
      "$OUT/ncu_page_${row//,/_}.log" | cut -c1-120 | head -24
  done
  return $rc
}

# Is shared memory what bounds the h_q = 128 pair? One launch of the split kernel at
# SMEM_ROW (default b=64 h=128): the memory sections with their tables (shared-memory
# wavefronts, bank conflicts, the busiest memory pipe), and the pipes' utilization. Apply a
# branch's patch first to profile it instead.
step_smem() {
  timeout 300 ncu --clock-control none -k regex:split_kv --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Chart \
    --section MemoryWorkloadAnalysis_Tables --section ComputeWorkloadAnalysis --print-details all \
    python3 benchmarks/profile_kernels.py "${SMEM_ROW:-64,128,4096}" >"$OUT/ncu_smem.log" 2>&1
  local rc=$?
  grep -i -E "shared|bank|mem busy|max bandwidth|mem pipes|pipe util|duration|throughput" \
    "$OUT/ncu_smem.log" | cut -c1-150 | head -60
  return $rc
}

# What one call costs inside the benchmark's jitted function of back-to-back calls (b = 1 and
# b = 64): every kernel XLA runs, with nsys (start times show gaps) when the machine has it,
# else ncu durations (no cache flush).
step_timeline() {
  local rows="${TIMELINE_ROWS:-1,16,4096 64,16,4096}"
  if command -v nsys >/dev/null; then
    timeout 240 nsys profile -t cuda -o "$OUT/timeline" -f true \
      python3 benchmarks/profile_kernels.py --calls 6 $rows >"$OUT/nsys.log" 2>&1
    nsys stats -r cuda_gpu_trace -f csv -o "$OUT/gpu_trace" "$OUT/timeline.nsys-rep" >/dev/null 2>&1
    rm -f "$OUT"/timeline.sqlite
    tail -45 "$OUT"/gpu_trace*.csv | cut -c1-200
  else
    timeout 240 ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum \
      python3 benchmarks/profile_kernels.py --calls 3 $rows >"$OUT/ncu_all.log" 2>&1
    grep -E "profiled|^  [a-zA-Z_]|gpu__time_duration" "$OUT/ncu_all.log" | cut -c1-110 | tail -70
  fi
}

# What one call costs on the GPU inside the benchmark's jitted function, from the JAX
# profiler's kernel timestamps (no nsys needed): kernel durations, busy time, idle gaps, each
# row checked against the reference (`checked`: the timed function has no matmul). CALL_KERNEL:
# one split-KV kernel forced for every row (transposed, lockstep, seesaw_alone, seesaw_paired).
step_calls() {
  checked timeout "${CALLS_TIMEOUT:-300}" python3 benchmarks/call_timeline.py \
    ${CALL_KERNEL:+--kernel "$CALL_KERNEL"} ${CALL_ROWS:-} 2>&1 | tee "$OUT/call_timeline.log" | \
    grep -v -e "^W0000\|^I0000\|^E0000"
  return "${PIPESTATUS[0]}"
}

# CUDA graphs: the DeepSeek-style step with XLA command buffers on and off.
step_graphs() {
  python3 benchmarks/command_buffer_check.py 2>&1 | tee "$OUT/graphs.log" | tail -5
  return "${PIPESTATUS[0]}"
}

step_demo() {
  python3 -m jax_flash_mla demo --batch 64 --tokens 64 --layers 8 --heads 16 2>&1 | tee "$OUT/demo.log" | tail -8
  return "${PIPESTATUS[0]}"
}

# Does XLA's command buffer (CUDA graph) around the calls change the figure? b = 1 and b = 64
# rows with command buffers off, with XLA's defaults, and with no minimum graph size.
step_graphbench() {
  for flags in "--xla_gpu_enable_command_buffer=" "" "--xla_gpu_graph_min_graph_size=1"; do
    for b in 1 64; do
      echo "--- XLA_FLAGS='$flags' b=$b"
      XLA_FLAGS="$flags" timeout 120 python3 -m jax_flash_mla bench --quick --batch $b \
        --out "$OUT/graphbench" 2>&1 | grep -E "^ +[0-9]+ +[0-9]+ "
    done
  done | tee "$OUT/graphbench.log"
}

# Multi-GPU (issue 5): the b=64 h_q=128 rows with heads split over every GPU next to one GPU
# running one shard's heads (bench --tp), then the demo's decode loop with heads split over
# every GPU and with one engine per GPU, each first checked against one GPU.
step_multigpu() {
  nvidia-smi -L
  timeout 200 python3 -m jax_flash_mla bench --quick --batch 64 --tp --out "$OUT/tp" 2>&1 | \
    tee "$OUT/bench_tp.log" | tail -12
  for layout in tp dp; do
    timeout 240 python3 -m jax_flash_mla demo --parallel $layout --check --batch 64 \
      --tokens 64 --layers 8 --heads 128 --max-prompt 256 2>&1 | tee "$OUT/demo_$layout.log" | \
      grep -v "^decode \["
  done
}

# Where a tile's time goes (kernel_trace.h): rebuilds the kernels with their step timestamps,
# runs one call per row and summarizes each. The build it leaves is the diagnostic one: put
# this step last, or `build` again after it.
step_trace() {
  python3 -m pip install --no-build-isolation --no-deps -v -e . \
    -Ccmake.define.JAX_FLASH_MLA_TRACE=ON >"$OUT/build_trace.log" 2>&1 \
    || { tail -40 "$OUT/build_trace.log"; return 1; }
  trace_rows
}

# The trace rows (TRACE_ROWS) with whichever diagnostic module python imports. The device tool
# brings back 8 files at most, named without commas: the raw logs as one archive, the
# summaries as one file.
trace_rows() {
  local row logs=/tmp/trace_logs
  rm -rf "$logs" && mkdir -p "$logs"
  for row in ${TRACE_ROWS:-128,128,4096 64,64,4096 64,16,4096 1,128,4096}; do
    timeout 120 python3 benchmarks/trace_tiles.py run "$row" >"$logs/trace_${row//,/_}.log" 2>&1
    python3 benchmarks/trace_tiles.py summarize "$logs/trace_${row//,/_}.log" | tee -a "$OUT/trace_summary.txt"
  done
  tar -czf "$OUT/trace_logs.tar.gz" -C "$logs" .
}

# `trace` without building here: the diagnostic module built on the developer's machine
# (`TRACE=1 benchmarks/build_ab_modules.sh` writes .ab_trace/trace.so.xz; carry .ab_trace),
# unpacked into jax_flash_mla/ for the trace rows, then the module that was there put back.
step_traceprebuilt() {
  [ -f .ab_trace/trace.so.xz ] || { echo "no .ab_trace/trace.so.xz: TRACE=1 benchmarks/build_ab_modules.sh, carry .ab_trace"; return 1; }
  local so saved=/tmp/module_before_trace.so
  so=$(extension_module)
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  rm -f "$saved"
  [ -f "$so" ] && cp "$so" "$saved"
  xz -d -c .ab_trace/trace.so.xz >"$so" || return 1
  trace_rows
  if [ -f "$saved" ]; then cp "$saved" "$so"; fi
}

# The copy paths' own ceiling (benchmarks/tma_probe.cu): key tiles streamed into a 2-stage
# ring with no compute, by TMA (boxes of 8 or 24 KiB, alone or multicast over CTA pairs),
# cp.async, or both; over a page pool in L2 and one in HBM. Standalone: needs nvcc, not the
# package build.
step_probe() {
  local cutlass_inc cuda_bin
  cutlass_inc=$(python3 -c "import importlib.util, os; print(os.path.join(importlib.util.find_spec('cutlass_library').submodule_search_locations[0], 'source', 'include'))") || return 1
  cuda_bin=$(dirname "$(command -v nvcc)")
  nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -Icpp \
    -isystem "$cutlass_inc" -isystem "$cuda_bin/../include/cccl" \
    -isystem "$cuda_bin/../targets/x86_64-linux/include/cccl" benchmarks/tma_probe.cu \
    -o /tmp/tma_probe >"$OUT/probe_build.log" 2>&1 || { tail -30 "$OUT/probe_build.log"; return 1; }
  timeout 120 /tmp/tma_probe 2>&1 | tee "$OUT/tma_probe.log"
  return "${PIPESTATUS[0]}"
}

# Changes against the tree on one machine (machines differ by up to 6%, more than most
# changes): kernel times of CALL_ROWS (call_timeline.py, which also checks each row against the
# reference) for the tree, with each patch of AB_PATCH applied in turn (patch files inside the
# tree, space-separated, e.g. `git diff main...exp/x > x.patch`), and for the tree again; each
# build incremental after the first. Logs in ab_base, ab_change (one patch) or ab_change_NAME
# (several: NAME the patch file's stem), ab_base_again; read them with ab_verdict.py. The tree
# is left as it was.
step_ab() {
  local patches=(${AB_PATCH:?AB_PATCH must name patch files in the tree}) out=$OUT patch i rc=0
  # One run per label; files[i] is the patch applied for labels[i] (none for the base runs).
  local labels=(base) files=("")
  for patch in "${patches[@]}"; do
    if [ ${#patches[@]} -eq 1 ]; then labels+=(change); else
      labels+=("change_$(basename "${patch%.patch}")"); fi
    files+=("$patch")
  done
  labels+=(base_again) files+=("")
  for i in "${!labels[@]}"; do
    patch=${files[$i]}
    if [ -n "$patch" ]; then patch -p1 --quiet <"$patch" || return 1; fi
    mkdir -p "$out/ab_${labels[$i]}"
    echo "--- ${labels[$i]}"
    if OUT="$out/ab_${labels[$i]}" step_build >/dev/null; then
      OUT="$out/ab_${labels[$i]}" CALLS_TIMEOUT="${AB_CALL_TIMEOUT:-150}" step_calls | \
        grep -E "^b=|split_kv|check" || rc=1
    else
      tail -30 "$out/ab_${labels[$i]}/build.log"; rc=1
    fi
    if [ -n "$patch" ]; then patch -R -p1 --quiet <"$patch" || return 1; fi
  done
  return $rc
}

# Every file under $OUT into one archive, $OUT/logs.tar.gz (the files removed): the device tool
# brings back at most 8 files, and an A/B alone writes 12. Run it last, after anything that
# reads the logs on the machine (ab_verdict.py); `tar -xzf logs.tar.gz` restores the tree.
step_pack() {
  local archive
  archive="$(mktemp /tmp/jax_flash_mla_logs.XXXXXX.tar.gz)"
  tar -C "$OUT" -czf "$archive" . && find "$OUT" -mindepth 1 -delete && chmod 644 "$archive" &&
    mv "$archive" "$OUT/logs.tar.gz"
}

# STOP_ON_FAILURE=1: no step runs after a failed one, so that a kernel change that hangs costs
# one step's timeout, not every later step's (the call's whole limit).
for s in "${steps[@]}"; do
  echo "=== $s"
  if ! "step_$s"; then
    echo "=== $s FAILED"
    status=1
    if [ "$s" = build ] || [ -n "${STOP_ON_FAILURE:-}" ]; then break; fi
  fi
done
exit $status
