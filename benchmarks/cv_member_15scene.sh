#!/usr/bin/env bash
# Out-of-fold predictions of one candidate ensemble member on 15-Scene train+val (1,500 images;
# the test split is never read), to choose members by cross-validation instead of by test.
# Folds: the permutation numpy.random.default_rng(0) of train then val (transferlab's carve-out),
# cut into 5 parts. Each fold trains on the other four (val carved from them as usual) and
# predicts the held-out part; OUT/oof.npy holds the 1,500 x 15 logits in train+val order.
# Only the train folder of 15-Scene is needed. recipes/15-scene.yaml's lite0-ft-192 member:
#
#   bash benchmarks/cv_member_15scene.sh PATH/15-scene OUT --model tf_efficientnet_lite0 \
#       --weights imagenet --input-size 192 --freeze 4 --epochs 10 --lr 2e-3 --optimizer adamw \
#       --weight-decay 0.05 --label-smoothing 0.1 --warmup-epochs 1 --crop rrc --batch-size 32
#
# About 4 minutes on one H100; five trainings of the member on 2 CPU cores (about 40 minutes).
set -euo pipefail
data=$1 out=$2
shift 2
mkdir -p "$out"
python3 - "$data" "$out" <<'PY'
import os, sys
import numpy as np
from transferlab import data as D
src, out = sys.argv[1:]
ds = D.load(f"folder:{src}", 0.1)
paths = [*ds.splits["train"].paths, *ds.splits["val"].paths]
fold = np.zeros(len(paths), int)
for k, part in enumerate(np.array_split(np.random.default_rng(0).permutation(len(paths)), 5)):
    fold[part] = k
for k in range(5):
    for p, f in zip(paths, fold):
        d = os.path.join(out, "folds", f"f{k}", "test" if f == k else "train", os.path.basename(os.path.dirname(p)))
        os.makedirs(d, exist_ok=True)
        os.symlink(os.path.abspath(p), os.path.join(d, os.path.basename(p)))
PY
for k in 0 1 2 3 4; do
  python3 -m transferlab train --data "folder:$out/folds/f$k" --out "$out/f$k" --overwrite "$@" 2>&1 |
    tr '\r' '\n' | grep -a "best epoch"
done
python3 - "$data" "$out" <<'PY'
import os, sys
import numpy as np
from transferlab import data as D
src, out = sys.argv[1:]
ds = D.load(f"folder:{src}", 0.1)
paths = [os.path.realpath(p) for p in [*ds.splits["train"].paths, *ds.splits["val"].paths]]
y = np.concatenate([ds.splits["train"].labels, ds.splits["val"].labels])
row = {p: i for i, p in enumerate(paths)}
oof = np.full((len(paths), len(ds.classes)), np.nan, np.float32)
for k in range(5):
    held = D.load(f"folder:{out}/folds/f{k}", 0.1).splits["test"]
    rows = [row[os.path.realpath(p)] for p in held.paths]
    z = np.load(f"{out}/f{k}/logits/test.npz")
    assert (z["targets"] == y[rows]).all()
    oof[rows] = z["logits"]
assert not np.isnan(oof).any()
np.save(f"{out}/oof.npy", oof)
print(f"out-of-fold top-1 {(oof.argmax(1) == y).mean():.4f} over {len(y)} images -> {out}/oof.npy")
PY
