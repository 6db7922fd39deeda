"""He et al. 2015, Table 3's question asked on CIFAR: shortcut options A, B and C.

    python -m experiments.sweep --sweep=experiments/sweeps/shortcuts.py:preset=digits,seeds=3 --root=DIR

Identity shortcuts with zero padding where the shape changes (A), projections there (B) or
everywhere (C), for ResNet-20, 56 and 110 (the smoke preset: 8 and 14). The paper found B
slightly better than A and C marginally better than B on ImageNet (Table 3), and chose A for
CIFAR. Argument: preset, dataset, seeds, as for degradation.py; the preset sets the schedule.
"""

from experiments.declaration import Run, Sweep
from experiments.sweeps.presets import study_arg


def get_sweep(arg=None) -> Sweep:
    name, preset, dataset, seeds = study_arg(arg)
    base = "" if preset.base_width == 16 else f",base_width={preset.base_width}"
    depths = (8, 14) if name == "smoke" else (20, 56, 110)
    runs = [Run(f"depth={d},shortcut={s},width={preset.width}{base},dataset={dataset},"
                f"seed={seed}", preset.schedule(d))
            for d in depths for s in "ABC" for seed in range(seeds)]
    return Sweep(runs, report={"by": ["shortcut", "depth"], "x": "depth",
                               "title": f"Shortcut options A/B/C, {dataset} ({name} preset)"})
