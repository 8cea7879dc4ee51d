"""Markdown table of runs and ensembles repeated over seeds: one row per name found in every
folder, mean ± std (population std) of val and test top-1 over the folders; test NLL, ECE
and seconds averaged.

    python tools/seed_table.py runs/transfer-study runs/transfer-study-1
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def numbers(path: Path) -> dict | None:
    for name in ("meta.json", "ensemble.json"):
        if (path / name).is_file():
            info = json.loads((path / name).read_text())
            return {
                "val": info["metrics"]["val"]["top1"],
                "test": info["metrics"]["test"]["top1"],
                "seconds": info.get("seconds", float("nan")),
                "nll": info["metrics"]["test"]["loss"],
                "ece": info["metrics"]["test"].get("ece", float("nan")),
            }
    return None


def main(folders: list[str]) -> None:
    roots = [Path(f) for f in folders]
    names = sorted(p.name for p in roots[0].iterdir() if p.is_dir())
    print(
        f"| name | val top-1 | test top-1 | test NLL | test ECE | seconds | test per seed ({len(roots)}) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in names:
        rows = [numbers(r / name) for r in roots]
        if any(r is None for r in rows):
            continue
        val, test = (np.array([r[k] for r in rows]) * 100 for k in ("val", "test"))
        secs, nll, ece = (np.mean([r[k] for r in rows]) for k in ("seconds", "nll", "ece"))
        each = ", ".join(f"{t:.2f}" for t in test)
        print(
            f"| {name} | {val.mean():.2f} ± {val.std():.2f} | {test.mean():.2f} ± {test.std():.2f}"
            f" | {nll:.4f} | {ece:.3f} | {secs:.0f} | {each} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
