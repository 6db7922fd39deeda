"""Accuracy A/B: resnet_jax against an independent PyTorch implementation of the same recipe.

    python -m benchmarks.accuracy_ab --dataset=folder:/tmp/cifar10_jpeg --root=/tmp/ab
    python -m benchmarks.accuracy_ab --dataset=digits --root=/tmp/ab-smoke --depth=8 --steps=40
    python -m benchmarks.accuracy_ab --dataset=folder:/tmp/cifar10_jpeg --root=/tmp/ab-onednn \
        --cpu_convolution=onednn   # resnet_jax's convolutions through oneDNN on CPU
    python -m benchmarks.accuracy_ab ... --against=benchmarks/results/accuracy_ab/accuracy_ab.json
                                       # PyTorch's runs of the same recipe read, not retrained

Parameter counts and one-step equalities do not catch a subtly wrong recipe; two independent
implementations trained the same way on the same data do. Both sides train a CIFAR ResNet with
He et al. 2015's recipe (Sec. 4.2): per-pixel mean subtraction, 4-pixel zero padding (image side
/ 8 on other sizes) and a random crop, horizontal flips, SGD with momentum 0.9 and weight decay
1e-4 on every parameter, the learning rate divided by 10 at 1/2 and 3/4 of the schedule, He
initialisation of the convolutions. resnet_jax trains through `train.train_and_evaluate`, the
code path every run takes; PyTorch trains `benchmarks/torch_reference.CifarResNet` with the
augmentation written here in NumPy. Seeds differ between the two (each framework draws its own
initialisation and data order), so the comparison is between distributions: per framework the
final test error over `--seeds` runs, and Welch's t-test on the difference.

Rerunning with the same --root finishes what is missing (finished runs are read back). Writes
ROOT/accuracy_ab.json and ROOT/accuracy_ab.md. `--against=FILE` takes the PyTorch side from an
earlier accuracy_ab.json of the same recipe (every argument but --root and --cpu_convolution the
same) instead of training it again: PyTorch's runs do not depend on resnet_jax's settings.
Needs PyTorch: pip install -e '.[torch]'.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

from benchmarks import import_torch
from resnet_jax.cli import ArgumentParser


def recipe(args) -> dict:
    """The shared schedule, as resnet_jax config overrides."""
    s = args.steps
    return {"total_steps": s, "batch_size": args.batch_size, "learning_rate": args.lr,
            "lr_boundaries_steps": (s // 2, s * 3 // 4), "warmup_steps": 0,
            "log_every_steps": args.log_every, "eval_every_steps": s,
            "checkpoint_every_steps": max(1, s // 4), "log_diagnostics": False}


def train_jax(args, seed: int, workdir: pathlib.Path) -> dict:
    from resnet_jax import train
    from resnet_jax.configs import cifar

    config = cifar.get_config(f"depth={args.depth},base_width={args.base_width},"
                              f"dataset={args.dataset},seed={seed}")
    config.update(recipe(args))
    config.cpu_convolution = args.cpu_convolution
    summary = train.train_and_evaluate(config, str(workdir))
    return {"train/error": summary["train/error"], "test/error": summary["test/error"]}


def train_torch(args, seed: int, ds) -> dict:
    import torch
    import torch.nn.functional as F

    from benchmarks.torch_reference import CifarResNet
    from resnet_jax import data

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images, labels = ds.train.images, ds.train.labels
    n, h, w, c = images.shape
    mean = data.mean_image(images)  # (H, W, C) in [0, 1], as resnet_jax subtracts it
    pad = data.default_padding(h)
    model = CifarResNet(args.depth, True, ds.num_classes, base_width=args.base_width)
    if c != 3:  # digits: one channel
        model.stem[0] = torch.nn.Conv2d(c, args.base_width, 3, 1, 1, bias=False)
        torch.nn.init.kaiming_normal_(model.stem[0].weight, mode="fan_out",
                                      nonlinearity="relu")
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    boundaries = recipe(args)["lr_boundaries_steps"]
    per_epoch = n // args.batch_size
    errors = []
    model.train()
    for step in range(args.steps):
        if step % per_epoch == 0:
            order = rng.permutation(n)  # a fresh shuffle per epoch, the last partial batch dropped
        idx = order[(step % per_epoch) * args.batch_size:][:args.batch_size]
        x = images[idx].astype(np.float32) / 255.0 - mean
        x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        dy, dx = rng.integers(0, 2 * pad + 1, (2, len(idx)))
        x = np.stack([img[a:a + h, b:b + w] for img, a, b in zip(x, dy, dx)])
        flip = rng.random(len(idx)) < 0.5
        x[flip] = x[flip, :, ::-1]
        for group in opt.param_groups:
            group["lr"] = args.lr * 0.1 ** sum(step >= b for b in boundaries)
        logits = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
        y = torch.from_numpy(labels[idx].astype(np.int64))
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        errors.append(100.0 * (logits.argmax(-1) != y).float().mean().item())
    model.eval()
    wrong = 0
    with torch.no_grad():
        for i in range(0, len(ds.test.labels), 1000):
            x = ds.test.images[i:i + 1000].astype(np.float32) / 255.0 - mean
            logits = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
            wrong += int((logits.argmax(-1).numpy() != ds.test.labels[i:i + 1000]).sum())
    # Training error as resnet_jax's summary has it: the mean over the last logging window.
    return {"train/error": float(np.mean(errors[-args.log_every:])),
            "test/error": 100.0 * wrong / len(ds.test.labels)}


def welch(a: list[float], b: list[float]) -> dict:
    """Welch's t-test of equal means (two-sided p from SciPy's t distribution)."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return {"t": None, "p": None}
    t, p = stats.ttest_ind(a, b, equal_var=False)
    return {"t": float(t), "p": float(p)}


