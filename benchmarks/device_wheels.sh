#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach PyPI: the Python packages benchmarks/gpu_check.sh
# needs that a typical CUDA image lacks, downloaded HERE (where pip works) for THAT machine's Python,
# at the versions installed in this repository's .venv (the versions the tests ran with).
#
#   bash benchmarks/device_wheels.sh                  # -> .whl/ for CPython 3.12 on x86-64 Linux
#   bash benchmarks/device_wheels.sh --python 3.11 --dest /tmp/whl
#   bash benchmarks/device_wheels.sh --print          # the pinned requirements only, no download
#
# Then, on the GPU machine, with the folder carried into the repository root (where this script writes it):
#   bash benchmarks/gpu_check.sh --wheels .whl
# (gpu_check.sh installs them with `pip install --no-index --no-deps --target` into a temporary
# folder; nothing is installed into that machine's Python.) The packages: the Adversarial Robustness
# Toolbox (the AutoAttack-style ensemble), multiprocess (imported by ART's AutoAttack, undeclared),
# dill (multiprocess's one dependency) and six (ART's; tiny, most images have it). Everything else
# gpu_check needs (torch, torchvision, numpy, pandas, scikit-learn, scipy, tqdm, pyyaml) is expected
# in the image; gpu_check.sh checks and names what is missing (exit 3) before it runs anything.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=benchmarks/_common.sh
source "$ROOT/benchmarks/_common.sh"
PYVER="3.12"
DEST="$ROOT/.whl"
PRINT=0
PACKAGES=(adversarial-robustness-toolbox multiprocess dill six)
while [[ $# -gt 0 ]]; do
    case "$1" in
        --python) [[ $# -ge 2 && "$2" =~ ^3\.[0-9]+$ ]] || { echo "device_wheels: --python needs a version like 3.12" >&2; exit 2; }
                  PYVER="$2"; shift ;;
        --dest) [[ $# -ge 2 ]] || { echo "device_wheels: --dest needs a folder" >&2; exit 2; }; DEST="$2"; shift ;;
        --print) PRINT=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "device_wheels: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

pick_python "$ROOT"

# the installed versions, so the GPU machine runs what the tests ran
mapfile -t PINS < <("$PY" - "${PACKAGES[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        sys.exit(f"device_wheels: {name} is not installed in this Python; `make test` installs it")
EOF
)
[[ ${#PINS[@]} -eq ${#PACKAGES[@]} ]] || exit 1
if [[ $PRINT -eq 1 ]]; then printf '%s\n' "${PINS[@]}"; exit 0; fi

mkdir -p "$DEST"
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
    PLATFORMS+=(--platform "$tag")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "${PINS[@]}"
echo "device_wheels: ${PINS[*]} for CPython $PYVER in $DEST:" >&2
ls -l "$DEST"/*.whl >&2
# the folder as gpu_check.sh, run from the repository root, takes it: relative to the root when inside it
SHOWN="$(cd "$DEST" && pwd -P)"
ROOT_P="$(cd "$ROOT" && pwd -P)"
if [[ "$SHOWN" == "$ROOT_P"/* ]]; then SHOWN="${SHOWN#"$ROOT_P"/}"; fi
echo "device_wheels: on the GPU machine: bash benchmarks/gpu_check.sh --wheels $SHOWN" >&2
