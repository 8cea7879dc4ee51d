"""What flushing denormal floats to zero would save: `transferlab lr-find` of the DCNN (100
steps) on a small folder of noisy 32-px images, with `torch.set_flush_denormal(True)` and
without it (transferlab's default), each in a fresh process, alternated over rounds. A hostile
user measured 2 min against 9.6 s flushed while the machine was busy; alone on a 2-core Xeon
with AMX it is 1.0x in bf16 (6.8 against 6.9 s) and fp32 (8.9 against 8.8 s), so transferlab
does not flush: the slowdown was the busy cores.

Run it alone on the machine: anything else busy on the cores slows torch's threads unevenly.

    python benchmarks/denormals.py [--rounds 3] [--images 10] [--precision fp32]
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

RUN = """
import sys, torch
torch.set_flush_denormal(sys.argv[1] == "flushed")
from transferlab.cli import main
sys.exit(main(sys.argv[2:]))
"""


def make_data(root: Path, per_class: int) -> None:
    """3 colour classes of 32x32 images with 60 random grey pixels each (seeded)."""
    rng = random.Random(0)
    for name, colour in {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}.items():  # fmt: skip
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            im = Image.new("RGB", (32, 32), colour)
            px = im.load()
            for _ in range(60):
                px[rng.randrange(32), rng.randrange(32)] = (rng.randrange(256),) * 3
            im.save(root / name / f"{i}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images", type=int, default=10, help="per class")
    p.add_argument("--precision", default="auto")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        make_data(Path(tmp) / "data", args.images)
        times = {"flushed": [], "denormal": []}
        for r in range(args.rounds):
            for mode in times:
                argv = ["--quiet", "lr-find", "--data", f"folder:{tmp}/data", "--model", "dcnn",
                        "--precision", args.precision, "--cache-dir", f"{tmp}/cache",
                        "--out", f"{tmp}/{mode}-{r}"]  # fmt: skip
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-c", RUN, mode, *argv], check=True)
                times[mode].append(time.perf_counter() - t0)
                print(f"round {r + 1} {mode:>8}: {times[mode][-1]:6.1f} s", flush=True)
    med = {mode: statistics.median(t) for mode, t in times.items()}
    print(f"median lr-find: flushed {med['flushed']:.1f} s, denormal {med['denormal']:.1f} s: "
          f"flushing is {med['denormal'] / med['flushed']:.1f}x faster "
          f"(precision {args.precision})")  # fmt: skip


if __name__ == "__main__":
    main()
