"""The scales a study runs at: schedule, data, widths and seeds (the degradation presets).

    from experiments.sweeps.presets import PRESETS
    PRESETS["digits"].schedule(56)   # config overrides of a 56-layer run at the digits scale

Presets:
  paper      CIFAR-10 from TFDS, 64k iterations, 5 seeds, batch-norm statistics per 64 images
             (the paper's 2 GPUs x 64), warm-up for 110 and deeper by the paper's rule (lr 0.01
             until the training error of the last 20 batches is below 80 %, at most 2,000
             iterations), plus ResNet-1202 in the degradation sweep. Wall time not yet measured
             on a GPU here.
  cifar-cpu  real CIFAR-10 (folder: copy or TFDS), 1 seed, 500 iterations of 64 at lr 0.05,
             filters 8/16/32. About an hour for the degradation sweep on 2 CPU cores
             (experiments/results/cifar-cpu).
  cifar16-cpu  CIFAR-10 at 16x16 (pixel-block means, `image_size=16`), 2 seeds, 6,000 iterations
             of 64 at lr 0.05, filters 8/16/32, no per-layer diagnostics: the search for both
             halves of Fig. 6 on a CPU (experiments/results/cifar16-cpu/). About 6 hours on 2
             CPU cores for the degradation sweep: run it in pieces with --index.
  cifar16-12k  cifar16-cpu at 12,000 iterations, 3 seeds (2 at 110 layers): the left half of
             Fig. 6 and the right half up to 44 layers on real CIFAR-10 on a CPU; ResNet-56 and
             ResNet-110 end within their seeds' spread of ResNet-20
             (experiments/results/cifar16-12k/). About 8 hours of 2 idle CPU cores one run at a
             time: run it in pieces with --index (two pieces at a time, each pinned to one core
             with taskset, trained the 110-layer nets in half the time).
  digits     scikit-learn's 8x8 digits (offline), 1 seed, 400 iterations of 64 at lr 0.02; the
             degradation sweep in under 15 minutes on 2 CPU cores.
  smoke      seconds, for tests: depths 8 and 14 only.
"""

from __future__ import annotations

import dataclasses

from experiments.declaration import Run
from resnet_jax.configs import parse_arg, warmup


