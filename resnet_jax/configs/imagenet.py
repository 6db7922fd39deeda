"""ImageNet ResNets of He et al. 2015, Table 1: ResNet-18/34/50/101/152 and plain-18/34.

    resnet-jax summary --config=resnet_jax/configs/imagenet.py:depth=50 --json

The paper's ImageNet comparison (Table 2, Fig. 4): plain-18/34 against ResNet-18/34, whose
shortcuts are identities with zero-padding (option A, the default up to 34 layers):
    resnet-jax train --config=resnet_jax/configs/imagenet.py:depth=34,residual=false --workdir=DIR
    resnet-jax train --config=resnet_jax/configs/imagenet.py:depth=34 --workdir=DIR
and the deeper nets of Table 3 with projections where the shape changes (option B, the default
from 50 layers): depth=50, 101 or 152.

Arguments after the colon: depth (18, 34, 50, 101, 152), residual, shortcut (A/B/C), block,
dataset, norm, residual_init, seed. Recipe (Sec. 3.4): SGD, momentum 0.9, lr 0.1 divided by 10 on plateaus (here: at
30, 60 and 80 epochs of 1.28M images), weight decay 1e-4, global batch 256, random-resized
224x224 crops and flips; single centre crops for evaluation on the validation set (reported as
test/error). Not here: the paper's colour augmentation and 10-crop testing.
Data: TFDS imagenet2012 prepared as array_record, streamed by pipeline.py (see there).
"""

from resnet_jax.configs import added_keys, cifar, parse_arg

ADDED = added_keys("imagenet")  # the defaults of keys added after the first runs


# The arguments after the colon, with their defaults (a sweep's grid puts these keys there).
ARGS = dict(depth=50, residual=True, shortcut="", block="post", dataset="imagenet2012",
            norm=ADDED["norm"], residual_init=ADDED["residual_init"], seed=0)


def get_config(arg=None):
    a = parse_arg(arg, **ARGS)
    a["shortcut"] = a["shortcut"] or ("A" if a["depth"] < 50 else "B")
    c = cifar.get_config()
    c.model = "imagenet"
    del c["base_width"], c["bottleneck"]  # Table 1 fixes both from the depth
    c.depth, c.residual, c.shortcut, c.block = a["depth"], a["residual"], a["shortcut"], a["block"]
    c.dataset, c.seed, c.warmup_steps = a["dataset"], a["seed"], 0
    c.norm, c.residual_init = a["norm"], a["residual_init"]
    c.norm_groups = ADDED["norm_groups"]  # 32: Wu & He 2018's choice for ImageNet ResNets
    c.image_size = 224  # side of the training crops and evaluation centre crops
    c.input_threads = 16
    c.batch_size = 256
    steps_per_epoch = 1_281_167 // 256
    c.total_steps = 90 * steps_per_epoch
    c.lr_boundaries_steps = tuple(e * steps_per_epoch for e in (30, 60, 80))
    c.eval_every_steps = 5 * steps_per_epoch
    c.checkpoint_every_steps = 5_000
    c.eval_batch_size = 500
    return c
