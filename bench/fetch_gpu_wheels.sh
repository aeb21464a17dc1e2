#!/usr/bin/env bash
# Download, here (a machine with PyPI), the wheels that bench/gpu_check.sh installs on the bare GPU
# machine (Python 3.12, x86_64, no network): the packages its image lacks. Run from anywhere:
#
#     bash bench/fetch_gpu_wheels.sh          # -> <repo>/.whl/*.whl (gitignored)
#
# The GPU image already holds (so they are NOT fetched): accelerate aiohttp filelock fsspec huggingface-hub
# numpy pandas pyarrow requests tqdm xxhash pyyaml packaging scipy opt-einsum psutil (and torch,
# transformers, peft, pytest, triton).
#
# Versions, chosen to fit each other and that image:
#   datasets 5.2.0      needs dill <0.4.2, multiprocess <0.70.20, huggingface-hub >=1.31,<3 (image: 1.33),
#                       pyarrow >=24, fsspec <=2026.9.0 (the image's are printed by gpu_check.sh step 1)
#   dill 0.4.1          (datasets' range; multiprocess 0.70.19 wants >=0.4.1)
#   multiprocess 0.70.19 (pure Python; a py312 wheel)
#   opacus 1.6.0        needs numpy, scipy, opt-einsum, torch >=2.6 (all in the image)
# datasets 5.2.0 is also what the CPU venv runs. If the image's pyarrow turns out older than 24,
# datasets 5.0.1 (pyarrow >=21, huggingface-hub <2) is the fallback: DATASETS_VERSION=5.0.1.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${WHEEL_DIR:-$REPO/.whl}"
PYTHON="${PYTHON:-python3}"
PACKAGES=(
    "datasets==${DATASETS_VERSION:-5.2.0}"
    "dill==0.4.1"
    "multiprocess==0.70.19"
    "opacus==1.6.0"
)

mkdir -p "$DEST"
for spec in "${PACKAGES[@]}"; do
    name="${spec%%==*}"
    # keep one version of each package: two wheels of one name stop the whole install there
    find "$DEST" -maxdepth 1 -iname "${name//-/_}-*.whl" ! -iname "${name//-/_}-${spec##*==}-*" -print -delete
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$DEST" "$spec" 2>&1 | grep -v "is neither a file nor a directory" || true
    ls "$DEST"/"${name//-/_}"-"${spec##*==}"-*.whl >/dev/null 2>&1 || { echo "fetch_gpu_wheels: $spec not downloaded" >&2; exit 1; }
done

echo "wheels in $DEST:"
total=0
for f in "$DEST"/*.whl; do
    size=$(stat -c %s "$f"); total=$((total + size))
    printf '  %-60s %8d bytes\n' "$(basename "$f")" "$size"
    # requirements (extras left out), for checking them against the image's list above
    unzip -p "$f" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/      /' || true
done
echo "total: $total bytes ($((total / 1024)) KiB)"
if [ "$total" -gt $((20 * 1024 * 1024)) ]; then
    echo "fetch_gpu_wheels: more than 20 MB of wheels" >&2
    exit 1
fi
