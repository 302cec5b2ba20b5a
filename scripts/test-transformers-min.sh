#!/usr/bin/env bash
# Run the KV-cache tests against the lowest transformers release pyproject.toml supports.
# The shared environment keeps its own (newest) transformers; the old one and the
# tokenizers/huggingface_hub it needs go to an overlay folder that shadows them on PYTHONPATH.
# Not part of `make test` (it downloads three wheels once and loads the model again).
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=$(bash scripts/env.sh)
OVERLAY=.venv-tfmin/overlay
LOW=$(grep -o 'transformers>=[0-9.]*' pyproject.toml | head -1 | cut -d= -f2)
if [ ! -f "$OVERLAY/.ok-$LOW" ]; then
    "$ENV/bin/python" -m pip install -q --no-deps --target "$OVERLAY" \
        "transformers==$LOW" "tokenizers==0.22.1" "huggingface_hub==0.35.3"
    touch "$OVERLAY/.ok-$LOW"
fi
PYTHONPATH="$OVERLAY:python" HF_HUB_OFFLINE=1 "$ENV/bin/python" -c \
    'import transformers; print("transformers", transformers.__version__)'
PYTHONPATH="$OVERLAY:python" HF_HUB_OFFLINE=1 "$ENV/bin/python" -m pytest tests/test_kvcache.py -q -p no:cacheprovider "$@"
