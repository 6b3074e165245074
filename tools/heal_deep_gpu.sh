#!/usr/bin/env bash
# Healing before/after on deep-moe, both layouts, in one command (docs/QUALITY.md,
# Healing, "Deep family"): dequantize the 4-bit model with mlx-lm (split --bits none
# needs plain weights), heal_study on contiguous thirds and on the shipped domain sets
# (the CPU runs' layout, from `calibrate --grouping domain-sets`). Summaries and evals
# land in $OUT as benchmarks/ names. Runs on a CPU too (tiny: STEPS=2 PASSAGES=1 CALIB=...).
#
#   OUT=/tmp/o bash tools/heal_deep_gpu.sh   # MODEL STEPS PASSAGES CALIB GROUPING TAG override
set -euo pipefail
MODEL=${MODEL:-mlxmoe/assets/deep-moe}
STEPS=${STEPS:-300}
PASSAGES=${PASSAGES:-8}
S=mlxmoe/assets/suites
CALIB=${CALIB:-$S/deep-calibration.jsonl}
GROUPING=${GROUPING:-mlxmoe/assets/groupings/deep-moe-g3-domain-sets64.json}
OUT=${OUT:?set OUT}
TAG=${TAG:-gpu}
W=$(mktemp -d)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

python -m mlx_lm convert --hf-path "$MODEL" --mlx-path "$W/deq" -d >"$OUT/dequantize.log" 2>&1
study=(--model "$W/deq" --name mlxmoe/assets/deep-moe --groups 3 --steps "$STEPS" --passages "$PASSAGES"
       --suite $S/deep-heldout.jsonl --suite $S/deep-unseen.jsonl --calib-suite "$CALIB")

keep() {  # $1: heal_study out dir, $2: layout name
  for f in summary eval-deep-heldout eval-deep-unseen heal; do
    cp "$1/$f.json" "$OUT/2026-12-02-$TAG-heal-$2-deep-moe-${f/deep-/}.json"
  done
}

python tools/heal_study.py "${study[@]}" --out "$W/contig" >"$OUT/contig.log" 2>&1
keep "$W/contig" contiguous
python tools/heal_study.py "${study[@]}" --grouping "$GROUPING" --out "$W/ds" >"$OUT/ds.log" 2>&1
keep "$W/ds" domain-sets64
for l in contiguous domain-sets64; do
  python tools/heal_study.py --table "$OUT/2026-12-02-$TAG-heal-$l-deep-moe-summary.json" "g3/$l"
done
