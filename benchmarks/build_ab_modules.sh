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
# build_module NAME PATCH|- TRACE DEST: HEAD (with PATCH applied unless -) built as `pip wheel`
# does, JAX_FLASH_MLA_TRACE=TRACE, its extension module compressed into DEST.
build_module() {
  local name=$1 patch=$2 trace=$3 dest=$4
  git worktree remove --force "$work/tree" 2>/dev/null || true
  git worktree add -q --detach "$work/tree" HEAD
  [ "$patch" = - ] || patch -d "$work/tree" -p1 --quiet <"$patch"
  "$python" -m pip wheel -q --no-build-isolation --no-deps -w "$work/wheel_$name" \
    -Cbuild-dir="$work/build_$name" -Ccmake.define.JAX_FLASH_MLA_TRACE="$trace" "$work/tree" \
    >"$work/build_$name.log" 2>&1 || { tail -30 "$work/build_$name.log"; exit 1; }
  unzip -q -o -j "$work"/wheel_"$name"/*.whl 'jax_flash_mla/_jax_flash_mla.*.so' -d "$work/so_$name"
  mkdir -p "$(dirname "$dest")"
  xz -T0 -c "$work"/so_"$name"/*.so >"$dest"
  echo "$name: $dest ($(stat -c %s "$dest") bytes)"
}
mkdir -p .ab
rm -f .ab/*.so.xz
build_module base - OFF .ab/base.so.xz
for patch in "$@"; do
  name=$(basename "${patch%.patch}")
  build_module "$name" "$patch" OFF ".ab/$name.so.xz"
done
if [ -n "${TRACE:-}" ]; then build_module trace - ON .ab_trace/trace.so.xz; fi
