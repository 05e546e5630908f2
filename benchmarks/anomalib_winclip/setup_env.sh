#!/usr/bin/env bash
# Creates an isolated virtualenv for the anomalib WinCLIP baseline benchmark.
#
#   bash benchmarks/anomalib_winclip/setup_env.sh
#
# Result: <repo>/.venv-anomalib (git-ignored) with
#   anomalib==2.7.0        (no extras: torch is only pulled in by anomalib's cpu/cu* extras)
#   open_clip_torch==2.24.0 (anomalib 2.7's `clip` extra admits >=2.23.0,<2.26.1;
#                            WinCLIP needs a pre-2.26 open_clip, see README.md)
#   torch==2.14.1, torchvision==0.29.1 (anomalib's cpu extra asks torch>=2.10, torchvision>=0.25;
#                            these are the versions this machine serves from local disk)
# Idempotent: re-running reuses the venv and pip leaves satisfied pins alone.
# Override the interpreter with PYTHON=/path/to/python3.11.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${VENV:-$REPO/.venv-anomalib}"
PYTHON="${PYTHON:-python3.11}"

ANOMALIB_VERSION="2.7.0"
OPEN_CLIP_VERSION="2.24.0"
TORCH_VERSION="2.14.1"
TORCHVISION_VERSION="0.29.1"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup_env] creating $VENV with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
else
    echo "[setup_env] reusing $VENV ($("$VENV/bin/python" --version 2>&1))"
fi

"$VENV/bin/python" -m pip install --quiet \
    "torch==$TORCH_VERSION" \
    "torchvision==$TORCHVISION_VERSION" \
    "anomalib==$ANOMALIB_VERSION" \
    "open_clip_torch==$OPEN_CLIP_VERSION"

# pip check may flag unrelated optional pins; report but do not fail on it.
"$VENV/bin/python" -m pip check || echo "[setup_env] note: pip check reported the above (not fatal)"

"$VENV/bin/python" - <<'PY'
import sys
from importlib.metadata import version
import torch, open_clip
from anomalib.models.image.winclip.torch_model import WinClipModel  # noqa: F401
print("[setup_env] python", sys.version.split()[0],
      "| anomalib", version("anomalib"),
      "| open_clip_torch", version("open_clip_torch"),
      "| torch", torch.__version__,
      "| torchvision", version("torchvision"))
PY
echo "[setup_env] ok: $VENV"
