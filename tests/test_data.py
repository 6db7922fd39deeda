"""Tests for resnet_jax.data: sizes, determinism, exact pixels, the decode cache, error messages."""
import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from resnet_jax import data

CLASSES = ("cat", "ant", "bee")  # Not in sorted order: class ids must follow the sorted names.


def rows(images, labels):
    """Each example as one row (pixels, then label), sorted: compares datasets as multisets."""
    r = np.concatenate([images.reshape(len(images), -1).astype(np.int64), labels[:, None]], axis=1)
    return r[np.lexsort(r.T[::-1])]


def assert_splits_equal(a, b):
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)


def make_tree(root, per_class=(3, 2), size=(5, 4)):
    """Writes random PNGs to root/{train,test}/<class>/; returns {split: (images, labels)} in the
    order load() must return them: sorted class names, then sorted file names."""
    rng = np.random.default_rng(1)
    expected = {}
    for split, n in zip(("train", "test"), per_class):
        images, labels = [], []
        for label, cls in enumerate(sorted(CLASSES)):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                image = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(image).save(root / split / cls / f"{i}.png")
                images.append(image)
                labels.append(label)
        expected[split] = (np.stack(images), np.array(labels, np.int32))
    return expected


def load_error(name, **kwargs):
    with pytest.raises(data.DataError) as info:
        data.load(name, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_digits_is_a_deterministic_split_of_all_1797_sklearn_digits():
    from sklearn.datasets import load_digits

    ds = data.load("digits")
    assert ds.num_classes == 10 and ds.validation is None
    assert ds.train.images.shape == (1497, 8, 8, 1) and ds.test.images.shape == (300, 8, 8, 1)
    assert ds.train.images.dtype == np.uint8 and ds.train.labels.dtype == np.int32
    images = np.concatenate([ds.train.images, ds.test.images])
    labels = np.concatenate([ds.train.labels, ds.test.labels])
    assert images.min() == 0 and images.max() == 255
    assert set(ds.test.labels) == set(range(10))
    # Together the splits are exactly sklearn's digits, scaled by 255/16: nothing lost or repeated.
    digits = load_digits()
    scaled = np.round(digits.images * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(rows(images, labels), rows(scaled, digits.target))
    # In the same order as ever (data.py reads sklearn's file itself): runs trained before
    # see the same training set.
    order = np.random.default_rng(0).permutation(1797)
    np.testing.assert_array_equal(images[..., 0], scaled[order])
    np.testing.assert_array_equal(labels, digits.target[order])
    again = data.load("digits")
    assert_splits_equal(again.train, ds.train)
    assert_splits_equal(again.test, ds.test)


def test_synthetic_shapes_and_dtypes():
    ds = data.load("synthetic")
    assert ds.num_classes == 10
    assert ds.train.images.shape == (2048, 32, 32, 3) and ds.test.images.shape == (512, 32, 32, 3)
    assert ds.train.images.dtype == np.uint8 and ds.test.labels.dtype == np.int32
    assert ds.train.labels.shape == (2048,)
    assert 0 <= ds.train.labels.min() < ds.train.labels.max() < 10


def test_validation_split_partitions_train_and_is_fixed():
    full = data.load("digits")
    ds = data.load("digits", validation_size=300)
    assert len(ds.train.labels) == 1197 and ds.validation.images.shape == (300, 8, 8, 1)
    # Train and validation together are exactly the full training set: disjoint, nothing lost.
    np.testing.assert_array_equal(
        rows(np.concatenate([ds.train.images, ds.validation.images]),
             np.concatenate([ds.train.labels, ds.validation.labels])),
        rows(full.train.images, full.train.labels))
    # The kept examples stay in their original order (a greedy subsequence match).
    remaining = iter(zip(map(bytes, full.train.images), full.train.labels))
    assert all(any(k == r for r in remaining) for k in zip(map(bytes, ds.train.images),
                                                          ds.train.labels))
    assert_splits_equal(ds.test, full.test)
    again = data.load("digits", validation_size=300)
    assert_splits_equal(again.validation, ds.validation)
    assert_splits_equal(again.train, ds.train)


def test_eval_subset_is_a_fixed_random_sample_in_original_order():
    labels = np.repeat(np.arange(10, dtype=np.int32), 100)  # sorted by class, like folder: splits
    split = data.Split(np.arange(1000).reshape(1000, 1, 1, 1), labels)  # image i holds i
    part = data.subset(split, 200)
    again = data.subset(split, 200)
    np.testing.assert_array_equal(part.labels, again.labels)
    np.testing.assert_array_equal(part.images, again.images)
    assert len(part.labels) == 200 and len(set(part.labels)) == 10  # not the first 200
    assert (np.diff(part.images.ravel()) > 0).all()
    np.testing.assert_array_equal(part.labels, labels[part.images.ravel()])
    assert len(data.subset(split, 5000).labels) == 1000


def test_image_size_averages_pixel_blocks_of_train_and_test():
    full, half = data.load("synthetic"), data.load("synthetic", image_size=16)
    assert half.train.images.shape == (2048, 16, 16, 3) and half.test.images.shape == (512, 16, 16, 3)
    assert half.train.images.dtype == np.uint8
    # Pixel (1, 2) of image 5 is the rounded mean of the 2x2 block at rows 2-3, columns 4-5.
    block = full.train.images[5, 2:4, 4:6].astype(np.float64).mean(axis=(0, 1))
    np.testing.assert_array_equal(half.train.images[5, 1, 2], np.round(block).astype(np.uint8))
    np.testing.assert_array_equal(half.test.labels, full.test.labels)
    assert data.load("synthetic", image_size=32).train.images.shape[1:] == (32, 32, 3)


@pytest.mark.parametrize("size", [3, 64])
def test_image_size_that_does_not_divide_the_side_is_one_line(size):
    message = load_error("digits", image_size=size)
    assert f"image_size={size}" in message and "8-pixel" in message and "divisor" in message


def test_train_size_is_a_fixed_subset_of_train_and_leaves_test_whole():
    full = data.load("digits", validation_size=300)
    part = data.load("digits", validation_size=300, train_size=500)
    assert part.train.images.shape == (500, 8, 8, 1)
    assert_splits_equal(part.train, data.subset(full.train, 500))  # fixed, whatever the seed
    assert_splits_equal(part.test, full.test)
    assert_splits_equal(part.validation, full.validation)  # held out first, never trained on
    assert len(set(part.train.labels)) == 10


@pytest.mark.parametrize("size", [-3, 1198])
def test_train_size_out_of_range_is_one_line(size):
    message = load_error("digits", validation_size=300, train_size=size)
    assert f"train_size={size}" in message and "1197" in message


@pytest.mark.parametrize("size", [-1, 1497])
def test_validation_size_out_of_range(size):
    message = load_error("digits", validation_size=size)
    assert f"validation_size={size}" in message and "1496" in message


def test_unknown_name_lists_valid_names():
    message = load_error("mnist")
    assert "'mnist'" in message and "cifar10, cifar100, digits, synthetic, folder:<path>" in message


def test_folder_labels_follow_sorted_class_names_and_pixels_round_trip(tmp_path):
    expected = make_tree(tmp_path)
    # A grayscale image must come back as RGB; extensions are case-insensitive; other files and
    # hidden folders are ignored.
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5)
    Image.fromarray(gray).save(tmp_path / "test" / "cat" / "9_gray.PNG")
    (tmp_path / "test" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()

    ds = data.load(f"folder:{tmp_path}")
    assert ds.num_classes == 3
    np.testing.assert_array_equal(ds.train.labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])  # ant, bee, cat
    assert_splits_equal(ds.train, data.Split(*expected["train"]))
    assert ds.test.images.shape == (7, 4, 5, 3) and ds.test.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.test.images[:6], expected["test"][0])
    np.testing.assert_array_equal(ds.test.images[6], np.stack([gray] * 3, axis=-1))
    np.testing.assert_array_equal(ds.test.labels, [0, 0, 1, 1, 2, 2, 2])


