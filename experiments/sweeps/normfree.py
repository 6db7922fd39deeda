"""Does a deep residual net need batch norm? Plain and residual nets with and without it.

    python -m experiments.sweep --sweep=experiments/sweeps/normfree.py:preset=digits,seeds=3,learning_rate=0.1 --root=DIR

Residual nets at each of the preset's depths (20-110 layers; the smoke preset: 8 and 14) with
batch norm (`norm=batch`, the paper's) against none (`norm=none`) under the standard
initialisation, Fixup (Zhang, Dauphin & Ma 2019) and SkipInit (De & Smith 2020); their plain
twins with and without batch norm (the two inits act on residual branches, which plain nets lack).
The claim it tests, from both papers: residual nets of 100 and more layers train without
normalisation with their initialisation, and not with the standard one. Argument: preset,
dataset, seeds, learning_rate, as for degradation.py; the preset sets the schedule (the same for
every variant, the paper's warm-up rule included from 110 layers). A net without normalisation
whose loss becomes NaN is a failed run, listed with its reason in the report.

The learning rate: both papers train their nets without normalisation at the rate of the batch-
norm baseline, 0.1. The digits preset's 0.02 leaves every net without normalisation at chance
after its 400 iterations, at 20 layers already (Fixup, SkipInit and plain alike; measured, see
experiments/results/normfree-digits/): without batch norm the activations keep the input's
scale, a tenth or so of the normalised one, and a zero-initialised classifier (Fixup) or branch
(SkipInit) starts from there. Hence learning_rate=0.1, for every variant, above.
"""

from experiments.sweep import Run, Sweep
from experiments.sweeps.presets import study_arg

# (residual, norm, residual_init) of each net at each depth.
VARIANTS = ((False, "batch", "standard"), (False, "none", "standard"),
            (True, "batch", "standard"), (True, "none", "standard"),
            (True, "none", "fixup"), (True, "none", "skipinit"))


def get_sweep(arg=None) -> Sweep:
    name, preset, dataset, seeds = study_arg(arg)
    base = "" if preset.base_width == 16 else f",base_width={preset.base_width}"
    runs = [Run(f"depth={depth},residual={str(residual).lower()},norm={norm},"
                f"residual_init={init},width={preset.width}{base},dataset={dataset},seed={seed}",
                preset.schedule(depth))
            for depth in preset.depths for residual, norm, init in VARIANTS
            for seed in range(seeds)]
    return Sweep(runs, report={
        "by": ["residual", "norm", "residual_init", "depth"], "x": "depth", "panels": "residual",
        "title": f"Batch norm vs none; standard, Fixup, SkipInit; {dataset} ({name} preset, "
                 f"lr {preset.learning_rate})"})
