"""CIFAR ResNets and plain nets of He et al. 2015, Sec. 4.2: the paper's recipe by default.

    resnet-jax train --config=resnet_jax/configs/cifar.py:depth=56,residual=false --workdir=DIR

Arguments after the colon: depth (6n+2), residual (true/false), shortcut (A/B/C), block
(post/pre), bottleneck (true: depth 9n+2, He et al. 2016), width (multiplier of 16/32/64 filters), base_width (16), dataset (cifar10, cifar100, digits, synthetic,
folder:<path>), norm (batch/group/none), residual_init (standard/zero_gamma/fixup/skipinit), seed.
Every number below is a config key: override with --config.KEY=VALUE.

Recipe (Sec. 4.2): SGD, momentum 0.9, lr 0.1 divided by 10 at 32k and 48k iterations, 64k in
total, weight decay 1e-4, global batch 128, 4-pixel pad + random crop + horizontal flip, per-pixel
mean subtraction. ResNet-110 (and deeper) warms up at lr 0.01 until the training error is below
80 % (`warmup_until_error=80`, about 400 iterations in the paper). Batch-norm statistics: over the
whole global batch here; the paper's 2 GPUs x 64 images are `bn_group_size=64`, which the
degradation experiment's `paper` preset sets. Expected test error on CIFAR-10 (Table 6):
ResNet-20/32/44/56 8.75/7.51/7.17/6.97 % (one run each), ResNet-110 6.43 % (best of 5 runs;
6.61 +- 0.16 % mean).
"""

import ml_collections

from resnet_jax.configs import added_keys, parse_arg, warmup

ADDED = added_keys("cifar")  # the defaults of keys added after the first runs


# The arguments after the colon, with their defaults (a sweep's grid puts these keys there).
ARGS = dict(depth=20, residual=True, shortcut="A", block="post", bottleneck=False, width=1,
            base_width=16, dataset="cifar10", norm=ADDED["norm"],
            residual_init=ADDED["residual_init"], seed=0)


