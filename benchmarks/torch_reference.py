"""The CIFAR networks of resnet_jax in PyTorch, timed the way `resnet_jax.bench` times JAX.

He et al. 2015, Sec. 4.2: a 3x3 conv with 16 filters, 3 stages of n basic blocks (16/32/64
filters, stride 2 at the start of stages 2 and 3), option A shortcuts (strided identity,
zero-padded channels), global average pooling and a 10-way linear layer; `residual=False` gives
the plain twin. The train step is the same as ours: forward, cross-entropy, backward, SGD with
momentum 0.9 and weight decay 1e-4, on one fixed batch already on the device.

Modes: `eager`, `compile` (torch.compile), each with `channels_last` on or off. torch is an
optional extra: `pip install -e '.[torch]'`.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, residual: bool):
        super().__init__()
        self.residual, self.stride, self.pad = residual, stride, cout - cin
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.residual:
            shortcut = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
            if self.pad:  # option A: the new channels are zeros
                shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
            y = y + shortcut
        return F.relu(y)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, residual: bool = True, num_classes: int = 10,
                 base_width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth={depth} is not 6n+2")
        n = (depth - 2) // 6
        w = base_width  # the paper's 16/32/64 filters; narrower for CPU-scale runs
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w),
                                  nn.ReLU())
        blocks, cin = [], w
        for stage, cout in enumerate((w, 2 * w, 4 * w)):
            for i in range(n):
                blocks.append(Block(cin, cout, 2 if stage and i == 0 else 1, residual))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(4 * w, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class Step:
    """The train step of the PyTorch twin, run once (its compile, under `compile`) and once
    more: `time(n)` times n more steps, `row(seconds)` is the row (as `resnet_jax.bench.Step`)."""

    def __init__(self, depth: int, *, residual: bool = True, batch_size: int = 128,
                 mode: str = "eager", channels_last: bool = False, device: str = "cpu"):
        torch.manual_seed(0)
        model = CifarResNet(depth, residual).to(device)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=memory_format)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        x = torch.randn(batch_size, 3, 32, 32, device=device).to(memory_format=memory_format)
        y = torch.randint(0, 10, (batch_size,), device=device)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss

        if mode == "compile":
            torch._dynamo.reset()  # a fresh cache per net: no recompile limit across measurements
            step = torch.compile(step)
        elif mode != "eager":
            raise ValueError(f"unknown mode {mode!r}: use eager or compile")
        self.step = step
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        self.info = {"net": f"{'ResNet' if residual else 'plain'}-{depth}",
                     "framework": "pytorch",
                     "mode": mode + (" channels_last" if channels_last else ""),
                     "batch": batch_size, "torch": torch.__version__,
                     "params": sum(p.numel() for p in model.parameters())}
        start = time.perf_counter()
        step()
        self.sync()
        self.compile_s = time.perf_counter() - start
        self.time(1)

    def time(self, steps: int) -> float:
        """Seconds per step over `steps` more steps."""
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.step()
        loss.item()
        self.sync()
        return (time.perf_counter() - start) / steps

    def row(self, seconds: float) -> dict:
        return self.info | {"images_per_sec": self.info["batch"] / seconds,
                            "ms_per_step": 1e3 * seconds, "compile_s": self.compile_s}


def measure(depth: int, *, residual: bool = True, batch_size: int = 128, steps: int = 20,
            mode: str = "eager", channels_last: bool = False, device: str = "cpu") -> dict:
    step = Step(depth, residual=residual, batch_size=batch_size, mode=mode,
                channels_last=channels_last, device=device)
    return step.row(step.time(steps))
