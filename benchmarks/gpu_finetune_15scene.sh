#!/usr/bin/env bash
# 15-Scene full fine-tuning of EfficientNet-Lite2 (offline ImageNet weights, 260 px) on one GPU,
# a few settings side by side; pick among them by the validation split carved from train
# (printed last). Only the train folder is needed: score the chosen runs on the test split
# on any machine with `transferlab evaluate RUN --split test --data folder:PATH/15-scene`.
#
#   bash benchmarks/gpu_finetune_15scene.sh PATH/15-scene OUT_DIR [extra train flags]
#
# About 10 minutes on one H100 (bf16 autocast, images resident on the GPU). Then, on any machine:
#   transferlab ensemble OUT/e30-lr1e-3 OUT/e30-lr2e-3 runs/15-scene-transfer-v2/lite{0-224,1-240,2-260} \
#       --method soft --data folder:PATH/15-scene --out OUT/ens-all-soft
set -euo pipefail
data=$1 out=$2
shift 2
common=(--data "folder:$data" --model tf_efficientnet_lite2 --weights imagenet --input-size 260
  --epochs 15 --batch-size 32 --crop rrc --label-smoothing 0.1 --warmup-epochs 1 "$@")
run() { python3 -m transferlab train "${common[@]}" --out "$out/$1" "${@:2}"; }
run full-lr1e-4 --lr 1e-4
run full-lr3e-4 --lr 3e-4
run full-lr1e-3 --lr 1e-3
run lpft-lr1e-4 --strategy lp-ft --lr 1e-4
run full-lr3e-4-s1 --lr 3e-4 --seed 1
# second round, after the first showed val still rising at epoch 15: 30 epochs
run e30-lr1e-3 --lr 1e-3 --epochs 30
run e30-lr2e-3 --lr 2e-3 --epochs 30
run e30-lr1e-3-s1 --lr 1e-3 --epochs 30 --seed 1
python3 - "$out" <<'PY'
import json, pathlib, sys
rows = []
for meta in sorted(pathlib.Path(sys.argv[1]).glob("*/meta.json")):
    m = json.loads(meta.read_text())
    rows.append((m["metrics"]["val"]["top1"], meta.parent.name, m["seconds"]))
for val, name, seconds in sorted(rows, reverse=True):
    print(f"{name:16s} val top-1 {val:.4f}  {seconds:.0f} s")
PY
