"""He et al. 2015, Fig. 7: standard deviations of the 3x3 layers' responses.

    python -m experiments.layer_responses --root=runs/degradation-digits

Reads the trained plain and residual nets of depth 20, 56 and 110 from a degradation sweep's ROOT
(seed 0; run experiments/sweeps/degradation.py first), measures the std of each 3x3 layer's
response (after BN, before the nonlinearity or the addition) on test images, and writes
layer_responses.png/.pdf (top: in layer order; bottom: sorted by magnitude) and
layer_responses.json into ROOT. The paper's finding: residual functions are generally closer to
zero than the plain nets' responses, and deeper ResNets have smaller responses.

Batch norm is measured in evaluation mode, after "precise BN" (models.precise_batch_stats): each
layer's statistics recomputed as the plain average of its batch statistics over
--precise-bn-images training images (unaugmented, a fixed random sample, in batches of the
run's BN group), so that every net, trained or not, is measured with statistics of its final
weights. The running averages from training lag behind them: in nets that did not train they
gave responses of 1e8 (plain-110, digits). --precise-bn-images=0 measures with the running
averages as they are. The JSON and the figure say which was done.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax.numpy as jnp
import numpy as np

import resnet_jax
from resnet_jax import data, models
from resnet_jax.cli import ArgumentParser, int_list
from resnet_jax.configs import net_name
from resnet_jax.errors import USER_ERRORS
from resnet_jax.rundir import CONFIG_JSON, SUMMARY_JSON, read_run_json

DEPTHS = (20, 56, 110)


def responses(run_dir: pathlib.Path, num_images: int, bn_images: int) -> list[float]:
    net = resnet_jax.load(run_dir)
    model, config, ds = net.model, net.config, net.dataset
    mean = jnp.asarray(net.preprocessing.mean)
    if bn_images:
        # Shuffled: image folders list the training set class by class, and a batch of one
        # class has other statistics. Whole batches of the training BN group.
        batch = config.bn_group_size or config.batch_size
        order = np.random.default_rng(0).permutation(len(ds.train.labels))
        order = order[:max(1, min(bn_images, len(order)) // batch) * batch]
        models.precise_batch_stats(model, [data.normalize(jnp.asarray(ds.train.images[i]), mean)
                                           for i in np.split(order, len(order) // batch)])
    # A fixed random sample: image folders list the test set class by class.
    images = data.normalize(jnp.asarray(data.subset(ds.test, num_images).images), mean)
    return models.layer_response_stds(model, images)


def batch_norm_label(bn_images: int) -> str:
    if bn_images:
        return (f"precise BN: statistics recomputed from {bn_images} training images (average "
                "batch statistics in training mode, whole batches of the run's BN group), then "
                "evaluation mode")
    return "evaluation mode with the running BN statistics from training"


def plot(found: dict, root: pathlib.Path, title: str, bn_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(8, 7))
    styles = {False: "--", True: "-"}
    for (depth, residual), stds in sorted(found.items()):
        label = net_name(depth, residual)
        axes[0].plot(range(1, len(stds) + 1), stds, styles[residual], label=label)
        axes[1].plot(range(1, len(stds) + 1), sorted(stds, reverse=True), styles[residual],
                     label=label)
    axes[0].set_xlabel("layer index (original)")
    axes[1].set_xlabel("layer index (sorted by magnitude)")
    for ax in axes:
        ax.set_ylabel("std")
        ax.set_yscale("log")  # a plain net that failed to train can respond 1000x larger
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}\n{bn_label}", fontsize=10)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(root / f"layer_responses.{ext}", dpi=130)
    plt.close(fig)


def main(argv=None) -> int:
    parser = ArgumentParser("experiments.layer_responses", __doc__)
    parser.add_argument("--root", required=True, help="a degradation sweep's directory")
    parser.add_argument("--num-images", type=int, default=500, help="test images measured")
    parser.add_argument("--depths", type=int_list, default=",".join(map(str, DEPTHS)),
                        help="comma-separated depths to compare (Fig. 7: 20,56,110)")
    parser.add_argument("--precise-bn-images", type=int, default=1024,
                        help="training images to recompute BN statistics from before measuring "
                             "(precise BN); 0: the running statistics from training")
    args = parser.parse_args(argv)
    if args.precise_bn_images < 0 or args.num_images < 1:
        parser.error(f"--num-images={args.num_images} must be positive and --precise-bn-images="
                     f"{args.precise_bn_images} at least 0 (0: running statistics)")
    root = pathlib.Path(args.root)
    depths = set(args.depths)
    found = {}
    try:
        for run_dir in sorted(p.parent for p in root.glob(f"*/{SUMMARY_JSON}")):
            config = read_run_json(run_dir / CONFIG_JSON)
            if config["depth"] in depths and config["seed"] == 0:
                found[(config["depth"], config["residual"])] = responses(
                    run_dir, args.num_images, args.precise_bn_images)
    except USER_ERRORS as e:  # a damaged run, its data gone or changed
        print(f"layer_responses: error: {e}", file=sys.stderr)
        return 2
    if not found:
        depths = ",".join(map(str, args.depths))
        print(f"layer_responses: error: no finished depth-{depths} runs under {root}: run "
              "python -m experiments.sweep --sweep=experiments/sweeps/degradation.py first",
              file=sys.stderr)
        return 2
    bn_label = batch_norm_label(args.precise_bn_images)
    plot(found, root, f"Std of 3x3 layer responses ({root.name})", bn_label)
    (root / "layer_responses.json").write_text(json.dumps(
        {"batch_norm": bn_label, "precise_bn_images": args.precise_bn_images,
         "test_images": args.num_images,
         "response_std": {net_name(d, r): stds
                          for (d, r), stds in sorted(found.items())}}, indent=2) + "\n")
    print(f"wrote {root / 'layer_responses.png'} for "
          + ", ".join(net_name(d, r) for d, r in sorted(found)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
