#!/usr/bin/env bash
# Installs Debian's Chromium (and a font): it draws the PNG/SVG copies of every figure (plotly's
# static export through kaleido), the report's PDF, and the report test's browser check.
# Idempotent: a no-op when a Chrome/Chromium is already on PATH or named by $SPECTRA_CHROMIUM.
# Needs apt-get (Debian/Ubuntu) and root or passwordless sudo; otherwise it says so and exits 1.
set -euo pipefail
if [ -n "${SPECTRA_CHROMIUM:-}" ] && command -v "$SPECTRA_CHROMIUM" >/dev/null 2>&1; then
  echo "install_chromium: $(command -v "$SPECTRA_CHROMIUM") already present (SPECTRA_CHROMIUM)"
  exit 0
fi
for b in chromium chromium-browser google-chrome google-chrome-stable; do
  if command -v "$b" >/dev/null 2>&1; then
    echo "install_chromium: $(command -v "$b") already present"
    exit 0
  fi
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_chromium: no apt-get here; install Chrome or Chromium yourself and put it on PATH" \
       "(or set SPECTRA_CHROMIUM to its path)" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1 || ! sudo -n true 2>/dev/null; then
    echo "install_chromium: need root or passwordless sudo to apt-get install chromium;" \
         "run: sudo apt-get install chromium fonts-dejavu-core" >&2
    exit 1
  fi
  SUDO="sudo -n"
fi
export DEBIAN_FRONTEND=noninteractive
echo "install_chromium: apt-get install chromium fonts-dejavu-core"
$SUDO apt-get update -qq
# fonts: without any font the images have no text.
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
command -v chromium
