"""He et al. 2015, Fig. 7: standard deviations of the 3x3 layers' responses.

    python -m experiments.layer_responses --root=runs/degradation-digits

Reads the trained plain and residual nets of depth 20, 56 and 110 from a degradation sweep's ROOT
(seed 0; run `python -m experiments.degradation` first), measures the std of each 3x3 layer's
response (after BN, before the nonlinearity or the addition) on test images, and writes
layer_responses.png/.pdf (top: in layer order; bottom: sorted by magnitude) and
layer_responses.json into ROOT. The paper's finding: residual functions are generally closer to
zero than the plain nets' responses, and deeper ResNets have smaller responses.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax.numpy as jnp

from resnet_jax import data, models, train

DEPTHS = (20, 56, 110)


def responses(run_dir: pathlib.Path, num_images: int) -> list[float]:
    model, _, ds = train.load_trained(run_dir)
    # A fixed random sample: image folders list the test set class by class.
    images = data.normalize(jnp.asarray(data.subset(ds.test, num_images).images),
                            jnp.asarray(data.mean_image(ds.train.images)))
    return models.layer_response_stds(model, images)


def plot(found: dict, root: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(8, 7))
    styles = {False: "--", True: "-"}
    for (depth, residual), stds in sorted(found.items()):
        label = f"{'ResNet' if residual else 'plain'}-{depth}"
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
    fig.suptitle(title)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(root / f"layer_responses.{ext}", dpi=130)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="a degradation sweep's directory")
    parser.add_argument("--num-images", type=int, default=500, help="test images measured")
    parser.add_argument("--depths", default=",".join(map(str, DEPTHS)),
                        help="comma-separated depths to compare (Fig. 7: 20,56,110)")
    args = parser.parse_args(argv)
    root = pathlib.Path(args.root)
    depths = {int(d) for d in args.depths.split(",")}
    found = {}
    for run_dir in sorted(p.parent for p in root.glob("*/summary.json")):
        config = json.loads((run_dir / "config.json").read_text())
        if config["depth"] in depths and config["seed"] == 0:
            found[(config["depth"], config["residual"])] = responses(run_dir, args.num_images)
    if not found:
        print(f"layer_responses: error: no finished depth-{args.depths} runs under {root}: run "
              "python -m experiments.degradation first", file=sys.stderr)
        return 2
    plot(found, root, f"Std of 3x3 layer responses ({root.name})")
    (root / "layer_responses.json").write_text(json.dumps(
        {f"{'ResNet' if r else 'plain'}-{d}": stds for (d, r), stds in sorted(found.items())},
        indent=2) + "\n")
    print(f"wrote {root / 'layer_responses.png'} for "
          + ", ".join(f"{'ResNet' if r else 'plain'}-{d}" for d, r in sorted(found)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
