#!/usr/bin/env bash
# Install anisodiff WITHOUT the editable checkout, the ways a user does, and use it:
#
#   1. from a clone:            pip install --no-build-isolation <clone>
#   2. from the wheel and the sdist that `python -m build` makes of that clone (the wheel is built
#      from the sdist, so this also checks that the sdist holds everything the build needs);
#      the sdist itself is installed too with CHECK_INSTALL_SDIST=1 (one more compile).
#
# Each install goes into a fresh virtual environment that sees the packages already installed (a
# fresh torch download is GBs and minutes) but none of this checkout: the venv's site-packages lists
# the system site-packages in a .pth file, as plain paths, so their .pth hooks (the editable
# install of this checkout) do not run, unlike with `venv --system-site-packages`. The working
# directory is outside the source tree; the test imports anisodiff, checks that it came from the
# venv, runs a tiny add_noise and `anisodiff info`.
#
#   bash scripts/check_install.sh           # CI runs it after the test suite (.ci/run)
#
# Needs the build tools of scripts/install.sh (scikit-build-core, pybind11, cmake, ninja) and
# `build` (the dev extra). Environment: PYTHON (default python3), CHECK_INSTALL_SDIST (0 or 1).
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
SRC=$PWD
WORK=$(mktemp -d "${TMPDIR:-/tmp}/anisodiff-check-install.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
say() { echo "check_install.sh: $*"; }
t0=$SECONDS

# The committed tree (what a clone holds), not the working tree's untracked files.
git clone --quiet --no-hardlinks "$SRC" "$WORK/clone"
rm -rf "$WORK/clone/build"

use() {  # use VENV: import from outside the source tree, check where it came from, run it
  local venv=$1 site
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  (cd "$WORK" && "$venv/bin/python" - "$site" <<'EOF'
import pathlib, sys
import torch
import anisodiff as ad

site = pathlib.Path(sys.argv[1]).resolve()
where = pathlib.Path(ad.__file__).resolve()
assert site in where.parents, f"anisodiff came from {where}, not from the venv ({site})"
assert ad.build_info()["cpu"], ad.build_info()
spec = ad.NoiseSpec(squeeze=ad.Squeeze(torch.ones(3, 1) / 3 ** 0.5, -0.4), spectral=ad.PowerLaw(-0.04))
x_t, eps = ad.add_noise(torch.zeros(2, 3, 8, 8), torch.tensor([10, 900]), spec,
                        ad.VPSchedule.linear(), seed=0)
assert torch.isfinite(x_t).all() and x_t.shape == (2, 3, 8, 8)
print(f"  anisodiff {ad.__version__} from {where.parent}, add_noise ok")
EOF
  )
  (cd "$WORK" && "$venv/bin/anisodiff" info >/dev/null)
}

fresh_venv() {  # a venv that sees the system site-packages as plain paths (no .pth hooks)
  "$PY" -m venv "$1"
  local site
  site=$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$PY" -c 'import site, sysconfig; print("\n".join(dict.fromkeys(
      [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()])))' \
    >"$site/_system_site_packages.pth"
}

install_into() {  # install_into NAME TARGET
  local venv="$WORK/venv-$1" t=$SECONDS
  fresh_venv "$venv"
  "$venv/bin/python" -m pip install --quiet --no-build-isolation --no-deps "$2"
  use "$venv"
  say "$1: ok ($((SECONDS - t)) s)"
}

say "1. pip install --no-build-isolation <clone>"
install_into clone "$WORK/clone"

say "2. python -m build (sdist, then the wheel from the sdist)"
t=$SECONDS
"$PY" -m build --no-isolation --outdir "$WORK/dist" "$WORK/clone" >"$WORK/build.log" 2>&1 ||
  { tail -40 "$WORK/build.log"; exit 1; }
say "built $(cd "$WORK/dist" && echo *) ($((SECONDS - t)) s)"
install_into wheel "$(echo "$WORK"/dist/*.whl)"
if [ "${CHECK_INSTALL_SDIST:-0}" = 1 ]; then
  install_into sdist "$(echo "$WORK"/dist/*.tar.gz)"
fi
say "all installs work ($((SECONDS - t0)) s)"