def test_folder_second_load_is_a_cache_hit(tmp_path, monkeypatch):
    make_tree(tmp_path)
    first = data.load(f"folder:{tmp_path}", validation_size=2)

    def fail(path):
        raise AssertionError(f"decoded {path} on a cached load")

    monkeypatch.setattr(data, "decode_image", fail)
    second = data.load(f"folder:{tmp_path}", validation_size=2)
    for a, b in [(first.train, second.train), (first.validation, second.validation),
                 (first.test, second.test)]:
        assert_splits_equal(a, b)
    assert any(data.cache_dir().glob("folder-*.npz"))
    assert not list(data.cache_dir().glob("*.tmp"))  # The atomic write left no temp file behind.


def test_folder_edits_invalidate_the_cache(tmp_path):
    make_tree(tmp_path)
    # BMP is uncompressed, so the edit keeps the file size: only the mtime can reveal it.
    edited = tmp_path / "train" / "ant" / "9.bmp"
    Image.new("RGB", (5, 4), (1, 2, 3)).save(edited)
    assert data.load(f"folder:{tmp_path}").train.images[3, 0, 0].tolist() == [1, 2, 3]
    size = os.stat(edited).st_size
    Image.new("RGB", (5, 4), (4, 5, 6)).save(edited)
    assert os.stat(edited).st_size == size
    mtime = os.stat(edited).st_mtime_ns
    os.utime(edited, ns=(mtime, mtime + 2_000_000_000))  # As an edit would, even on coarse clocks.
    assert data.load(f"folder:{tmp_path}").train.images[3, 0, 0].tolist() == [4, 5, 6]
    Image.new("RGB", (5, 4)).save(tmp_path / "train" / "cat" / "3.png")
    assert len(data.load(f"folder:{tmp_path}").train.labels) == 11