def get_config(arg=None):
    a = parse_arg(arg, **ARGS)
    c = ml_collections.ConfigDict()
    # Model.
    c.model = "cifar"
    c.depth = a["depth"]
    c.residual = a["residual"]
    c.shortcut = a["shortcut"]
    c.block = a["block"]  # 'post' (He et al. 2015) or 'pre' (He et al. 2016)
    c.bottleneck = a["bottleneck"]  # 1x1-3x3-1x1 blocks, depth 9n+2 (ResNet-164, 2016)
    c.width = a["width"]  # multiplier of the stage widths
    c.base_width = a["base_width"]  # filters of the first stage: 16 in the paper
    c.dtype = "float32"  # compute dtype; parameters stay float32 ('bfloat16' for speed)
    c.bn_momentum = 0.9
    # 0: batch-norm statistics over the whole global batch. The paper ran 2 GPUs x 64 images,
    # i.e. bn_group_size=64; the value never changes with the device count.
    c.bn_group_size = 0
    # Ablations beyond the paper (models.py, docs/training.md): the normalisation, 'batch' (the
    # paper's), 'group' (Wu & He 2018) or 'none'; GroupNorm's group count, 8 as the narrowest
    # layers have 16 channels here and 8 in the CPU presets (Wu & He's 32 divides neither); how
    # each residual branch starts, 'standard' (the paper's), 'zero_gamma', 'fixup' (with
    # norm='none') or 'skipinit'.
    c.norm = a["norm"]
    c.norm_groups = ADDED["norm_groups"]
    c.residual_init = a["residual_init"]
    # Identical blocks as one BlockRun under lax.scan: the same numbers, compile time flat in
    # depth (4 s for ResNet-20, 110 or 1202 on 2 CPU cores; unrolled ResNet-110: 14 s), but the
    # CPU step about 5 % slower (benchmarks/RESULTS.md), so off by default. It changes the
    # checkpoint layout (each run's parameters stacked), so a run cannot resume across it.
    c.scan_blocks = False
    # What runs the float32 convolutions on CPU (nothing else): 'eigen', XLA's own, or
    # 'onednn', oneDNN through XLA FFI (resnet_jax/onednn.py; needs g++ and Debian's
    # libdnnl-dev). oneDNN sums in another order: equal to float32 rounding, not bit for bit;
    # 1.45-2.3x the images/s of a ResNet-20 step on 2 busy cores (benchmarks/RESULTS.md).
    c.cpu_convolution = ADDED["cpu_convolution"]

    # Data.
    c.dataset = a["dataset"]
    c.tfds_data_dir = ""  # '' = TFDS's default (~/tensorflow_datasets)
    # 0: the dataset's own size; a divisor of it downsamples every image (train and test) by
    # averaging pixel blocks, e.g. 16 on CIFAR: 4x cheaper steps for CPU-scale studies.
    c.image_size = 0
    # 0: every training example; N: a fixed random N of them (the same for every seed), e.g. for
    # many epochs of a small set within a CPU budget. The test split is always whole.
    c.train_size = 0
    c.validation_size = 0  # 5000 gives the paper's 45k/5k train/validation split
    c.crop_padding = -1  # pixels of padding before the random crop; -1 = image side / 8 (4 on 32)
    c.flip = True
    # Streamed datasets (ImageNet, pipeline.py): host threads that decode and augment batches,
    # and grain worker processes beside them (0: threads in the training process only).
    # Neither changes the batches.
    c.input_threads = 8
    c.input_workers = 0

    # Optimisation (schedule in iterations; independent of the number of devices).
    c.batch_size = 128  # global
    c.total_steps = 64_000
    c.learning_rate = 0.1
    c.lr_boundaries_steps = (32_000, 48_000)
    c.lr_decay_factor = 0.1
    # Warm-up (step.LrSchedule): the paper's ResNet-110 trains at lr 0.01 "until the training
    # error is below 80 % (about 400 iterations)", then at 0.1. With warmup_until_error > 0 the
    # warm-up ends after the first step at which the mean error of the last
    # warmup_error_window_steps batches is below it, at warmup_steps at the latest (a cap, here
    # 5x the paper's 400); with warmup_until_error = 0 it lasts exactly warmup_steps. Which
    # depths warm up, and for how long: `configs.warmup`.
    c.update(warmup(c.depth))
    c.warmup_learning_rate = 0.01
    c.momentum = 0.9  # SGD's and LARS's momentum, Adam's b1
    c.weight_decay = 1e-4
    # Beyond the paper (optim.py, docs/training.md): the optimiser, 'sgd' (the paper's: momentum,
    # L2 decay on every parameter), 'nesterov', 'adamw' or 'lars', with Adam's b2 and LARS's
    # trust coefficient (You et al. 2017); the schedule after the warm-up, 'step' (the paper's
    # boundaries above) or 'cosine' (to 0 at total_steps); the warm-up's shape, 'constant' at
    # warmup_learning_rate (the paper's) or 'linear' from it to learning_rate over warmup_steps
    # (Goyal et al. 2017).
    c.optimizer = ADDED["optimizer"]
    c.adam_b2 = ADDED["adam_b2"]
    c.lars_trust_coefficient = ADDED["lars_trust_coefficient"]
    c.schedule = ADDED["schedule"]
    c.warmup_shape = ADDED["warmup_shape"]

    # Execution and outputs.
    c.parallelism = "jit"  # 'jit' over a device mesh, or 'pmap'
    c.num_devices = 0  # 0 = all local devices
    # Train steps per compiled call: K > 1 runs up to K steps (their batches cut and augmented
    # on the device) in one call, so the host's cost per call (about 1 ms) is paid once per K
    # steps; the same numbers as 1 (bit for bit on CPU). Calls end early where a step is
    # logged, evaluated or saved: pick K dividing those intervals. Needs the data on the
    # devices (not a streamed dataset). Measured: benchmarks/RESULTS.md.
    c.steps_per_call = 1
    c.seed = a["seed"]  # initialisation, data order and augmentation all follow from it
    c.log_every_steps = 100
    # Depth diagnostics in every record: gradient norm per stage, ||F(x)||/||x|| per residual
    # block, std of each 3x3 layer's response (Fig. 7). Scalars from the same forward pass.
    c.log_diagnostics = True
    c.eval_every_steps = 2_000
    c.eval_batch_size = 1_000
    # Evaluations before the last use this many test (and validation) images, a fixed random
    # subset, to keep curves cheap on slow hardware; the final evaluation always uses them all.
    c.eval_subset = 0  # 0 = every evaluation uses the whole split
    c.checkpoint_every_steps = 2_000
    c.keep_checkpoints = 2
    # (first, end): a jax.profiler trace of train steps first..end-1 in WORKDIR/profile, e.g.
    # (100, 110), past the first step (it compiles); () = off. How to open it: docs/training.md.
    c.profile_steps = ()
    # "Not converged" means what the paper's failed runs are: the net did not train. A run is
    # reported so (summary.json `converged: false`, listed apart from the means) when its final
    # training error (the mean over the last logging window) is at least this fraction of
    # chance-level error, 100 x (1 - 1/classes): 81 % on 10 classes, 89.1 % on 100. A net that
    # trains, however badly (the degradation of deep plain nets), has converged.
    c.not_converged_fraction_of_chance = 0.9
    return c
