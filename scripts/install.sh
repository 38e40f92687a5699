#!/usr/bin/env bash
# Installs rpiq into ./.venv (idempotent). CPU by default: torch is pinned to the 2.13.0 CPU
# wheel; on a GPU machine set RPIQ_TORCH (e.g. RPIQ_TORCH="torch==2.13.0" from a CUDA index)
# or preinstall torch into .venv first.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"rpiq needs Python 3.11, found {sys.version}"'

# Debian packages the project needs: espeak-ng (the server's speech, via pyttsx3), DejaVu fonts (the
# server tests render text with exact ground truth), libgl1/libglib2.0-0 (OpenCV, pulled in by rapidocr),
# chromium/chromium-driver (tests/ui drive the web page in headless Chromium; no browser download).
# RPIQ_NO_APT=1 skips apt entirely (install these yourself; tests needing them then skip cleanly).
APT_PACKAGES=(espeak-ng fonts-dejavu-core libgl1 libglib2.0-0 chromium chromium-driver)
# npm (with Debian's nodejs) installs axe-core for the page's accessibility check; kept if node is already there.
command -v npm >/dev/null || APT_PACKAGES+=(npm)
if [ "${RPIQ_NO_APT:-0}" != "1" ] && command -v apt-get >/dev/null; then
  missing=()
  for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "rpiq: installing Debian packages: ${missing[*]} (RPIQ_NO_APT=1 skips this)"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${missing[@]}"
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  .venv/bin/python -m pip install -q "${RPIQ_TORCH:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e '.[dev]'
echo "rpiq installed in $(pwd)/.venv  (activate: source .venv/bin/activate)"
