#!/usr/bin/env bash
# Install atm-lightning with its test extras. torchvision needs a torch it was built against, and
# the CPU-only torch wheel some machines carry has no matching torchvision, so when torchvision does
# not import we install the pair the project is tested with. The pins apply only then; to move to a
# newer pair, change both versions together (torchvision's release notes name its torch).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch, torchvision" >/dev/null 2>&1; then
  python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
fi
python -m pip install --quiet -e ".[test]"
