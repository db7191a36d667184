#!/usr/bin/env bash
# Installs a headless-capable Chromium for the report test (tests/test_report.py renders the
# HTML report in a real browser). Idempotent: a no-op when a Chromium is already on PATH.
# Debian/Ubuntu only (apt-get); needs root or passwordless sudo.
set -euo pipefail
for b in chromium chromium-browser google-chrome; do
  if command -v "$b" >/dev/null 2>&1; then
    echo "install_chromium: $(command -v "$b") already present"
    exit 0
  fi
done
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install_chromium: need root or sudo" >&2; exit 1; }
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# fonts: without any font the screenshot has no text.
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
command -v chromium
