#!/usr/bin/env bash
# GPU check, <= 5 minutes on one H100: ResNet-50 train img/s at 64 and 224 px (synthetic,
# bf16 + channels_last), then one end-to-end `transferlab train` epoch on a synthetic 64 px
# dataset of 50,000 images (uint8 set resident on the GPU, on-GPU augmentation); and shard
# decoding by nvJPEG against Pillow (issue 20.4).
# Run from the repository root on a machine with CUDA and the project's dependencies:
#   bash benchmarks/gpu_check.sh
set -euo pipefail
export PYTHONPATH="${PYTHONPATH:-}:$(pwd)/src" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/gpu_throughput.py --steps 30
python3 benchmarks/gpu_end_to_end.py --sizes 64 224  # prints ratio_64= and ratio_224= (issue 20.2)
python3 benchmarks/shard_decode.py --device cuda  # prints ratio= (nvJPEG / Pillow) and |diff|
out=$(mktemp -d)
start=$(date +%s)
python3 -m transferlab train --data synthetic:50000x64 --model resnet50 --epochs 1 \
  --batch-size 512 --lr 0.002 --precision bf16 --eval-batch-size 1024 --out "$out/r50" 2>&1 | tr "\r" "\n" | grep "^\[r50\]"
echo "end-to-end: 1 epoch of 40,000 train + 5,000 val + 10,000 test images in $(( $(date +%s) - start )) s (process start and data generation included)"
python3 - "$out/r50" <<'PY'
import json, sys
meta = json.load(open(f"{sys.argv[1]}/meta.json"))
print(f"epoch seconds (train + val): {meta['seconds']}, test top-1 {meta['metrics']['test']['top1']:.3f}")
PY
