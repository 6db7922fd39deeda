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

from resnet_jax import data, models, pipeline, train


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

        @jax.jit  # the computation of training's evaluation (train.make_eval_step)
        def forward(state, images):
            model = nnx.merge(graphdef, state, copy=True)
            return models.forward(model, data.normalize(images, mean), train=False)[0]

        return functools.partial(forward, state)


def load(workdir: str | pathlib.Path, step: int | None = None) -> Trained:
    """The net of the run in `workdir` at its latest readable checkpoint, or at checkpoint
    `step`. A missing or damaged run is a train.ConfigError (one line naming the fix)."""
    workdir = pathlib.Path(workdir)
    graphdef, state, config, ds, step = train.restore_trained(workdir, step)
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    return Trained(config=config, model=model,
                   params=nnx.to_pure_dict(state.params),
                   batch_stats=nnx.to_pure_dict(state.batch_stats),
                   preprocessing=read_preprocessing(workdir, config, ds), step=step, dataset=ds)


def read_preprocessing(workdir: pathlib.Path, config,
                       ds: data.Dataset | None) -> data.Preprocessing:
    """The preprocessing saved in `workdir`; for a run from before it was saved, the same
    recomputed from `ds` (the run's dataset as `train.restore_trained` loads it), said on
    stderr. Writes nothing (the run trains no further to save it; a resumed run does)."""
    saved = data.Preprocessing.read(workdir)
    if saved is not None:
        return saved
    if ds is None:  # streamed: a constant of the pipeline
        prep = data.Preprocessing(np.asarray(pipeline.MEAN_RGB, np.float32), 0)
    else:
        prep = data.Preprocessing(data.mean_image(ds.train.images), config.get("image_size", 0))
    print(f"{workdir} has no {data.PREPROCESSING} (trained before it was saved): recomputed "
          "its mean image from the training set", file=sys.stderr, flush=True)
    return prep