def describe(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}" if values else "-"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def report(results: dict, args, seconds: dict) -> str:
    rows = []
    for name in ("resnet_jax", "pytorch"):
        runs = results[name]
        rows.append(f"| {name} | {len(runs)} | "
                    f"{describe([r['train/error'] for r in runs.values()])} | "
                    f"{describe([r['test/error'] for r in runs.values()])} | "
                    f"{', '.join(format(r['test/error'], '.2f') for r in runs.values())} | "
                    f"{seconds.get(name, 0) / 60:.1f} |")
    test = welch([r["test/error"] for r in results["resnet_jax"].values()],
                 [r["test/error"] for r in results["pytorch"].values()])
    verdict = ("not enough runs for a test" if test["p"] is None else
               f"Welch's t = {test['t']:.2f}, p = {test['p']:.2f}: "
               + ("no significant difference at the 5 % level" if test["p"] >= 0.05
                  else "the difference is significant at the 5 % level"))
    return "\n".join([
        f"# Accuracy A/B: ResNet-{args.depth} (base width {args.base_width}), {args.dataset}"
        + ("" if args.cpu_convolution == "eigen" else
           f", resnet_jax's convolutions: {args.cpu_convolution}"),
        "",
        f"{args.steps} iterations of {args.batch_size}, lr {args.lr} divided by 10 at "
        f"{args.steps // 2} and {args.steps * 3 // 4}, momentum 0.9, weight decay 1e-4; "
        "final errors in %, mean +- std over seeds.",
        "",
        "| framework | runs | train error % | test error % | test error per seed % | "
        "minutes (all seeds) |",
        "|---|---:|---:|---:|---|---:|", *rows, "", verdict, ""])


def main(argv=None) -> int:
    parser = ArgumentParser("benchmarks.accuracy_ab", __doc__)
    parser.add_argument("--dataset", required=True,
                        help="resnet_jax dataset name, e.g. folder:/tmp/cifar10_jpeg")
    parser.add_argument("--root", required=True, help="output directory (reruns resume)")
    parser.add_argument("--depth", type=int, default=20, help="CIFAR ResNet depth (6n+2)")
    parser.add_argument("--base_width", type=int, default=8, help="filters of the first stage")
    parser.add_argument("--steps", type=int, default=2000, help="training iterations")
    parser.add_argument("--batch_size", type=int, default=64, help="images per iteration")
    parser.add_argument("--lr", type=float, default=0.05,
                        help="learning rate, divided by 10 at 1/2 and 3/4 of --steps")
    parser.add_argument("--log_every", type=int, default=50, help="iterations between records")
    parser.add_argument("--seeds", type=int, default=3, help="runs per framework")
    parser.add_argument("--cpu_convolution", choices=("eigen", "onednn"), default="eigen",
                        help="resnet_jax's convolutions on CPU (config.cpu_convolution)")
    parser.add_argument("--against", help="an earlier accuracy_ab.json of the same recipe: its "
                        "PyTorch runs instead of training them again")
    args = parser.parse_args(argv)
    against = None
    if args.against:
        try:
            against = json.loads(pathlib.Path(args.against).read_text())
        except (OSError, ValueError) as e:
            parser.error(f"--against={args.against}: cannot read it as an accuracy_ab.json ({e})")
        free = ("root", "cpu_convolution", "against")
        theirs = {k: v for k, v in against.get("args", {}).items() if k not in free}
        ours = {k: v for k, v in vars(args).items() if k not in free}
        if theirs != ours:
            differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            parser.error(f"--against={args.against} ran another recipe ({', '.join(differ)} "
                         "differ): pass the same arguments, or leave --against out")
    torch = import_torch("accuracy_ab")
    if torch is None:
        return 2
    import jax

    from resnet_jax import data

    torch.set_num_threads(os.cpu_count() or 1)
    root = pathlib.Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    out = root / "accuracy_ab.json"
    saved = json.loads(out.read_text()) if out.exists() else {}
    if saved and saved.get("args") != vars(args):
        print(f"accuracy_ab: error: {out} holds a run with other arguments: use a new --root",
              file=sys.stderr)
        return 2
    results = saved.get("results", {"resnet_jax": {}, "pytorch": {}})
    seconds = saved.get("seconds", {})
    if against is not None:  # read, not trained: at most --seeds of them, as trained ones would be
        results["pytorch"] = {k: v for k, v in against["results"]["pytorch"].items()
                              if int(k) < args.seeds}
        seconds["pytorch"] = against.get("seconds", {}).get("pytorch", 0)
    ds = data.load(args.dataset)

    def save():
        out.write_text(json.dumps({"args": vars(args), "results": results, "seconds": seconds,
                                   "versions": {"jax": jax.__version__,
                                                "torch": torch.__version__},
                                   "machine": f"{platform.processor() or platform.machine()}, "
                                              f"{os.cpu_count()} cores"}, indent=2) + "\n")

    for seed in range(args.seeds):  # interleaved, so a partial result compares like with like
        for name in ("resnet_jax", "pytorch"):
            if str(seed) in results[name]:
                continue
            start = time.perf_counter()
            results[name][str(seed)] = (train_jax(args, seed, root / f"jax-seed{seed}")
                                        if name == "resnet_jax" else train_torch(args, seed, ds))
            seconds[name] = seconds.get(name, 0) + time.perf_counter() - start
            print(f"{name} seed {seed}: {results[name][str(seed)]}", flush=True)
            save()
    text = report(results, args, seconds) + (
        f"\nThe PyTorch runs are read from {args.against}, not trained again.\n"
        if args.against else "")
    (root / "accuracy_ab.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
