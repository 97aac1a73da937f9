#!/usr/bin/env bash
# Set up PatchCast in ./.venv: a matched torch/torchvision pair, the project with its dev tools, and
# Mosquitto (the demo and the tests start their own broker process).
#
#   TORCH_PACKAGES   what to install for torch (default: a matched pair verified with timm 1.0)
#   PATCHCAST_SKIP_MOSQUITTO=1   do not try to install mosquitto
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PACKAGES=${TORCH_PACKAGES:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "==> installing ${TORCH_PACKAGES} (large download the first time)"
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install --quiet ${TORCH_PACKAGES}
fi
echo "==> installing patchcast (editable, with dev tools)"
.venv/bin/python -m pip install --quiet -e '.[dev]'
.venv/bin/python -c "import timm, torchvision; print('timm', timm.__version__, 'torchvision', torchvision.__version__)"

if ! command -v mosquitto >/dev/null 2>&1 && [ -z "${PATCHCAST_SKIP_MOSQUITTO:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing mosquitto"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
  else
    echo "mosquitto is not installed. Install it, then re-run:" >&2
    echo "  Debian/Ubuntu: sudo apt-get install mosquitto mosquitto-clients" >&2
    echo "  macOS:         brew install mosquitto" >&2
    exit 1
  fi
fi
echo "==> ready: .venv/bin/patchcast --help"
