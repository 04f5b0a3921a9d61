#!/usr/bin/env bash
# Builds the kernel probe (probe.c) from two versions of the kernel headers, to time a change
# against its base in one process:
#   cython_kernels/probes/probe.sh OUT [HEADERS_A [HEADERS_B]]
# HEADERS_A and HEADERS_B default to this checkout's cython_kernels/ (a base is often a
# `git worktree add /tmp/base <rev>`'s cython_kernels/). Extra compiler flags for build b only:
# PROBE_B_FLAGS (for instance -DHM_VNNI_PREFETCH=8192). Flags as setup.py builds the extension.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: probe.sh OUT [HEADERS_A [HEADERS_B]]}"
a="${2:-$here/..}"
b="${3:-$a}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
flags=(-O3 -fopenmp -fPIC -Wno-unused-function -falign-loops=64)
gcc "${flags[@]}" -I"$a" -DPROBE_TAG=a -c "$here/probe_build.c" -o "$tmp/a.o"
# shellcheck disable=SC2086
gcc "${flags[@]}" -I"$b" -DPROBE_TAG=b ${PROBE_B_FLAGS:-} -c "$here/probe_build.c" -o "$tmp/b.o"
gcc -O2 -fopenmp -Wno-unused-function -I"$a" "$here/probe.c" "$tmp/a.o" "$tmp/b.o" -o "$out" -lm
