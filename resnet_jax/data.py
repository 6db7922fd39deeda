"""Datasets as host-side numpy arrays: uint8 images (N, H, W, C) and int32 labels (N,).

`load(name)` knows the datasets of `DATASETS` (their shapes and readers, one entry each) and
image folders:
  digits            scikit-learn's bundled 8x8 digits: real data offline, for smoke tests.
  synthetic         random images, for benchmarks.
  cifar10/cifar100  TFDS array_record copies, read with `tfds.data_source` (no TensorFlow needed).
  folder:<path>     an image-folder tree <path>/{train,test}/<class>/<image>.
  imagenet2012      streamed, never loaded whole (pipeline.py); listed for its shape and splits.
Decoding TFDS and folder datasets is slow, so the decoded arrays are cached as .npz under
`cache_dir()`, keyed by the source files' paths, sizes and mtimes: only the first load decodes.

The second section, at the end of this file, holds augmentation and device placement
(`DeviceFeed`). Datasets too big for device memory (ImageNet) stream from the hosts instead:
pipeline.py.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import os
import pathlib
import warnings
import zipfile
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core
import numpy as np
from PIL import Image

from resnet_jax.errors import DataError
from resnet_jax.files import write_atomically
from resnet_jax.metrics import Phase
from resnet_jax.rundir import PREPROCESSING

FOLDER = "folder:"  # folder:<path>: an image-folder tree, its shape and classes read from it
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_CACHE_VERSION = 1  # Bump when decoding changes, so caches written by older code are not read.


@dataclasses.dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, (N, H, W, C)
    labels: np.ndarray  # int32, (N,)


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    num_classes: int
    train: Split
    test: Split
    validation: Split | None  # None unless validation_size > 0


def cache_dir() -> pathlib.Path:
    """Where decoded datasets are cached: $RESNET_JAX_CACHE, else ~/.cache/resnet_jax."""
    return pathlib.Path(os.environ.get("RESNET_JAX_CACHE") or "~/.cache/resnet_jax").expanduser()


def load(name: str, *, validation_size: int = 0, tfds_data_dir: str | None = None,
         image_size: int = 0, train_size: int = 0) -> Dataset:
    """Loads dataset `name`, holding out `validation_size` training examples as `validation`.

    cifar10 with validation_size=5000 is the 45k/5k split of He et al. 2015, Sec. 4.2.
    `image_size` > 0 downsamples every image to that side by averaging square blocks of pixels
    (`downsample`); 0 keeps the dataset's own size. `train_size` > 0 trains on a fixed random
    subset of that many of the remaining training examples (the same for every run and seed),
    for studies that need many epochs in few iterations; the test split stays whole.
    """
    source = DATASETS.get(name)
    if name.startswith(FOLDER):
        num_classes, train, test = _folder(name.removeprefix(FOLDER))
    elif source is not None and not source.streamed:
        num_classes, train, test = source.read(name, tfds_data_dir)
    else:
        raise DataError(f"unknown dataset {name!r}: use one of {valid_names()}")
    if image_size:
        train, test = (downsample(split, image_size, name) for split in (train, test))
    train, validation = _hold_out(train, validation_size, name)
    if train_size:
        if not 0 < train_size <= len(train.labels):
            raise DataError(f"train_size={train_size} is out of range: {name} has "
                            f"{len(train.labels)} training examples left, so use 1 up to "
                            f"{len(train.labels)}, or 0 for all of them")
        train = subset(train, train_size)
    return Dataset(name, num_classes, train, test, validation)


def load_for(config) -> Dataset:
    """The dataset `config` trains on, in memory (not for streamed datasets: pipeline.py)."""
    return load(config.dataset, validation_size=config.validation_size,
                tfds_data_dir=config.tfds_data_dir or None, image_size=config.image_size,
                train_size=config.train_size)


def valid_names() -> str:
    """The names `load` takes, for error messages."""
    return ", ".join(sorted(n for n, s in DATASETS.items() if not s.streamed)) + f", {FOLDER}<path>"


def shape_of(name: str) -> tuple[tuple[int, int, int], int]:
    """(image shape, number of classes) of dataset `name`, reading data only for folders."""
    if name in DATASETS:
        return DATASETS[name].image_shape, DATASETS[name].num_classes
    ds = load(name)
    return ds.train.images.shape[1:], ds.num_classes


def downsample(split: Split, size: int, name: str = "the dataset") -> Split:
    """`split` with each image the mean of its (side / size)-pixel square blocks, rounded: a
    lower-resolution copy of the same data (CIFAR-10 at 16x16 trains 4x cheaper)."""
    side = split.images.shape[1]
    if size == side:
        return split
    if not (0 < size < side and side % size == 0 and split.images.shape[2] == side):
        raise DataError(f"image_size={size} does not divide {name}'s {side}-pixel square images:"
                        f" use a divisor of {side} (e.g. {side // 2}), or 0 for the full size")
    f = side // size
    n, c = len(split.images), split.images.shape[-1]
    blocks = split.images.reshape(n, size, f, size, f, c).mean(axis=(2, 4), dtype=np.float32)
    return Split(np.round(blocks).astype(np.uint8), split.labels)


def _hold_out(train: Split, n: int, name: str) -> tuple[Split, Split | None]:
    if n == 0:
        return train, None
    total = len(train.labels)
    if not 0 < n < total:
        raise DataError(f"validation_size={n} is out of range: {name} has {total} training "
                        f"examples, so use 0 (no validation split) up to {total - 1}")
    # A fixed seed, separate from the training seed: every run holds out the same examples.
    held = np.zeros(total, bool)
    held[np.random.default_rng(0).permutation(total)[:n]] = True
    return (Split(train.images[~held], train.labels[~held]),
            Split(train.images[held], train.labels[held]))


# --- Readers: (name, tfds_data_dir) -> (num_classes, train, test) ---------------------------


def _digits(name: str, data_dir: str | None) -> tuple[int, Split, Split]:
    # scikit-learn's bundled file, read as its load_digits reads it, without importing
    # scikit-learn (over a second, in every process that trains on digits).
    spec = importlib.util.find_spec("sklearn")
    path = pathlib.Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    table = np.loadtxt(path, delimiter=",")  # a row per image: 64 pixels (0..16), the label
    images = np.round(table[:, :-1].reshape(-1, 8, 8) * (255 / 16)).astype(np.uint8)[..., None]
    labels = table[:, -1].astype(np.int32)
    order = np.random.default_rng(0).permutation(len(labels))
    train, test = order[:1497], order[1497:]
    return 10, Split(images[train], labels[train]), Split(images[test], labels[test])


def _synthetic(name: str, data_dir: str | None) -> tuple[int, Split, Split]:
    rng = np.random.default_rng(0)

    def split(n):
        return Split(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                     rng.integers(0, 10, n, dtype=np.int32))

    return 10, split(2048), split(512)


def _tfds(name: str, data_dir: str | None) -> tuple[int, Split, Split]:
    import tensorflow_datasets as tfds  # Imported here: slow, and only these datasets need it.

    data_dir = data_dir and os.path.expanduser(data_dir)
    builder = tfds.builder(name, data_dir=data_dir)
    formats = {f.value for f in builder.info.available_file_formats()}
    # Checked up front: tfds.data_source reports a missing copy as a KeyError or an unrelated
    # NotImplementedError depending on data_dir, and with download=True it would try to build
    # the dataset, which needs TensorFlow and the internet.
    if not builder.is_prepared() or "array_record" not in formats:
        where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")  # tfds default
        build = f"tfds build {name} --file_format=array_record" + (
            f" --data_dir={data_dir}" if data_dir else "")
        raise DataError(
            f"{name} is not prepared as array_record in {where}: on a machine with internet, in "
            f"the resnet_jax checkout, run  pip install -e '.[prepare]' && {build}  (then copy "
            f"{where} to this machine, or pass --config.tfds_data_dir=<its copy>); offline, train "
            "on the bundled dataset=digits or on an image-folder copy, dataset=folder:<path>")

    def read():
        sources = tfds.data_source(name, split=["train", "test"], data_dir=data_dir, download=False)
        # One batched read per split: array_record then fetches the records in parallel, which
        # made reading 50k CIFAR-sized records 1.7x faster than indexing them one at a time
        # (12.8 s vs 21.4 s; decoding the PNGs is most of the rest).
        splits = [source.__getitems__(list(range(len(source)))) for source in sources]
        return tuple(Split(np.stack([e["image"] for e in examples]),
                           np.array([e["label"] for e in examples], np.int32))
                     for examples in splits)  # cifar100's "label" is the fine, 100-class one.

    root = pathlib.Path(builder.data_path)
    files = sorted(e.path for e in os.scandir(root) if e.is_file())
    num_classes = builder.info.features["label"].num_classes
    return _cached(f"{name}-{_fingerprint(root, files)}", lambda: (num_classes, *read()), name)


@dataclasses.dataclass(frozen=True)
class Source:
    """A named dataset: its image shape and classes, known without reading it, and its reader
    (None: streamed from the hosts by pipeline.py, never loaded whole; `eval_split` is the
    labelled held-out split that plays "test" there)."""

    image_shape: tuple[int, int, int]
    num_classes: int
    read: Callable[[str, str | None], tuple[int, Split, Split]] | None
    eval_split: str = "test"

    @property
    def streamed(self) -> bool:
        return self.read is None


# Every named dataset. A new one: its reader above (or none, if streamed) and one entry here.
DATASETS = {
    "cifar10": Source((32, 32, 3), 10, _tfds),
    "cifar100": Source((32, 32, 3), 100, _tfds),  # the fine, 100-class labels
    "digits": Source((8, 8, 1), 10, _digits),
    "synthetic": Source((32, 32, 3), 10, _synthetic),
    "imagenet2012": Source((224, 224, 3), 1000, None, eval_split="validation"),
}


def _folder(path: str) -> tuple[int, Split, Split]:
    if not path:
        raise DataError("folder: needs a path, e.g. folder:/data/cifar10_jpeg")
    root = pathlib.Path(path).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"folder dataset {root} does not exist or is not a directory: "
                        "pass folder:<dir holding train/ and test/>")
    train, test = _list_split(root, "train"), _list_split(root, "test")
    if train.keys() != test.keys():
        raise DataError(f"{root}/train and {root}/test have different class folders (only in "
                        f"train: {sorted(train.keys() - test.keys())}, only in test: "
                        f"{sorted(test.keys() - train.keys())}): give both the same classes")
    classes = sorted(train)  # Class ids are the sorted class names.
    files, labels = [], []
    for listing in (train, test):
        for label, name in enumerate(classes):
            files += listing[name]
            labels += [label] * len(listing[name])
    n_train = sum(len(v) for v in train.values())

    def decode():
        images, y = _decode_all(files), np.array(labels, np.int32)
        return (len(classes), Split(images[:n_train], y[:n_train]),
                Split(images[n_train:], y[n_train:]))

    return _cached(f"folder-{_fingerprint(root, files)}", decode, f"{FOLDER}{path}")


def _list_split(root: pathlib.Path, split: str) -> dict[str, list[str]]:
    """Maps class name -> sorted image paths in root/split/<class>/."""
    top = root / split
    if not top.is_dir():
        raise DataError(f"{root} has no {split}/ folder: expected {top}/<class>/<image>")
    # Hidden folders (.ipynb_checkpoints, ...) are tool litter, not classes.
    classes = sorted(e.name for e in _scandir(top) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{top} has no class folders: expected {top}/<class>/<image>")
    listing = {}
    for c in classes:
        # os.scandir and str paths, not pathlib: pathlib costs ~1 s per 60k files, more than the
        # rest of a cached load.
        listing[c] = sorted(e.path for e in _scandir(top / c)
                            if os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES)
        if not listing[c]:
            raise DataError(f"class folder {top / c} has no images ({', '.join(IMAGE_SUFFIXES)}): "
                            "add some or remove the folder")
    return listing


def _scandir(path: pathlib.Path) -> list[os.DirEntry]:
    try:
        return list(os.scandir(path))
    except OSError as e:
        raise _read_error(path, e) from None


def _read_error(path, e: OSError) -> DataError:
    """A file or folder of the dataset that the system would not let us read."""
    if isinstance(e, FileNotFoundError) and os.path.islink(path):
        return DataError(f"cannot read {path} (a broken symbolic link): repair or delete it")
    return DataError(f"cannot read {path} ({e.strerror or type(e).__name__}): make it readable "
                     "or delete it")


def decode_image(path: str) -> np.ndarray:
    """One image as RGB uint8; call it where Pillow's DecompressionBombWarning is an error
    (`_decode_all`), so that an oversized image is refused rather than decoded."""
    try:
        with Image.open(path) as image:
            # Grayscale too: folder datasets are always RGB. convert() copies, so skip it if we can.
            return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise DataError(f"image {path} has more pixels than Pillow's limit against decompression "
                        f"bombs ({Image.MAX_IMAGE_PIXELS:,}): resize it") from None
    except OSError as e:
        if e.errno is not None:  # the system refused the file; Pillow's own errors carry no errno
            raise _read_error(path, e) from None
        raise DataError(f"cannot decode image {path} ({type(e).__name__}): "
                        "replace or delete it") from e
    except (SyntaxError, ValueError) as e:  # What Pillow raises for broken files.
        raise DataError(f"cannot decode image {path} ({type(e).__name__}): "
                        "replace or delete it") from e


def _decode_all(paths: list[str]) -> np.ndarray:
    """Decodes serially: on small images Python's per-file overhead dominates, and neither
    threads (the GIL) nor processes (measured on CIFAR-10: 17 s serial, 17-22 s with 2 workers)
    did better on 2 cores. The cache makes it a one-time cost."""
    first = paths[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        shape = decode_image(first).shape
        out = np.empty((len(paths), *shape), np.uint8)
        for i, path in enumerate(paths):
            image = decode_image(path)
            if image.shape != shape:
                raise DataError(f"{path} is {image.shape[1]}x{image.shape[0]} pixels but {first} "
                                f"is {shape[1]}x{shape[0]}: all images must share one size "
                                "(resize them)")
            out[i] = image
    return out


def _fingerprint(root: pathlib.Path, files: list[str]) -> str:
    """Hash of root and its files' paths, sizes and mtimes: any edit, addition or removal shows."""
    root = str(root)
    h = hashlib.sha256(f"v{_CACHE_VERSION} {root}".encode())
    for f in files:  # All under root; slicing is much faster than os.path.relpath.
        try:
            st = os.stat(f)
        except OSError as e:
            raise _read_error(f, e) from None
        h.update(f"\n{f[len(root):]} {st.st_size} {st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def _cached(stem: str, build: Callable[[], tuple[int, Split, Split]],
            name: str) -> tuple[int, Split, Split]:
    """Returns the cached (num_classes, train, test) for `stem`, calling `build` on a miss
    (dataset `name`: announced, as it takes a minute on CIFAR-10)."""
    path = cache_dir() / f"{stem}.npz"
    if path.exists():
        try:
            with np.load(path) as z:
                return (int(z["num_classes"]), Split(z["train_images"], z["train_labels"]),
                        Split(z["test_images"], z["test_labels"]))
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            # Writes are atomic, so this is damage from outside (a cut copy, a failing disk);
            # the rebuilt cache replaces it.
            print(f"discarding the unreadable data cache {path} ({type(e).__name__}); "
                  "decoding the dataset again", flush=True)
    def unwritable(e: OSError) -> DataError:
        return DataError(f"cannot write the data cache {path} ({e.strerror or e}): set "
                         "$RESNET_JAX_CACHE to a directory you can write to, or free space")

    try:  # before decoding for a minute
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise unwritable(e) from None
    with Phase(f"decoding {name} into the data cache {path}", f"decoded {name}") as phase:
        num_classes, train, test = build()
        try:
            write_atomically(path, lambda f: np.savez(
                f, num_classes=num_classes, train_images=train.images, train_labels=train.labels,
                test_images=test.images, test_labels=test.labels))
        except OSError as e:
            raise unwritable(e) from None
        phase.detail = (f": {len(train.labels) + len(test.labels):,} images -> {path} "
                        f"({path.stat().st_size / 1e6:.0f} MB)")
    return num_classes, train, test


