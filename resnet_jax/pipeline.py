"""Streamed datasets: ImageNet (TFDS `imagenet2012`) decoded and augmented on the hosts by a
grain pipeline, each process reading only the examples its own devices train on.

CIFAR-sized sets live on the devices (data.py). ImageNet's 1.28M JPEGs do not, so here every
process reads its share of each batch from `tfds.data_source` (ArrayRecord: random access, no
TensorFlow), decodes, crops and flips it in threads (or grain worker processes), and hands
uint8 batches to the devices, which subtract the mean. The images arrive still encoded and are
decoded by the crop itself (`crop`), which reads a JPEG's size from its header first and decodes
it at 1/2, 1/4 or 1/8 scale where the crop keeps enough pixels (JPEG draft mode).

Batches are functions of (seed, step), as on the devices:
  - global example position g = step * batch_size + row of the batch; grain's shuffle + repeat
    gives every epoch its own permutation, and grain's random_map draws each example's crop and
    flip from a generator seeded by (seed, g);
  - process p of P reads rows [p * B/P, (p+1) * B/P) of every global batch of B: the rows its
    devices hold in the data-sharded global batch.
So the global batch does not depend on the number of processes, threads or workers, and a
resumed run reads exactly what an unbroken run would have (tests/test_pipeline.py).

Preparing imagenet2012 (once, on a machine with the ILSVRC2012 tars; TFDS cannot download it):
    put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in ~/tensorflow_datasets/downloads/manual
    in the checkout: pip install -e '.[prepare]'
    tfds build imagenet2012 --file_format=array_record
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from PIL import Image

from resnet_jax import data

# grain is imported where a stream is built: with Orbax, which it imports, it takes about half a
# second, which everything that imports train.py but streams nothing (CIFAR-sized sets,
# `resnet-jax summary`) need not pay.

# ImageNet's per-channel mean in [0, 1]; subtracted on the device. (The paper subtracts the
# per-pixel mean, Sec. 3.4; on random-sized crops that reduces to the per-channel mean.)
MEAN_RGB = (0.485, 0.456, 0.406)
CROP_FRACTION = 0.875  # evaluation: shorter side resized to size / 0.875, then a centre crop


def is_streamed(name: str) -> bool:
    """Whether dataset `name` streams from the hosts (data.DATASETS says which do)."""
    entry = data.DATASETS.get(name)
    return entry is not None and entry.streamed


def source(name: str, split: str, data_dir: str | None = None) -> Sequence[dict]:
    """Random-access examples {'image': uint8 (H, W, 3), 'label': int} of a prepared split."""
    import tensorflow_datasets as tfds  # Imported here: slow, and only streamed sets need it.

    data_dir = data_dir and os.path.expanduser(data_dir)
    try:
        # The images stay encoded here: the crop decodes them (`crop`), a JPEG in draft mode.
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                decoders={"image": tfds.decode.SkipDecoding()})
    except (KeyError, NotImplementedError, FileNotFoundError) as e:
        where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
        raise data.DataError(
            f"{name} is not prepared as array_record in {where} ({type(e).__name__}): put "
            "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in <data_dir>/downloads/manual, "
            "then, in the resnet_jax checkout, run  pip install -e '.[prepare]' && "
            f"tfds build {name} --file_format=array_record  (see resnet_jax/pipeline.py)") from None


def num_classes(name: str, data_dir: str | None = None) -> int:
    import tensorflow_datasets as tfds

    return tfds.builder(name, data_dir=data_dir and os.path.expanduser(data_dir)).info.features[
        "label"].num_classes


# --- Per-example transforms (numpy and PIL on the host) --------------------------------------


def random_resized_crop(image, size: int, rng: np.random.Generator, *,
                        area=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10) -> np.ndarray:
    """A crop of 8-100 % of the image's area and aspect ratio 3/4-4/3, resized to size x size
    (the "scale augmentation" used for ResNets since Szegedy et al. 2015). After `attempts`
    misses, the largest centred crop with an allowed aspect ratio. `image`: uint8 (H, W, C), or
    encoded (JPEG, PNG) bytes, decoded by `crop`; the random draws depend only on its size."""
    image = _open(image)
    w, h = image.size
    for _ in range(attempts):
        target = h * w * rng.uniform(*area)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            break
    else:
        cw, ch = w, h
        if w / h < ratio[0]:
            ch = round(w / ratio[0])
        elif w / h > ratio[1]:
            cw = round(h * ratio[1])
        x0, y0 = (w - cw) // 2, (h - ch) // 2
    return crop(image, (x0, y0, x0 + cw, y0 + ch), size)


def center_crop(image, size: int) -> np.ndarray:
    """The evaluation view: the central size/0.875 square of the shorter side, resized to size.
    `image` as for `random_resized_crop`."""
    image = _open(image)
    w, h = image.size
    side = min(h, w) * CROP_FRACTION
    x0, y0 = (w - side) / 2, (h - side) / 2
    return crop(image, (x0, y0, x0 + side, y0 + side), size)


def _open(image) -> Image.Image:
    """Encoded bytes opened lazily (only the header is read, so the size is known before any
    decoding), or a uint8 (H, W, C) array as an RGB image."""
    if isinstance(image, bytes):
        return Image.open(io.BytesIO(image))
    return Image.fromarray(np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image)


def crop(image: Image.Image, box, size: int) -> np.ndarray:
    """`box` (x0, y0, x1, y1) of `image` resized to size x size, bilinear and antialiased
    when shrinking, as uint8 RGB.

    An undecoded JPEG is decoded at scale 1/s, s the largest of 8, 4, 2 (1: full size) that
    still leaves the box at least `size` pixels on each side: libjpeg scales in the DCT domain
    (`Image.draft`), which costs less than decoding every pixel, and the resize still only
    shrinks. Below 2 x size per side (most crops of ImageNet's 500x375 images at 224) the JPEG
    is decoded whole, as before.
    """
    x0, y0, x1, y1 = box
    fits = min(x1 - x0, y1 - y0) / size  # how many times the box could shrink and still fit
    s = next((s for s in (8, 4, 2) if fits >= s), 1)
    if s > 1:
        w, h = image.size
        drafted = image.draft(None, (w // s, h // s))  # None unless an undecoded JPEG
        if drafted is not None:
            scale = w / drafted[1][2]  # = s: Image.draft keeps the largest scale <= w / (w // s)
            box = tuple(c / scale for c in box)
    if image.mode != "RGB":  # grayscale or CMYK JPEGs
        image = image.convert("RGB")
    return np.asarray(image.resize((size, size), Image.BILINEAR, box=box))


@dataclasses.dataclass(frozen=True)
class _Augment:
    """grain random_map: (example, generator) -> augmented example. A class, not a closure, so
    that grain's worker processes can pickle it."""

    size: int
    flip: bool

    def __call__(self, example, rng: np.random.Generator):
        image = random_resized_crop(example["image"], self.size, rng)
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        return {"image": np.ascontiguousarray(image), "label": np.int32(example["label"])}


@dataclasses.dataclass(frozen=True)
class _Share:
    """Local element i of process `part` -> its example in the global stream: row
    part * local + i % local of global batch i // local."""

    stream: grain.MapDataset
    global_batch: int
    local_batch: int
    part: int

    def __call__(self, i: int):
        step, row = divmod(i, self.local_batch)
        return self.stream[step * self.global_batch + self.part * self.local_batch + row]


@dataclasses.dataclass(frozen=True)
class _EvalShare:
    """Like _Share over a finite split: positions past its end are zero images, masked out."""

    examples: Sequence[dict]
    indices: np.ndarray
    global_batch: int
    local_batch: int
    part: int
    size: int

    def __call__(self, i: int):
        step, row = divmod(i, self.local_batch)
        g = step * self.global_batch + self.part * self.local_batch + row
        if g >= len(self.indices):
            return {"image": np.zeros((self.size, self.size, 3), np.uint8),
                    "label": np.int32(0), "mask": False}
        example = self.examples[int(self.indices[g])]
        return {"image": center_crop(example["image"], self.size),
                "label": np.int32(example["label"]), "mask": True}


def train_stream(examples: Sequence[dict], *, seed: int, batch_size: int, image_size: int,
                 flip: bool, num_steps: int, part: tuple[int, int] = (0, 1)) -> grain.MapDataset:
    """Batch s of this is process part[0]'s share (rows) of global training batch s."""
    import grain

    p, count = part
    stream = (grain.MapDataset.source(examples).shuffle(seed=seed).repeat()
              .random_map(_Augment(image_size, flip), seed=seed + 1))
    local = batch_size // count
    return (grain.MapDataset.range(num_steps * local).map(_Share(stream, batch_size, local, p))
            .batch(local, drop_remainder=True))


def eval_stream(examples: Sequence[dict], *, batch_size: int, image_size: int,
                indices: np.ndarray | None = None, part: tuple[int, int] = (0, 1)
                ) -> grain.MapDataset:
    """Process part[0]'s share of the evaluation batches over `indices` (default: all), the last
    batch padded; 'mask' marks the real examples."""
    import grain

    p, count = part
    indices = np.arange(len(examples)) if indices is None else indices
    local, steps = batch_size // count, -(-len(indices) // batch_size)
    share = _EvalShare(examples, indices, batch_size, local, p, image_size)
    return grain.MapDataset.range(steps * local).map(share).batch(local, drop_remainder=True)


def iterate(batches: grain.MapDataset, *, threads: int, workers: int = 0) -> Iterator[dict]:
    """Batches in order, made ahead by `threads` threads (one batch each) in this process, or
    in each of `workers` grain worker processes. The order never depends on either."""
    import grain

    ds = batches.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                   prefetch_buffer_size=2 * threads))
    if workers:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(ds)


