"""Peak memory of training against dataset size: WebDataset shards (`--data wds:DIR`, decoded per
batch) vs the same images through the decode cache (`--data csv:FILE`, memory-mapped).

Datasets of N images (10,000 and 40,000) are listed in a CSV from the shared Tiny ImageNet train
images (repeated to reach N; every split grows with N: test and val are carved from them),
sharded with `transferlab data shard`, and one epoch of a small timm model at 64 px is trained
on each in a fresh process under /usr/bin/time -v, alone. Prints each run's wall time and peak
RSS, then `rss_growth_wds=` and `rss_growth_cache=` (peak RSS at 40k over 10k).

    python benchmarks/wds_memory.py [--sizes 10000 40000] [--model test_resnet]
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from common import cpu_kind

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet-200"
BIN = Path(sys.executable).parent / "transferlab"


def write_csv(path: Path, n: int) -> None:
    files = sorted((SHARED / "train").glob("*/images/*.JPEG"))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "label"])
        for i in range(n):
            p = files[(i * 7919) % len(files)] if n <= len(files) else files[i % len(files)]
            w.writerow([str(p), p.parent.parent.name])


def timed_run(args: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one transferlab command in a fresh process."""
    run = subprocess.run(
        ["/usr/bin/time", "-v", str(BIN), *args], capture_output=True, text=True, env=env
    )
    if run.returncode != 0:
        sys.exit(f"failed: transferlab {' '.join(args)}\n{run.stderr[-2000:]}")
    rss = float(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr)[1]) / 1024
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", run.stderr)
    h, m, s = (float(x or 0) for x in wall.groups())
    return h * 3600 + m * 60 + s, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 40000])
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--input-size", type=int, default=64)
    a = parser.parse_args()
    print(f"{cpu_kind()}; {a.model} {a.input_size}px, 1 epoch, batch 128, fp32, --num-workers 0")
    peak: dict[str, list[float]] = {"wds": [], "cache": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in a.sizes:
            listing = tmp / f"list-{n}" / "tiny.csv"  # its own folder: outputs never go there
            listing.parent.mkdir()
            write_csv(listing, n)
            env = {**os.environ, "TRANSFERLAB_CACHE": str(tmp / f"cache-{n}")}
            timed_run(
                ["--quiet", "data", "shard", f"csv:{listing}", "--out", str(tmp / f"wds-{n}")], env
            )
            for kind, spec in (("wds", f"wds:{tmp / f'wds-{n}'}"), ("cache", f"csv:{listing}")):
                train = ["--quiet", "train", "--data", spec, "--model", a.model, "--input-size",
                         str(a.input_size), "--epochs", "1", "--batch-size", "128", "--precision",
                         "fp32", "--lr", "0.01", "--out", str(tmp / f"run-{kind}-{n}")]  # fmt: skip
                wall, rss = timed_run(train, env)
                peak[kind].append(rss)
                print(
                    f"{n:>6} images  {kind:<5}  {wall:7.1f} s  peak RSS {rss:7.0f} MB", flush=True
                )
    for kind, values in peak.items():
        print(f"rss_growth_{kind}={values[-1] / values[0]:.2f}")


if __name__ == "__main__":
    main()