# --- On the device: CIFAR-sized sets live in accelerator memory and are augmented there, so no
# host pipeline sits in the training loop. Batches are pure functions of (seed, step): a resumed
# run sees exactly the data an unbroken run would have seen.


def mean_image(images: np.ndarray) -> np.ndarray:
    """Per-pixel mean of the training images in [0, 1] (He et al. 2015, Sec. 4.2)."""
    return images.astype(np.float64).mean(axis=0).astype(np.float32) / 255.0


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What turns images as `load(dataset)` yields them (uint8) into the input a run's net was
    trained and evaluated on: downsampled to `image_size` (0: as they are), then `normalize`d
    with `mean` (the training set's per-pixel mean, or a per-channel mean for streamed sets).
    Saved in the run's workdir, so that using the net needs neither the training set nor this
    code's defaults of the day."""

    mean: np.ndarray  # float32, (H, W, C) or (C,), in [0, 1]
    image_size: int  # 0: the dataset's own size

    def __call__(self, images: np.ndarray) -> jax.Array:
        """Float32 net input of uint8 images (N, H, W, C), at the dataset's size or already at
        `image_size`."""
        return normalize(self.resize(images), self.mean)

    def resize(self, images: np.ndarray) -> np.ndarray:
        """The uint8 images at the size the net trained on (`downsample`, as `load` does)."""
        images = np.asarray(images)
        if self.image_size and images.shape[1] != self.image_size:
            images = downsample(Split(images, np.zeros(len(images), np.int32)),
                                self.image_size, "these images").images
        return images

    def save(self, workdir: pathlib.Path) -> None:
        write_atomically(workdir / PREPROCESSING, lambda f: np.savez(
            f, mean=self.mean, image_size=np.int64(self.image_size)))

    @classmethod
    def read(cls, workdir: pathlib.Path) -> Preprocessing | None:
        """The run's saved preprocessing; None for runs from before it was saved."""
        path = workdir / PREPROCESSING
        if not path.exists():
            return None
        try:
            with np.load(path) as z:
                return cls(z["mean"].astype(np.float32), int(z["image_size"]))
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise DataError(f"cannot read {path} ({type(e).__name__}): delete it, and the "
                            "mean image is recomputed from the training set") from None


def default_padding(image_size: int) -> int:
    """4 pixels on 32x32 (Sec. 4.2); the same fraction, image side / 8, on other sizes."""
    return max(1, image_size // 8)


def normalize(images: jax.Array, mean: jax.Array) -> jax.Array:
    return images.astype(jnp.float32) / 255.0 - mean


def epoch_order(key, epoch, n: int):
    """The order in which epoch `epoch` visits the `n` training examples: a permutation drawn
    from `key` (`train_batch`'s, which draws it when not given it)."""
    order_key, _ = jax.random.split(jax.random.fold_in(key, epoch))
    return jax.random.permutation(order_key, n)


def train_batch(images, labels, mean, key, step, *, batch_size: int, padding: int, flip: bool,
                part=(0, 1), order=None):
    """Batch `step` of the epoch-wise shuffled training set, padded, cropped and flipped.

    Each epoch is a fresh permutation of the training set (drop-last); `key` seeds both the order
    and the augmentation, folded with the epoch and the step. `order`: the epoch's permutation
    (`epoch_order`) if drawn already; drawing it is a sort of the whole training set, most of
    the cost of a batch (22 of 23 ms for CIFAR-10 on 2 CPU cores), so the loop draws it once per
    epoch (`DeviceFeed`). `part=(i, n)` returns only the i-th of n equal slices of the global
    batch (one device's share, computed on that device); the random draws are made for the whole
    batch, so the slices never depend on n.
    """
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    n, h, w, _ = images.shape
    steps_per_epoch = n // batch_size
    epoch, i = step // steps_per_epoch, step % steps_per_epoch
    _, aug_key = jax.random.split(jax.random.fold_in(key, epoch))
    perm = epoch_order(key, epoch, n) if order is None else order
    idx = jax.lax.dynamic_slice(perm, (i * batch_size,), (batch_size,))
    crop_key, flip_key = jax.random.split(jax.random.fold_in(aug_key, i))
    offsets = jax.random.randint(crop_key, (batch_size, 2), 0, 2 * padding + 1)
    flips = jax.random.bernoulli(flip_key, 0.5, (batch_size,))

    size = batch_size // part[1]
    idx, offsets, flips = (jax.lax.dynamic_slice_in_dim(a, part[0] * size, size)
                           for a in (idx, offsets, flips))
    x = normalize(images[idx], mean)
    if padding:
        # Zero padding of the mean-subtracted image, then a random crop back to h x w.
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        x = jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0),
                                                          (h, w, img.shape[-1])))(x, offsets)
    if flip:
        x = jnp.where(flips[:, None, None, None], x[:, :, ::-1, :], x)
    return {"image": x, "label": labels[idx]}