# --- Onto the devices ------------------------------------------------------------------------


class StreamFeed:
    """The training loop's view of a streamed dataset: global device batches by step, and the
    evaluation splits batch by batch. Same interface as data.DeviceFeed."""

    def __init__(self, config, backend):
        if config.validation_size:
            raise data.DataError(f"validation_size={config.validation_size} is not supported for "
                                 f"{config.dataset}: its validation split is the test set; use 0")
        data_dir = config.tfds_data_dir or None
        self.name = config.dataset
        self.train = source(self.name, "train", data_dir)
        self.test = source(self.name, data.DATASETS[self.name].eval_split, data_dir)
        self.num_classes, self.in_channels = num_classes(self.name, data_dir), 3
        self.num_train, self.image_shape = len(self.train), (config.image_size,) * 2 + (3,)
        self.config, self.backend = config, backend
        self.part = (jax.process_index(), jax.process_count())
        # Evaluation crops (`eval_stream`) are the net's input size already: nothing to resize.
        self.preprocessing = data.Preprocessing(np.asarray(MEAN_RGB, np.float32), 0)
        self.mean = jax.device_put(self.preprocessing.mean, backend.replicated)
        self._iterator, self._next_step = None, None
        self._normalize = jax.jit(lambda b, mean: {**b, "image": data.normalize(b["image"], mean)},
                                  out_shardings=backend.data_sharding)
        subset = config.eval_subset
        self._subset = (data.subset_indices(len(self.test), subset)
                        if subset and subset < len(self.test) else None)

    @property
    def eval_names(self) -> tuple[str, ...]:
        return ("test",)

    def _global(self, local: dict) -> dict:
        """This process's rows -> one batch sharded over every device of every process."""
        return {k: jax.make_array_from_process_local_data(self.backend.data_sharding, v)
                for k, v in local.items()}

    def train_batch(self, step: int) -> dict:
        c = self.config
        if self._next_step != step:  # the first call, or a jump: (re)start the stream at `step`
            self.close()
            stream = train_stream(self.train, seed=c.seed, batch_size=c.batch_size,
                                  image_size=c.image_size, flip=c.flip, num_steps=c.total_steps,
                                  part=self.part)
            self._iterator = iterate(stream[step:], threads=c.input_threads,
                                     workers=c.input_workers)
        self._next_step = step + 1
        return self._normalize(self._global(next(self._iterator)), self.mean)

    def eval_batches(self, name: str, whole: bool) -> Iterator[dict]:
        c = self.config
        stream = eval_stream(self.test, batch_size=self.eval_batch_size, image_size=c.image_size,
                             indices=None if whole else self._subset, part=self.part)
        for local in iterate(stream, threads=c.input_threads):
            yield self._global({k: np.asarray(v) for k, v in local.items()})

    @property
    def eval_batch_size(self) -> int:
        return data.eval_batch_size(self.config.eval_batch_size, self.backend.num_devices)

    def close(self) -> None:
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator, self._next_step = None, None
