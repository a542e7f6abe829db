#!/usr/bin/env bash
# Downloads into ./.whl the wheels the GPU machine lacks, so that bench/gpu_run.py can install them
# there (it has no internet). Run it here, on a machine with PyPI access, from anywhere in the repo:
#
#     bash bench/fetch_wheels.sh
#
# Then name `.whl` in the device tool's `carry` (docs/gpu-machine.md). The GPU image is CPython 3.12 on
# x86-64 with torch 2.11.0+cu130, nvidia-nvshmem-cu13 3.4.5, cuda-bindings/cuda-core/cuda-pathfinder,
# numpy, cython, pytest; it lacks the packages below. They are installed there with --no-deps,
# so each must be a single wheel whose own needs the image already meets: this script prints every
# wheel's Requires-Dist and flags a requirement that is neither carried nor in the image.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# name==version, one per line. Versions are pinned so that a GPU run is reproducible.
#  - nvshmem4py-cu13: the host-side init (nvshmem.core) that symcomm.runtime uses (design.md section 4).
#  - cuda-python: only a metadata package (it holds no modules): nvshmem4py-cu13 declares
#    `cuda-python>=13,<14`, and nothing imports it, so it is carried for `pip check`'s sake alone.
#    13.0.3 is the floor torch 2.11 sets for cuda-bindings (>=13.0.3); its own pins (cuda-bindings
#    ~=13.0.3, cuda-pathfinder ~=1.1) may not match the image's versions, which gpu_run.py records.
#    Harmless either way: it is installed with --no-deps and no code checks it.
#  - expecttest: in pyproject's `test` extra; torch.testing._internal.common_utils imports it
#    (torch.library.opcheck itself does not). 8 KiB, so carried whether or not a test needs it yet.
#  - nvidia-cutlass: a build requirement, read only for its C++ headers (the fused GEMM's core); its
#    Python requirements (scipy, networkx, ...) are never imported, so they are not checked below.
WHEELS=(
  nvshmem4py-cu13==0.4.1
  cuda-python==13.0.3
  expecttest==0.3.0
  nvidia-cutlass==4.2.0.0
)
HEADERS_ONLY="nvidia-cutlass"
# What the GPU image already has (docs/gpu-machine.md; KINDS.md's package list), lower-case.
IMAGE_HAS="torch nvidia-nvshmem-cu13 cuda-bindings cuda-core cuda-pathfinder cuda-toolkit numpy cython pytest"

DEST=.whl
mkdir -p "$DEST"
# Keep .whl out of git (and so out of what travels, except through `carry`).
exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || echo .git/info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

# One version of each package only: two versions of one package stop the whole install there.
rm -f "$DEST"/*.whl

# pip matches manylinux_2_N exactly, so name the usual ones; pure-Python wheels match any of them.
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done

for spec in "${WHEELS[@]}"; do
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platform_args[@]}" -d "$DEST" "$spec"
done

echo "Wheels in $DEST:"
total=0
for whl in "$DEST"/*.whl; do
  size=$(stat -c %s "$whl")
  total=$((total + size))
  awk -v n="$(basename "$whl")" -v s="$size" 'BEGIN { printf "  %-60s %7.2f MiB\n", n, s / 1048576 }'
done
awk -v s="$total" 'BEGIN { printf "  total %.2f MiB (what travels, .whl included, must stay under 64 MiB)\n", s / 1048576 }'

# Each wheel's requirements (extras skipped), checked against what is carried or already there.
python3 - "$DEST" "$IMAGE_HAS" "$HEADERS_ONLY" <<'EOF'
import re, sys, zipfile
from pathlib import Path

dest, image, headers_only = Path(sys.argv[1]), set(sys.argv[2].split()), set(sys.argv[3].split())
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
metas = {}
for whl in sorted(dest.glob("*.whl")):
    with zipfile.ZipFile(whl) as z:
        text = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    name = norm(re.search(r"^Name: (.+)$", text, re.M).group(1))
    metas[name] = [r for r in re.findall(r"^Requires-Dist: (.+)$", text, re.M) if "extra ==" not in r]
missing = []
for name, reqs in metas.items():
    if name in headers_only:
        print(f"{name}: headers only, requirements not needed")
        continue
    print(f"{name} requires:")
    for req in reqs:
        dep = norm(re.match(r"[A-Za-z0-9_.\-]+", req).group(0))
        where = "carried" if dep in metas else "in the image" if dep in image else "MISSING"
        print(f"    {req:40s} {where}")
        if where == "MISSING":
            missing.append(f"{name} -> {req}")
if missing:
    sys.exit("requirements neither carried nor in the GPU image:\n  " + "\n  ".join(missing))
EOF
