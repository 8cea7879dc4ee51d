"""Train-step throughput of ResNet-50 on this machine: fp32 vs bf16 autocast, NCHW vs channels_last.

Model only (synthetic batches already in memory), measured side by side in one process.
Prints img/s per variant and each variant's ratio over fp32 NCHW. This decides what
`--precision auto` picks: bf16 only where the hardware computes it natively.

    python benchmarks/precision.py [--size 64] [--batch 64] [--steps 6]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import timm
import torch
import torch.nn.functional as F

from transferlab.evaluate import bf16_supported


def throughput(bf16: bool, channels_last: bool, size: int, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = timm.create_model("resnet50", num_classes=200)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 200, (batch,))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for step in range(steps + 2):  # two warm-up steps
        if step == 2:
            t0 = time.perf_counter()
        with ctx:
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"native bf16: {bf16_supported()}, ResNet-50 train step at {args.size}px, "
        f"batch {args.batch}"
    )
    base = None
    for bf16 in (False, True):
        for cl in (False, True):
            ips = throughput(bf16, cl, args.size, args.batch, args.steps)
            base = base or ips
            name = f"{'bf16' if bf16 else 'fp32'} {'channels_last' if cl else 'NCHW'}"
            print(f"{name:<20} {ips:7.1f} img/s  ratio={ips / base:.2f}")


if __name__ == "__main__":
    main()
