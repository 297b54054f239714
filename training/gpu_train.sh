#!/usr/bin/env bash
# Train both reference models on the lent GPU (run from the repository root through the device tool,
# carrying the train/valid split under carry/data/gutenberg). Outputs come back as tar parts in $OUT.
set -euo pipefail
export DMR_DATA="$PWD/carry/data" PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -f models/tokenizer/tokenizer.json ] || python3 training/train_tokenizer.py --out models/tokenizer
for m in ref-mixtral ref-olmoe; do
  python3 training/train_reference.py --config "training/configs/$m.json" --tokenizer models/tokenizer \
    --out "/tmp/$m" --cache /tmp/tokens.pt > "$OUT/$m.log" 2>&1 || { tail -30 "$OUT/$m.log"; exit 1; }
  grep -v '^{' "$OUT/$m.log" | grep -v Writing | tail -4
  tail -2 "$OUT/$m.log" | head -1
  tar cf - -C /tmp "$m" | split -b 15000000 - "$OUT/$m.tar.part-"
done
