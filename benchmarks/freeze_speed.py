"""What `--freeze N` saves: training img/s of one model with its N lowest block groups frozen.

Synthetic batches (the cost is the model's, not the data's), the precision `auto` picks,
channels_last, AdamW steps exactly as transferlab builds them (`strategies.trainable`, frozen modules
in eval mode). Each setting is timed alternately over several rounds, so drift on a noisy
machine hits all of them; prints the median img/s per setting and each one's ratio to
`--freeze none`.

    python benchmarks/freeze_speed.py [--model tf_efficientnet_lite0] [--size 192]
                                      [--freeze none 4 5] [--batch 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F

from transferlab import strategies


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--size", type=int, default=192)
    p.add_argument("--freeze", nargs="+", default=["none", "4", "5"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.randint(0, 15, (args.batch,))
    setups = {}
    for what in args.freeze:
        model = timm.create_model(args.model, num_classes=15).to(memory_format=torch.channels_last)
        frozen = strategies.train_only(model, strategies.trainable(model, what))
        strategies.set_train_mode(model, frozen)
        params = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        setups[what] = (model, opt, sum(q.numel() for q in params))

    def step(model, opt):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    rates = {what: [] for what in setups}
    for model, opt, _ in setups.values():
        step(model, opt)  # warm-up
    for _ in range(args.rounds):
        for what, (model, opt, _) in setups.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                step(model, opt)
            rates[what].append(args.steps * args.batch / (time.perf_counter() - t))
    base = statistics.median(rates[args.freeze[0]])
    print(f"{args.model} at {args.size} px, batch {args.batch}, {torch.get_num_threads()} threads")
    for what, (_, _, n) in setups.items():
        r = statistics.median(rates[what])
        print(f"freeze {what:>8}: {n / 1e6:5.2f}M trainable  {r:6.1f} img/s  ratio={r / base:.2f}")


if __name__ == "__main__":
    main()
