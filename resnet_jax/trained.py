"""A trained net in your own code: `resnet_jax.load(workdir)`.

    import resnet_jax
    net = resnet_jax.load("runs/r20")            # latest readable checkpoint; step=N for another
    labels = net.predict(images)                 # uint8 images as the dataset yields them
    logits = net.model(net.preprocessing(images), train=False)   # the NNX model itself

The run's preprocessing (its mean image and image size, `data.Preprocessing`) is read from the
workdir, where training saves it when it starts; runs from before that get it recomputed from
their training set, said in one line on stderr. Nothing in the workdir is written.
docs/trained.md has the same with plain Orbax and Flax, without importing resnet_jax.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from resnet_jax import data, models, pipeline, rundir
from resnet_jax.checkpoint import Checkpointer, SetupMismatch
from resnet_jax.configs.check import check_keys
from resnet_jax.errors import ConfigError
from resnet_jax.step import (create_lr_schedule, create_model, create_optimizer,
                             create_train_state)


@dataclasses.dataclass(frozen=True, eq=False)
class Trained:
    """A run's net at one checkpoint. `model(x, train=False)` takes `preprocessing(images)`;
    `params` and `batch_stats` are the same weights as plain nested dicts of arrays
    (`nnx.to_pure_dict`), the layout of the checkpoint's `params` and `batch_stats`."""

    config: ml_collections.ConfigDict
    model: nnx.Module
    params: dict[str, Any]
    batch_stats: dict[str, Any]
    preprocessing: data.Preprocessing
    step: int
    dataset: data.Dataset | None  # as the run trained on it; None for streamed sets (ImageNet)

    def logits(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """(N, classes) float32 logits of uint8 images (N, H, W, C), in batches of `batch_size`
        (default: the run's eval_batch_size), each padded to it so that one program serves all."""
        images = self.preprocessing.resize(images)
        batch_size = batch_size or self.config.eval_batch_size
        split = data.Split(images, np.zeros(len(images), np.int32))
        batches = data.eval_batches(split, batch_size)["image"]
        out = np.concatenate([np.asarray(self._forward(b)) for b in batches])
        return out[:len(images)]

    def predict(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """The predicted class (int) of each uint8 image (N, H, W, C), as training's evaluation
        counts it: test error = 100 * mean(predict(test images) != test labels)."""
        return self.logits(images, batch_size).argmax(-1)

    @functools.cached_property
    def _forward(self):
        graphdef, state = nnx.split(self.model)
        mean = jax.numpy.asarray(self.preprocessing.mean)

        @jax.jit  # the computation of training's evaluation (step.make_eval_step)
        def forward(state, images):
            model = nnx.merge(graphdef, state, copy=True)
            return models.forward(model, data.normalize(images, mean), train=False)[0]

        return functools.partial(forward, state)


def load(workdir: str | pathlib.Path, step: int | None = None) -> Trained:
    """The net of the run in `workdir` at its latest readable checkpoint, or at checkpoint
    `step`. A missing or damaged run is a ConfigError (one line naming the fix)."""
    workdir = pathlib.Path(workdir)
    graphdef, state, config, ds, step = restore_trained(workdir, step)
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    return Trained(config=config, model=model,
                   params=nnx.to_pure_dict(state.params),
                   batch_stats=nnx.to_pure_dict(state.batch_stats),
                   preprocessing=read_preprocessing(workdir, config, ds), step=step, dataset=ds)


def read_preprocessing(workdir: pathlib.Path, config,
                       ds: data.Dataset | None) -> data.Preprocessing:
    """The preprocessing saved in `workdir`; for a run from before it was saved, the same
    recomputed from `ds` (the run's dataset as `restore_trained` loads it), said on
    stderr. Writes nothing (the run trains no further to save it; a resumed run does)."""
    saved = data.Preprocessing.read(workdir)
    if saved is not None:
        return saved
    if ds is None:  # streamed: a constant of the pipeline
        prep = data.Preprocessing(np.asarray(pipeline.MEAN_RGB, np.float32), 0)
    else:
        prep = data.Preprocessing(data.mean_image(ds.train.images), config.image_size)
    print(f"{workdir} has no {rundir.PREPROCESSING} (trained before it was saved): recomputed "
          "its mean image from the training set", file=sys.stderr, flush=True)
    return prep


def restore_trained(workdir: str | pathlib.Path, step: int | None = None):
    """(graphdef, train state, config, dataset, the step read) of a run's latest readable
    checkpoint, or of checkpoint `step` (`resnet_jax.load` is the public way in). The dataset
    is None for streamed datasets (ImageNet): they are never loaded whole.

    Reads only (a damaged newest checkpoint stays where it is, for the run's own rerun to deal
    with) and prints which step it loaded, and so whether it is the one summary.json reports.
    """
    wanted, workdir = step, pathlib.Path(workdir)
    path = workdir / rundir.CONFIG_JSON
    if not path.exists():
        raise ConfigError(f"{workdir} holds no run (no {path.name}): pass a run's --workdir")
    config = ml_collections.ConfigDict(rundir.read_run_json(path))
    check_keys(path, config)
    data_dir = config.tfds_data_dir or None
    if pipeline.is_streamed(config.dataset):
        ds, num_classes, in_channels = None, pipeline.num_classes(config.dataset, data_dir), 3
    else:
        ds = data.load_for(config)
        num_classes, in_channels = ds.num_classes, ds.train.images.shape[-1]
    model = create_model(config, num_classes=num_classes, in_channels=in_channels)
    graphdef, state = create_train_state(model, create_optimizer(config),
                                         create_lr_schedule(config))
    if not (workdir / rundir.CHECKPOINTS).is_dir():
        raise ConfigError(f"{workdir} has no checkpoints: train it first")
    checkpointer = Checkpointer(workdir / rundir.CHECKPOINTS, keep=config.keep_checkpoints,
                                read_only=True)
    latest = rundir.latest_step(workdir)
    try:
        step, restored, _, unreadable = checkpointer.read_latest(
            state, None if wanted is None else (wanted,))
    except SetupMismatch as e:
        raise ConfigError(f"{workdir} holds checkpoints of a different setup ({e}): the data "
                          "or code changed since it was trained") from None
    finally:
        checkpointer.close()
    if restored is None and wanted is not None and latest is not None:
        raise ConfigError(f"checkpoint {wanted} of {workdir} "
                          + ("cannot be read" if unreadable else "does not exist")
                          + f": pick another step, e.g. the latest, {latest}")
    if restored is None:
        raise ConfigError(f"{workdir} has no readable checkpoint: train it first")
    summary_path = workdir / rundir.SUMMARY_JSON
    summary = rundir.read_run_json(summary_path) if summary_path.exists() else {}
    print(f"loaded checkpoint {step} of {workdir}" + (
        f" (its summary.json says step {summary['step']}: the newer checkpoints could not be "
        "read)" if wanted is None and summary.get("step", step) > step else ""), flush=True)
    return graphdef, restored, config, ds, step