def subset(split: Split, size: int, seed: int = 0) -> Split:
    """A fixed random `size` examples of `split` in their original order (splits are often
    sorted by class, so the first `size` would not do)."""
    keep = subset_indices(len(split.labels), size, seed)
    return Split(split.images[keep], split.labels[keep])


def subset_indices(n: int, size: int, seed: int = 0) -> np.ndarray:
    """The indices of `subset`: a fixed random `size` of range(n), in increasing order."""
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])


def eval_batch_size(requested: int, num_devices: int) -> int:
    """`eval_batch_size` as evaluation uses it: a multiple of the device count, at least one
    example per device (the last batch is padded and masked)."""
    return max(num_devices, requested // num_devices * num_devices)


def eval_batches(split: Split, batch_size: int) -> dict[str, np.ndarray]:
    """The whole split as (num_batches, batch_size, ...) with a mask for the padded tail."""
    n = len(split.labels)
    num_batches = -(-n // batch_size)
    pad = num_batches * batch_size - n
    images = np.concatenate([split.images, np.zeros((pad,) + split.images.shape[1:], np.uint8)])
    labels = np.concatenate([split.labels, np.zeros((pad,), np.int32)])
    mask = np.arange(num_batches * batch_size) < n
    shape = (num_batches, batch_size)
    return {"image": images.reshape(shape + images.shape[1:]), "label": labels.reshape(shape),
            "mask": mask.reshape(shape)}


def pure(fn, *args):
    """(pure, data): `fn(*args)` as `pure(data, *args)` of the device arrays it closes over
    (`data`), traced once with `args`' shapes, so that a program it is traced into takes those
    arrays as arguments rather than compiling them in as constants."""
    closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
    tree = jax.tree.structure(shapes)

    def call(data, *args):
        return jax.tree.unflatten(tree, jax_core.jaxpr_as_fun(
            jax_core.ClosedJaxpr(closed.jaxpr, data))(*jax.tree.leaves(args)))

    return call, list(closed.consts)


class DeviceFeed:
    """The training loop's view of an on-device dataset: the training set and its per-pixel mean
    replicated on every device, each device cutting its own share of batch `step` there, and the
    evaluation splits as uint8 batches with a padding mask. Same interface as
    pipeline.StreamFeed. With several seeds in one program (`backend.seeds`), batch `step` is one
    batch per seed, stacked: each seed's order and augmentation are those of its run alone."""

    def __init__(self, ds: Dataset, config, backend):
        self.num_classes, self.in_channels = ds.num_classes, ds.train.images.shape[-1]
        self.num_train, self.image_shape = len(ds.train.labels), ds.train.images.shape[1:]
        replicate = functools.partial(jax.device_put, device=backend.replicated)
        self._images, self._labels = replicate(ds.train.images), replicate(ds.train.labels)
        self.preprocessing = Preprocessing(mean_image(ds.train.images), config.image_size)
        self.mean = replicate(self.preprocessing.mean)
        padding = (config.crop_padding if config.crop_padding >= 0
                   else default_padding(ds.train.images.shape[1]))
        data_key = lambda seed: jax.random.fold_in(jax.random.key(seed), 1)  # noqa: E731
        cut = functools.partial(train_batch, batch_size=config.batch_size, padding=padding,
                                flip=config.flip)
        self._key = backend.stack_runs([data_key(s) for s in backend.seeds_of(config.seed)])
        # The epoch's order, drawn once per epoch (epoch_order); one per seed with seeds.
        order = functools.partial(epoch_order, n=self.num_train)
        self.steps_per_epoch = self.num_train // config.batch_size
        if backend.seeds:
            order = jax.vmap(order, (0, None))
            many = cut  # vmapped over the keys only (jax.vmap would map keyword arguments too)
            cut = lambda images, labels, mean, keys, step, orders, *, part: jax.vmap(  # noqa: E731
                lambda key, o: many(images, labels, mean, key, step, part=part, order=o))(
                    keys, orders)
        else:
            one = cut
            cut = lambda images, labels, mean, key, step, order, *, part: one(  # noqa: E731
                images, labels, mean, key, step, part=part, order=order)
        self._cut = backend.compile_batch(cut)
        self._draw_order = jax.jit(order, out_shardings=backend.replicated)
        self._order = (None, None)  # (epoch, its order): the last one drawn

        n = backend.num_devices
        batch_size = eval_batch_size(config.eval_batch_size, n)
        splits = {"test": ds.test} | ({"val": ds.validation} if ds.validation else {})

        def put(split):
            stacked = eval_batches(split, batch_size)
            return [jax.device_put({k: v[i] for k, v in stacked.items()},
                                   backend.shared_batch_sharding)
                    for i in range(len(stacked["label"]))]

        self._whole = {name: put(split) for name, split in splits.items()}
        self._part = ({name: put(subset(split, config.eval_subset))
                       for name, split in splits.items()} if config.eval_subset else self._whole)

    @property
    def eval_names(self) -> tuple[str, ...]:
        return tuple(self._whole)

    def train_batch(self, step: int, order=None) -> dict:
        """Batch `step`, cut from the epoch's `order` (by default the one `epoch_order` keeps)."""
        if order is None:
            order = self.epoch_order(step // self.steps_per_epoch)
        return self._cut(self._images, self._labels, self.mean, self._key, step, order)

    def epoch_order(self, epoch: int):
        """The order of epoch `epoch` (data.epoch_order; stacked, one per seed, with seeds),
        drawn once and kept until another epoch's is asked for."""
        if self._order[0] != epoch:
            self._order = (epoch, self.draw_order(epoch))
        return self._order[1]

    def draw_order(self, epoch):
        """`epoch_order` drawn anew: a pure function of `epoch`, to trace into a program."""
        return self._draw_order(self._key, epoch)

    def traced_batches(self):
        """(batch_of, data, carry_of) for `Backend.compile_steps`: `batch_of(data, carry, step)`
        is `train_batch(step)` as a pure function of the device arrays it reads (`data`: the
        training set, its mean, the keys, arguments of the program rather than constants compiled
        into it), with the epoch's order in `carry` = (epoch, order), drawn inside the program
        only where a step starts a new epoch; `carry_of(step)` the carry to start a call at
        `step`, from the order kept on the host."""
        n = self.steps_per_epoch
        epoch0 = jax.numpy.int32(0)
        # Traced with the order's shape only: no permutation is drawn to build the program.
        order = jax.eval_shape(self.draw_order, epoch0)
        batch_fn, batch_data = pure(self.train_batch, epoch0, order)
        order_fn, order_data = pure(self.draw_order, epoch0)

        def batch_of(data, carry, step):
            epoch, order = carry
            new = step // n
            order = jax.lax.cond(new == epoch, lambda: order,
                                 lambda: order_fn(data[1], new))
            return batch_fn(data[0], step, order), (new, order)

        def carry_of(step: int):
            return jax.numpy.int32(step // n), self.epoch_order(step // n)

        return batch_of, (batch_data, order_data), carry_of

    def eval_batches(self, name: str, whole: bool) -> Iterator[dict]:
        return iter((self._whole if whole else self._part)[name])

    def close(self) -> None:
        pass
