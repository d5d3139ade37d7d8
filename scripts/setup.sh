#!/usr/bin/env bash
# Create .venv and install loractl in it (with --test: and the test dependencies).
# torch is installed first when missing, pinned to 2.13.0 (a CPU build lies on disk on our machines);
# installing loractl while torch is absent would make pip pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -e ".${extras}"
