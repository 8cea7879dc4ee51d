"""How far `transferlab auto`'s cost estimates are from what its trained candidates' fold runs
take: for each trained candidate (the DCNN, the partial fine-tune) the estimate of one fold
run (`autospace.estimate` / 5) beside the seconds one fold run (`--fold 1/5`, the candidate's
own settings, its images already decoded) takes. Ratios near 1 let the schedule keep its
promise; a ratio far below 1 made the DCNN take the rest of a small budget and be thrown away.

Run it alone on the machine: anything else busy on the cores slows torch's threads unevenly.

    python benchmarks/auto_estimates.py [--data digits] [--limit 600] [--candidates dcnn-16]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from transferlab import autospace, config, data, evaluate, trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="digits")
    p.add_argument("--limit", type=int, default=None, help="images per split, as --limit")
    p.add_argument("--candidates", nargs="*", help="names (default: every trained one)")
    args = p.parse_args()
    ds = data.load(args.data, 0.1, args.limit)
    precision = evaluate.resolve_precision("auto")
    cands = [c for c in autospace.candidates(ds, gpu=False) if c.kind == "train"]
    cands = [c for c in cands if not args.candidates or c.name in args.candidates]
    print(f"{args.data} ({len(ds.splits['train'])} train images), precision {precision}")
    with tempfile.TemporaryDirectory() as tmp:
        for c in cands:
            t0 = time.perf_counter()
            est = autospace.estimate(c, ds, precision)[0] / autospace.FOLDS
            timing = time.perf_counter() - t0
            bare = batches_only(c, ds, precision)
            settings = {"data": ds.spec, "limit": args.limit, "cache_dir": f"{tmp}/cache"}
            cfg = config.make_config(settings | c.settings | {"fold": f"1/{autospace.FOLDS}"})
            warm = config.make_config({"epochs": 1}, cfg)  # decodes the images: not timed
            trainer.fit(warm, Path(tmp) / "warm", quiet=True, data_notes=False)
            shutil.rmtree(Path(tmp) / "warm")
            t0 = time.perf_counter()
            trainer.fit(cfg, Path(tmp) / c.name, quiet=True, data_notes=False)
            took = time.perf_counter() - t0
            print(f"{c.name:>22}: one fold estimated {est:6.1f} s, took {took:6.1f} s: "
                  f"estimate/actual {est / took:.2f} (batches only {bare / took:.2f}); "
                  f"timing it took {timing:.1f} s")  # fmt: skip


def batches_only(c, ds, precision) -> float:
    """One fold's estimate from its timed batches alone, as it was before the epochs'
    overheads (scoring, saving the state) and the run's were measured."""
    kept = autospace._epoch_overhead, autospace._run_overhead
    autospace._epoch_overhead, autospace._run_overhead = (lambda *a: 0.0), (lambda: 0.0)
    try:
        return autospace.estimate(c, ds, precision)[0] / autospace.FOLDS
    finally:
        autospace._epoch_overhead, autospace._run_overhead = kept


if __name__ == "__main__":
    main()
