"""A researcher's own sweep, as an example: learning rate x depth of ResNets on digits, 3 seeds.

    python -m experiments.sweep --sweep=experiments/sweeps/lr_depth.py --root=runs/lr-depth

Argument (optional): steps, the iterations of each run (default 200): `lr_depth.py:steps=400`.
"""

from experiments.declaration import Run, Sweep
from resnet_jax.configs import parse_arg


def get_sweep(arg=None) -> Sweep:
    steps = parse_arg(arg, steps=200)["steps"]
    schedule = {"total_steps": steps, "lr_boundaries_steps": (steps // 2, steps * 3 // 4),
                "log_every_steps": 10}
    runs = [Run(f"depth={depth},dataset=digits,seed={seed}", {"learning_rate": lr, **schedule})
            for depth in (8, 20) for lr in (0.02, 0.1) for seed in range(3)]
    return Sweep(runs, report={"by": ["learning_rate", "depth"], "x": "depth"})
