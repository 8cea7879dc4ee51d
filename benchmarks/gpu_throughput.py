"""ResNet-50 training throughput on a CUDA GPU (model only, synthetic batches): bf16 autocast +
channels_last at 64 and 224 px, optionally torch.compile'd. Run by benchmarks/gpu_check.sh.

    python benchmarks/gpu_throughput.py [--compile] [--steps 30]
"""

from __future__ import annotations

import argparse
import time

import timm
import torch
import torch.nn.functional as F


def throughput(size: int, batch: int, steps: int, compile_model: bool) -> float:
    torch.manual_seed(0)
    model = timm.create_model("resnet50", num_classes=200).cuda()
    model = model.to(memory_format=torch.channels_last).train()
    step_model = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.randn(batch, 3, size, size, device="cuda").contiguous(
        memory_format=torch.channels_last
    )
    y = torch.randint(0, 200, (batch,), device="cuda")
    for i in range(steps + 5):  # 5 warm-up steps (and compilation)
        if i == 5:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(step_model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 + channels_last"
        f"{' + compile' if args.compile else ''}",
        flush=True,
    )
    for size, batch in ((64, 512), (224, 256)):
        ips = throughput(size, batch, args.steps, args.compile)
        print(f"ResNet-50 train {size}px batch {batch}: {ips:8.0f} img/s", flush=True)


if __name__ == "__main__":
    main()
