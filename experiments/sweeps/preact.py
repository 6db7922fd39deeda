"""He et al. 2016: original (post-activation) vs pre-activation residual blocks.

    python -m experiments.sweep --sweep=experiments/sweeps/preact.py:preset=digits,seeds=3 --root=DIR

ResNet-110 (basic blocks, shortcut A) and ResNet-164 (bottleneck blocks, projection shortcuts
B), each with post- and pre-activation blocks (the smoke preset: depths 8 and 11). The 2016
paper reports CIFAR-10 test errors of 6.61 -> 6.37 % (110) and 5.93 -> 5.46 % (164), beside
the numbers at the paper preset and apart at any other. Argument: preset, dataset, seeds, as
for degradation.py.
"""

from experiments.declaration import Run, Sweep
from experiments.sweeps.presets import study_arg

# He et al. 2016 ("Identity Mappings in Deep Residual Networks"), Table 3 (110) and Table 5
# (164): CIFAR-10 test error (%), mean of 5 runs.
PAPER = {(110, "post"): 6.61, (110, "pre"): 6.37, (164, "post"): 5.93, (164, "pre"): 5.46}
PAPER_SCALE = "He et al. 2016: CIFAR-10, 64k iterations of 128 images; mean of 5 runs"


def get_sweep(arg=None) -> Sweep:
    name, preset, dataset, seeds = study_arg(arg)
    common = f",width={preset.width}" + ("" if preset.base_width == 16
                                          else f",base_width={preset.base_width}")
    basic, bottleneck = (8, 11) if name == "smoke" else (110, 164)
    variants = ([(f"depth={basic},block={b}", basic) for b in ("post", "pre")]
                + [(f"depth={bottleneck},bottleneck=true,shortcut=B,block={b}", bottleneck)
                   for b in ("post", "pre")])
    runs = [Run(f"{arg}{common},dataset={dataset},seed={seed}", preset.schedule(depth))
            for arg, depth in variants for seed in range(seeds)]
    reference = {"source": PAPER_SCALE, "comparable": name == "paper",
                 "rows": [{"where": {"depth": d, "block": b}, "n": 5, "mean": e}
                          for (d, b), e in PAPER.items()]}
    return Sweep(runs, report={"by": ["block", "depth"], "x": "depth", "reference": reference,
                               "title": f"Post- vs pre-activation blocks, {dataset} "
                                        f"({name} preset)"})