def test_folder_interrupted_cache_write_leaves_nothing_to_read(tmp_path, monkeypatch):
    expected = make_tree(tmp_path)
    savez = np.savez

    def write_half_then_die(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", write_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        data.load(f"folder:{tmp_path}")
    assert not list(data.cache_dir().glob("*.tmp"))
    monkeypatch.setattr(np, "savez", savez)
    assert_splits_equal(data.load(f"folder:{tmp_path}").test, data.Split(*expected["test"]))


@pytest.mark.parametrize("damage", ["cut", "garbage"])
def test_folder_corrupt_cache_is_discarded_and_rebuilt(tmp_path, capsys, monkeypatch, damage):
    monkeypatch.setenv("RESNET_JAX_CACHE", str(tmp_path / "cache"))
    expected = make_tree(tmp_path)
    data.load(f"folder:{tmp_path}")
    [cache] = data.cache_dir().glob("folder-*.npz")
    whole = cache.read_bytes()
    cache.write_bytes(whole[:len(whole) // 2] if damage == "cut" else b"\0" * len(whole))
    capsys.readouterr()
    assert_splits_equal(data.load(f"folder:{tmp_path}").test, data.Split(*expected["test"]))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and str(cache) in lines[0] and "decoding" in lines[0]
    with np.load(cache) as z:  # Rebuilt: the next load is a cache hit again.
        np.testing.assert_array_equal(z["test_images"], expected["test"][0])


def test_unwritable_cache_names_the_variable_and_the_path(tmp_path, monkeypatch):
    make_tree(tmp_path / "tree")
    # A cache under a regular file cannot be created, even by root.
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("RESNET_JAX_CACHE", str(tmp_path / "afile" / "cache"))
    message = load_error(f"folder:{tmp_path / 'tree'}")
    assert "$RESNET_JAX_CACHE" in message and str(tmp_path / "afile" / "cache") in message
    assert "workdir" not in message


def test_folder_broken_symlink_names_the_image(tmp_path):
    make_tree(tmp_path)
    link = tmp_path / "train" / "bee" / "gone.png"
    link.symlink_to(tmp_path / "nowhere.png")
    message = load_error(f"folder:{tmp_path}")
    assert f"cannot read {link}" in message and "broken" in message


@pytest.mark.parametrize("what", ["image", "class folder"])
def test_folder_unreadable_file_or_folder_names_it(tmp_path, monkeypatch, what):
    # Injected: chmod 000 stops no one when the tests run as root.
    make_tree(tmp_path)
    target = tmp_path / "test" / "cat" / ("1.png" if what == "image" else "")
    target = str(target).rstrip("/")
    real = {"image": Image.open, "class folder": os.scandir}[what]

    def denied(path, *args, **kwargs):
        if os.fspath(path) == target:
            raise PermissionError(13, "Permission denied", target)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(*(Image, "open") if what == "image" else (os, "scandir"), denied)
    message = load_error(f"folder:{tmp_path}")
    assert f"cannot read {target}" in message and "Permission denied" in message


@pytest.mark.parametrize("times_the_limit", [1.5, 3])  # Pillow warns above 1x, refuses above 2x.
def test_folder_image_over_the_decompression_bomb_limit_is_named(tmp_path, monkeypatch,
                                                                 times_the_limit):
    make_tree(tmp_path)  # 5x4 images
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", int(20 / times_the_limit))
    message = load_error(f"folder:{tmp_path}")
    assert "ant/0.png" in message and "pixels" in message and "resize" in message


def truncated_png(path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)).save(
        buffer, "PNG")
    path.write_bytes(buffer.getvalue()[:400])


BROKEN_TREES = {  # name: (how to break a good tree, what the message must name)
    "no test/": (lambda r: shutil.rmtree(r / "test"), ["has no test/ folder"]),
    "no classes": (lambda r: [shutil.rmtree(r / "train"), (r / "train").mkdir()],
                   ["train has no class folders"]),
    "class sets differ": (lambda r: shutil.copytree(r / "test" / "ant", r / "test" / "dog"),
                          ["different class folders", "only in test: ['dog']"]),
    "empty class": (lambda r: [(r / s / "emu").mkdir() for s in ("train", "test")],
                    ["train/emu has no images"]),
    "mixed sizes": (lambda r: Image.new("RGB", (6, 4)).save(r / "test" / "cat" / "big.png"),
                    ["test/cat/big.png is 6x4 pixels", "is 5x4"]),
    "not an image": (lambda r: (r / "train" / "bee" / "bad.jpg").write_bytes(b"not a jpeg"),
                     ["cannot decode image", "train/bee/bad.jpg"]),
    "truncated": (lambda r: truncated_png(r / "test" / "ant" / "cut.png"),
                  ["cannot decode image", "test/ant/cut.png"]),
}


@pytest.mark.parametrize("case", list(BROKEN_TREES))
def test_folder_errors_are_one_line_and_name_the_problem(tmp_path, case):
    make_tree(tmp_path)
    break_tree, fragments = BROKEN_TREES[case]
    break_tree(tmp_path)
    message = load_error(f"folder:{tmp_path}")
    for fragment in fragments:
        assert fragment in message


def test_folder_missing_path(tmp_path):
    assert "does not exist" in load_error(f"folder:{tmp_path / 'nope'}")


@pytest.mark.parametrize("where", ["empty", "missing"])
def test_tfds_not_prepared_names_the_build_command(tmp_path, where):
    data_dir = tmp_path if where == "empty" else tmp_path / "missing"
    message = load_error("cifar10", tfds_data_dir=str(data_dir))
    assert f"cifar10 is not prepared as array_record in {data_dir}" in message
    assert "tfds build cifar10 --file_format=array_record" in message
    assert not list(tmp_path.iterdir())  # tfds must not have started writing anything.


def write_array_record_dataset(data_dir, name, splits):
    """Writes TFDS dataset `name` exactly as `tfds build --file_format=array_record` lays it out
    (dataset_info.json plus one ArrayRecord shard of tf.Example protos per split), without
    TensorFlow. `splits`: {split: [{feature: bytes | int, ...} per example]}.

    Not tfds.testing.mock_data: in tfds 4.9.10 its data sources' __getitems__ is a plain
    functools.partial that is never bound, so batched reads raise TypeError under the mock; and
    its images are encoded with TensorFlow.
    """
    import tensorflow_datasets as tfds
    from array_record.python import array_record_module
    from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2

    def feature(value):
        if isinstance(value, bytes):
            return tf_feature_pb2.Feature(bytes_list=tf_feature_pb2.BytesList(value=[value]))
        return tf_feature_pb2.Feature(int64_list=tf_feature_pb2.Int64List(value=[int(value)]))

    builder = tfds.builder(name, data_dir=str(data_dir), file_format="array_record")
    builder.data_path.mkdir(parents=True)
    split_infos = []
    for split, examples in splits.items():
        writer = array_record_module.ArrayRecordWriter(
            str(builder.data_path / f"{name}-{split}.array_record-00000-of-00001"), "group_size:1")
        for example in examples:
            proto = tf_example_pb2.Example(features=tf_feature_pb2.Features(
                feature={k: feature(v) for k, v in example.items()}))
            writer.write(proto.SerializeToString())
        writer.close()
        split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[len(examples)],
                                               num_bytes=0, filename_template=None))
    builder.info.set_splits(tfds.core.SplitDict(split_infos))
    builder.info.write_to_directory(builder.data_path)


