"""Which convolutions get a NaN weight gradient in bf16 on this CPU (`models.bf16_grad_trap`
is the rule transferlab follows): one Conv2d, random input and output gradient, `--trials`
times per case, counting the trials whose weight gradient is not finite.

On a 2-core Intel Xeon with AMX and AVX512-BF16 (torch 2.14.1, 8 trials each): a 3x3 stride-2
convolution on 1x1 maps is NaN in bf16 in 7 of 8 trials channels_last, 3 of 8 contiguous, and 3
of 8 on 2x1 maps (the taps that see only padding, whose gradient is 0); never in fp32, with
stride 1, grouped (depthwise), or on 2x2 maps. resnet50 meets it under 20 px (8-px digits: NaN loss
at step 2-6 of the first epoch). Its place in the kernels is oneDNN's; transferlab's answer is
--precision auto choosing fp32 for such a model (guards.cpu_bf16_checked).

    python benchmarks/bf16_conv_trap.py [--trials 8]
"""

from __future__ import annotations

import argparse

import torch
from common import cpu_kind

CASES = {  # name: (input shape, dtype, stride, groups, memory format)
    "bf16 3x3 s2 on 1x1, channels_last": ((64, 512, 1, 1), torch.bfloat16, 2, 1, True),
    "bf16 3x3 s2 on 1x1, contiguous": ((64, 512, 1, 1), torch.bfloat16, 2, 1, False),
    "bf16 3x3 s2 on 2x1": ((64, 512, 2, 1), torch.bfloat16, 2, 1, True),
    "bf16 3x3 s2 on 2x2": ((64, 512, 2, 2), torch.bfloat16, 2, 1, True),
    "bf16 3x3 s1 on 1x1": ((64, 512, 1, 1), torch.bfloat16, 1, 1, True),
    "bf16 3x3 s2 on 1x1, depthwise": ((64, 512, 1, 1), torch.bfloat16, 2, 512, True),
    "fp32 3x3 s2 on 1x1": ((64, 512, 1, 1), torch.float32, 2, 1, True),
}


def non_finite(shape, dtype, stride, groups, channels_last) -> bool:
    conv = torch.nn.Conv2d(shape[1], shape[1], 3, stride, 1, bias=False, groups=groups).to(dtype)
    x = torch.randn(*shape, dtype=dtype)
    if channels_last:
        conv, x = (
            conv.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    out = conv(x)
    out.backward(torch.randn_like(out))
    return not bool(torch.isfinite(conv.weight.grad).all())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"cpu: {cpu_kind()}, torch {torch.__version__}")
    for name, case in CASES.items():
        bad = sum(non_finite(*case) for _ in range(args.trials))
        print(f"{name:<36} NaN weight gradient in {bad} of {args.trials} trials")


if __name__ == "__main__":
    main()
