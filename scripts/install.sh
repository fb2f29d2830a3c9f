#!/usr/bin/env bash
# Set up anisodiff from this checkout: a pinned PyTorch (CPU wheel by default), the build tools,
# then the extension itself (compiled against that torch, never against a freshly pulled one).
#
#   bash scripts/install.sh                 # torch CPU wheel + anisodiff[viz]
#   bash scripts/install.sh --dev           # + test/benchmark tools (pytest, hypothesis, triton)
#   bash scripts/install.sh --torch cu130   # CUDA 13.0 torch wheel instead of the CPU one
#
# An already-installed torch is kept (e.g. a GPU image's CUDA build). Environment: PYTHON (default
# python3), ANISODIFF_TORCH_VERSION (default 2.13.0).
set -euo pipefail

PY=${PYTHON:-python3}
TORCH_VERSION=${ANISODIFF_TORCH_VERSION:-2.13.0}
VARIANT=cpu
EXTRAS=viz
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) EXTRAS=dev ;;
    --torch) VARIANT=${2:?--torch needs cpu or a CUDA tag such as cu130}; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "$0")/.."
pip() { "$PY" -m pip "$@"; }

if "$PY" -c "import torch" 2>/dev/null; then
  echo "install.sh: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  index="https://download.pytorch.org/whl/${VARIANT}"
  if curl -sfI --max-time 10 "$index/" >/dev/null 2>&1; then
    echo "install.sh: torch==${TORCH_VERSION} from $index"
    pip install "torch==${TORCH_VERSION}" --index-url "$index" --extra-index-url https://pypi.org/simple
  else
    # No PyTorch index (offline mirror, proxy): take torch from the configured indexes, but look
    # at what the resolver picked first so a CPU install can never pull the CUDA stack by accident.
    report=$(mktemp)
    pip install --dry-run --quiet --ignore-installed --report "$report" "torch==${TORCH_VERSION}"
    if [ "$VARIANT" = cpu ] && grep -q '"name": "nvidia-' "$report"; then
      echo "install.sh: the configured index only offers a CUDA torch==${TORCH_VERSION} (several GB)," >&2
      echo "  and $index is unreachable. Install a CPU torch yourself, then rerun this script." >&2
      exit 1
    fi
    rm -f "$report"
    pip install "torch==${TORCH_VERSION}"
  fi
fi

pip install "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.26" ninja numpy
pip install --no-build-isolation -e ".[${EXTRAS}]"
"$PY" -c "import anisodiff; print('anisodiff', anisodiff.__version__, anisodiff.build_info())"
