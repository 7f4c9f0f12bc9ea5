#!/usr/bin/env bash
# The modules `run_on_device.sh abprebuilt` times, built here instead of on the GPU machine
# (whose minutes are scarce): the committed tree (HEAD) and HEAD with each named patch, each as
# `pip wheel` builds it for Python 3.12 (the GPU machine's), its extension module compressed into
# the ignored .ab/ as base.so.xz and PATCHNAME.so.xz (xz: ~1 MB a module, where the .so is ~11 MB
# and the device tool carries 64 MiB in all). Each build runs in a worktree of its own, a
# detached checkout of HEAD, so the working tree is left alone.
#
#   PYTHON=/path/to/python3.12 bash benchmarks/build_ab_modules.sh benchmarks/patches/NAME.patch ...
#
# PYTHON: a Python 3.12 whose environment has the build's requirements (README: scikit-build-core,
# nanobind, jax, nvidia-cutlass); nvcc on PATH. TRACE=1: also HEAD's diagnostic build
# (JAX_FLASH_MLA_TRACE=ON) as .ab_trace/trace.so.xz, for `run_on_device.sh traceprebuilt`.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
root=$PWD
work=$(mktemp -d /tmp/ab_modules.XXXXXX)
trap 'git -C "$root" worktree remove --force "$work/tree" 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p .ab
rm -f .ab/*.so.xz
for patch in base "$@"; do
  name=base
  [ "$patch" = base ] || name=$(basename "${patch%.patch}")
  git worktree remove --force "$work/tree" 2>/dev/null || true
  git worktree add -q --detach "$work/tree" HEAD
  [ "$patch" = base ] || patch -d "$work/tree" -p1 --quiet <"$patch"
  "$python" -m pip wheel -q --no-build-isolation --no-deps -w "$work/wheel_$name" \
    -Cbuild-dir="$work/build_$name" -Ccmake.define.JAX_FLASH_MLA_TRACE=OFF "$work/tree" \
    >"$work/build_$name.log" 2>&1 || { tail -30 "$work/build_$name.log"; exit 1; }
  unzip -q -o -j "$work"/wheel_"$name"/*.whl 'jax_flash_mla/_jax_flash_mla.*.so' -d "$work/so_$name"
  xz -T0 -c "$work"/so_"$name"/*.so >".ab/$name.so.xz"
  echo "$name: .ab/$name.so.xz ($(stat -c %s ".ab/$name.so.xz") bytes)"
done
if [ -n "${TRACE:-}" ]; then
  git worktree remove --force "$work/tree" 2>/dev/null || true
  git worktree add -q --detach "$work/tree" HEAD
  "$python" -m pip wheel -q --no-build-isolation --no-deps -w "$work/wheel_trace" \
    -Cbuild-dir="$work/build_trace" -Ccmake.define.JAX_FLASH_MLA_TRACE=ON "$work/tree" \
    >"$work/build_trace.log" 2>&1 || { tail -30 "$work/build_trace.log"; exit 1; }
  unzip -q -o -j "$work"/wheel_trace/*.whl 'jax_flash_mla/_jax_flash_mla.*.so' -d "$work/so_trace"
  mkdir -p .ab_trace
  xz -T0 -c "$work"/so_trace/*.so >.ab_trace/trace.so.xz
  echo "trace: .ab_trace/trace.so.xz ($(stat -c %s .ab_trace/trace.so.xz) bytes)"
fi
