#!/usr/bin/env bash
# Create .venv and install the project's requirements (idempotent).
# The lmms-eval extra (requirements-eval.txt, ~50 more packages, about 70 s) is included unless SKIP_EVAL_EXTRA=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
REQS=(-r requirements.txt -r requirements-dev.txt)
[ "${SKIP_EVAL_EXTRA:-0}" = "1" ] || REQS+=(-r requirements-eval.txt)
.venv/bin/python -m pip install -q --disable-pip-version-check "${REQS[@]}" 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -c "import torch, transformers, open_clip, webdataset; print('torch', torch.__version__, '| transformers', transformers.__version__)"