def png(image) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, "PNG")
    return out.getvalue()


def write_prepared_tfds(data_dir, name, n_train, n_test):
    """A tiny prepared cifar10 or cifar100 in data_dir; returns {split: (images, labels)}."""
    import tensorflow_datasets as tfds

    num_classes = tfds.builder(name).info.features["label"].num_classes
    rng = np.random.default_rng(2)
    expected, splits = {}, {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, num_classes, n, dtype=np.int32)
        splits[split] = [{"id": b"%d" % i, "image": png(image), "label": label}
                         | ({"coarse_label": (label + 1) % 20} if name == "cifar100" else {})
                         for i, (image, label) in enumerate(zip(images, labels))]
        expected[split] = (images, labels)  # cifar100's coarse label differs from the fine one
    write_array_record_dataset(data_dir, name, splits)
    return expected


@pytest.mark.parametrize("name, num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_tfds_reads_a_prepared_array_record_copy(tmp_path, monkeypatch, name, num_classes):
    import tensorflow_datasets as tfds

    expected = write_prepared_tfds(tmp_path, name, n_train=12, n_test=5)
    ds = data.load(name, tfds_data_dir=str(tmp_path), validation_size=2)
    assert ds.num_classes == num_classes
    assert ds.train.images.shape == (10, 32, 32, 3) and ds.test.images.shape == (5, 32, 32, 3)
    assert ds.train.images.dtype == np.uint8 and ds.train.labels.dtype == np.int32
    assert_splits_equal(ds.test, data.Split(*expected["test"]))  # Pixels and fine labels exact.

    def fail(*args, **kwargs):
        raise AssertionError("read TFDS on a cached load")

    monkeypatch.setattr(tfds, "data_source", fail)
    assert_splits_equal(data.load(name, tfds_data_dir=str(tmp_path)).test, ds.test)