@dataclasses.dataclass(frozen=True)
class Preset:
    dataset: str
    depths: tuple[int, ...] = (20, 32, 44, 56, 110)
    residual_only_depths: tuple[int, ...] = ()
    seeds: int = 1
    # Fewer seeds at these depths (e.g. {110: 2}): the deepest nets cost the most CPU time.
    seeds_by_depth: dict = dataclasses.field(default_factory=dict)
    total_steps: int = 64_000
    batch_size: int = 128
    learning_rate: float = 0.1  # the paper's; tiny sets with short schedules need less
    width: int = 1
    base_width: int = 16  # the paper's 16/32/64 filters; narrower for CPU-scale sweeps
    # Batch-norm statistics per this many images of each global batch (0: all of it); the
    # paper's 2 GPUs x 64 images are 64.
    bn_group_size: int = 0
    log_every_steps: int = 100
    eval_every_steps: int = 2_000
    eval_subset: int = 0  # test images per evaluation before the last (0 = all; the last: all)
    image_size: int = 0  # 0: the dataset's own; 16 on CIFAR: pixel-block means, 4x cheaper steps
    log_diagnostics: bool = True  # per-layer diagnostics in every record; off saves CPU time
    # Blocks under scan from this depth: ResNet-1202 compiles in seconds, not minutes; the step
    # is about 5 % slower on CPU, so shallower nets stay unrolled (benchmarks/RESULTS.md).
    scan_from_depth: int = 200

    def schedule(self, depth: int) -> dict:
        """Config overrides: the paper's schedule scaled to `total_steps` iterations."""
        s = self.total_steps
        return {
            "total_steps": s, "batch_size": self.batch_size,
            "learning_rate": self.learning_rate, "warmup_learning_rate": self.learning_rate / 10,
            "lr_boundaries_steps": (s // 2, s * 3 // 4),  # 32k and 48k of 64k, scaled
            **warmup(depth, s),  # the paper's rule for ResNet-110 and deeper, scaled
            "bn_group_size": self.bn_group_size,
            "log_every_steps": self.log_every_steps, "eval_every_steps": self.eval_every_steps,
            "eval_subset": self.eval_subset,
            "image_size": self.image_size, "log_diagnostics": self.log_diagnostics,
            "checkpoint_every_steps": self.eval_every_steps,
            "scan_blocks": depth >= self.scan_from_depth,
        }

    def runs(self, dataset: str | None = None, seeds: int = 0) -> list[Run]:
        """The degradation sweep: plain and residual nets at each depth, `seeds` seeds (0: the
        preset's)."""
        runs = []
        base = "" if self.base_width == 16 else f",base_width={self.base_width}"
        for depth in sorted(self.depths + self.residual_only_depths):
            for residual in (False, True):
                if residual or depth not in self.residual_only_depths:
                    runs += [Run(f"depth={depth},residual={str(residual).lower()},"
                                 f"width={self.width}{base},dataset={dataset or self.dataset},"
                                 f"seed={seed}", self.schedule(depth))
                             for seed in range(seeds or self.seeds_by_depth.get(depth,
                                                                                 self.seeds))]
        return runs


PRESETS = {
    "paper": Preset(dataset="cifar10", residual_only_depths=(1202,), seeds=5, bn_group_size=64),
    # Sized by timing single steps on 2 EPYC cores (batch 64, base width 8): 0.21 s for 20
    # layers, 0.64 s for 56, 1.68 s for 110. Batch 64 at the paper's lr scaled to it (0.05):
    # more updates in the same time than 128. Evaluations before the last use 2,000 test images.
    "cifar-cpu": Preset(dataset="cifar10", total_steps=500, batch_size=64, learning_rate=0.05,
                        base_width=8, log_every_steps=25, eval_every_steps=125,
                        eval_subset=2_000),
    # Both halves of Fig. 6 need the deeper ResNets past the point where they overtake the
    # shallower ones, which 500 iterations at 32x32 are not (ResNet-20 is the best ResNet there).
    # At 16x16 a step costs a quarter; the iterations are what the measurements in
    # experiments/results/cifar16-cpu/README.md show the crossing needs. Hours on 2 CPU cores:
    # run it in pieces with --index (each piece resumes and is skipped once finished).
    "cifar16-cpu": Preset(dataset="cifar10", total_steps=6_000, batch_size=64, learning_rate=0.05,
                          base_width=8, image_size=16, seeds=2, log_every_steps=100,
                          eval_every_steps=1_000, eval_subset=2_000, log_diagnostics=False),
    # cifar16-cpu at twice the iterations, 3 seeds (2 at 110 layers), chosen from the gap over
    # iterations there and a one-seed probe at 12,000 (ResNet-56 ahead of ResNet-20 by 1-2 points
    # from 7,000 on). Over 3 seeds the right half shows up to 44 layers only: ResNet-56 ends 0.6
    # points ahead, inside a 2-point spread (experiments/results/cifar16-12k, with a projection
    # of the length that might show it). Run it in pieces with --index.
    "cifar16-12k": Preset(dataset="cifar10", total_steps=12_000, batch_size=64,
                          learning_rate=0.05, base_width=8, image_size=16, seeds=3,
                          seeds_by_depth={110: 2}, log_every_steps=100, eval_every_steps=1_000,
                          eval_subset=2_000, log_diagnostics=False),
    # lr 0.02: at 0.1, 400 iterations on 1,497 8x8 images leave even residual nets of 44+ layers
    # far from trained (ResNet-56: 72 % training error after 120 iterations at 0.1, 25 % at 0.02;
    # plain-56 stays at 83 % either way), which would hide what the figure is about.
    "digits": Preset(dataset="digits", total_steps=400, batch_size=64, learning_rate=0.02,
                     log_every_steps=20, eval_every_steps=100),
    "smoke": Preset(dataset="digits", depths=(8, 14), total_steps=6, batch_size=32,
                    log_every_steps=2, eval_every_steps=6),
}


def study_arg(arg: str | None) -> tuple[str, Preset, str, int]:
    """A study sweep file's argument, 'preset=NAME,dataset=D,seeds=N,learning_rate=LR' (each
    optional: digits, the preset's dataset, seeds and learning rate) -> (preset name, preset,
    dataset, seeds). A learning rate replaces the preset's, the warm-up's tenth of it included."""
    a = parse_arg(arg, preset="digits", dataset="", seeds=0, learning_rate=0.0)
    if a["preset"] not in PRESETS:
        raise ValueError(f"unknown preset {a['preset']!r}: use one of {', '.join(PRESETS)}")
    if a["seeds"] < 0:
        raise ValueError(f"seeds={a['seeds']}: use 1 or more (0: the preset's)")
    if a["learning_rate"] < 0:
        raise ValueError(f"learning_rate={a['learning_rate']}: use a positive rate (0: the "
                         "preset's)")
    preset = PRESETS[a["preset"]]
    if a["learning_rate"]:
        preset = dataclasses.replace(preset, learning_rate=a["learning_rate"])
    return a["preset"], preset, a["dataset"] or preset.dataset, a["seeds"] or preset.seeds
