#!/usr/bin/env bash
# Set up anisodiff from this checkout: a pinned PyTorch (CPU wheel by default), the build tools,
# then the extension itself (compiled against that torch, never against a freshly pulled one).
#
#   bash scripts/install.sh                 # torch CPU wheel + anisodiff[viz]
#   bash scripts/install.sh --dev           # + test/benchmark tools (pytest, hypothesis, triton)
#   bash scripts/install.sh --torch cu130   # CUDA 13.0 torch wheel instead of the CPU one
#
# An already-installed torch is kept (e.g. a GPU image's CUDA build). Use a virtual environment
# where the system Python refuses pip installs (PEP 668). Environment: PYTHON (default python3),
# ANISODIFF_TORCH_VERSION (default 2.13.0).
set -euo pipefail

PY=${PYTHON:-python3}
TORCH_VERSION=${ANISODIFF_TORCH_VERSION:-2.13.0}
VARIANT=cpu
EXTRAS=viz
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) EXTRAS=dev ;;
    --torch) VARIANT=${2:?--torch needs cpu or a CUDA tag such as cu130}; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "$0")/.."
pip() { "$PY" -m pip "$@"; }
die() { echo "install.sh: $*" >&2; exit 1; }

"$PY" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null ||
  die "anisodiff needs Python >= 3.10 ($PY is $("$PY" -V 2>&1))"
command -v "${CXX:-c++}" >/dev/null 2>&1 ||
  die "no C++ compiler (${CXX:-c++}) found; install one, e.g. apt-get install g++"

reachable() {  # no curl needed
  "$PY" - "$1" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=10)
EOF
}

if "$PY" -c "import torch" 2>/dev/null; then
  echo "install.sh: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  index="https://download.pytorch.org/whl/${VARIANT}"
  if reachable "$index/"; then
    # The local version tag pins the variant: only the CPU (or cuXXX) build can satisfy it.
    echo "install.sh: torch==${TORCH_VERSION}+${VARIANT} from $index"
    pip install "torch==${TORCH_VERSION}+${VARIANT}" --index-url "$index" --extra-index-url https://pypi.org/simple
  elif [ "$VARIANT" != cpu ]; then
    die "$index is unreachable; install a ${VARIANT} torch yourself, then rerun this script"
  else
    # No PyTorch index (offline mirror, proxy): take torch from the configured indexes, but look
    # at what the resolver picks first so a CPU install can never pull the CUDA stack by accident.
    report=$(mktemp)
    trap 'rm -f "$report"' EXIT
    pip install --dry-run --quiet --ignore-installed --report "$report" "torch==${TORCH_VERSION}"
    if grep -q '"name": "nvidia-' "$report"; then
      die "the configured index only offers a CUDA torch==${TORCH_VERSION} (several GB) and $index is
  unreachable; install a CPU torch yourself, then rerun this script"
    fi
    pip install "torch==${TORCH_VERSION}"
  fi
fi

pip install "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.26" ninja numpy
pip install --no-build-isolation -e ".[${EXTRAS}]"
"$PY" -c "import anisodiff; print('anisodiff', anisodiff.__version__, anisodiff.build_info())"
