#!/usr/bin/env bash
# The deep reference family's GPU job (tools/train_family.py): one command, <= 9 minutes on one H200.
# Needs torch + transformers (CUDA) and mlx + mlx-lm importable by python3, and the token cache
# prepared on the CPU (python3 tools/train_reference_moe.py --prepare-only --corpus corpus-deep --vocab 8192),
# carried in as corpus-deep/MANIFEST.json + corpus-deep/.cache. Models land in $OUT/<name>/.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-out/family}"
mkdir -p "$OUT"
{ date -u; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>&1
  python3 -c "import torch, transformers, mlx.core as mx, mlx_lm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'mlx', mx.__version__, mx.default_device())" 2>&1
} >> "$OUT/train.log"
python3 tools/train_family.py --out "$OUT" --work "${FAMILY_WORK:-/tmp/family-work}" "$@"
rc=$?
tail -n 40 "$OUT"/logs/*.log > "$OUT/tails.txt" 2>&1
exit $rc
