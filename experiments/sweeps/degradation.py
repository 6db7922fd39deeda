"""He et al. 2015, Fig. 1 and Fig. 6 (and Table 6): plain vs residual nets at 20-110 layers.

    python -m experiments.sweep --sweep=experiments/sweeps/degradation.py:preset=digits --root=DIR
    python -m experiments.sweep --sweep=experiments/sweeps/degradation.py:preset=paper,seeds=5 --root=DIR

Argument: preset (experiments/sweeps/presets.py: paper, cifar-cpu, cifar16-cpu, cifar16-12k,
digits, smoke; default digits), dataset (default the preset's, e.g. folder:/data/cifar10_jpeg),
seeds (default the preset's). Plain and residual nets at each of the preset's depths (the paper
preset adds ResNet-1202). The report: final errors per net (plain/residual x depth), the test error
against depth, and the curves in Fig. 6's layout (training error dashed, test error bold, one panel
for plain nets and one for residual nets). The paper's Table 6 sits beside the numbers at the paper
preset only (each beside the statistic of the same kind: ResNet-110's best of 5 beside the best,
its mean +- std of 5 beside the mean, the other depths' one run beside the mean), and in a section
of its own, marked not comparable, at every other scale.
"""

from experiments.declaration import Sweep
from experiments.sweeps.presets import study_arg

# He et al. 2015, Table 6: CIFAR-10 test error (%) of the residual nets. ResNet-110 was trained 5
# times ("best (mean +- std)"); every other net once (n = 1: `mean` is that run's error).
PAPER_TABLE6 = {20: {"n": 1, "mean": 8.75}, 32: {"n": 1, "mean": 7.51},
                44: {"n": 1, "mean": 7.17}, 56: {"n": 1, "mean": 6.97},
                110: {"n": 5, "mean": 6.61, "std": 0.16, "best": 6.43},
                1202: {"n": 1, "mean": 7.93}}
PAPER_SCALE = ("He et al. 2015, Table 6: CIFAR-10, 64k iterations of 128 images, 16/32/64 "
               "filters; plain nets only in Fig. 6, plain-110 above 60 %")


def get_sweep(arg=None) -> Sweep:
    name, preset, dataset, seeds = study_arg(arg)
    reference = {"source": PAPER_SCALE, "comparable": name == "paper",
                 "rows": [{"where": {"residual": True, "depth": depth}, **entry}
                          for depth, entry in PAPER_TABLE6.items()]}
    # The preset's own seed count keeps its fewer seeds at the deepest nets (seeds_by_depth).
    return Sweep(preset.runs(dataset, 0 if seeds == preset.seeds else seeds), report={
        "by": ["residual", "depth"], "x": "depth", "panels": "residual",
        "metric": "test/error", "reference": reference,
        "title": f"Plain vs residual nets, {dataset} ({name} preset)"})
