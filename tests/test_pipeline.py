"""Tests for resnet_jax.pipeline, the streamed (ImageNet) input: the crops, the order and the
per-process shares of the grain pipeline, and ImageNet configs training on TFDS mock data on 8
simulated devices and on a prepared array_record copy with 2 local processes.
"""
import io
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image, JpegImagePlugin

from resnet_jax import checkpoint, data, pipeline, train
from resnet_jax.configs import imagenet
from tests.test_data import png, write_array_record_dataset
from tests.test_distributed import GRAD_RTOL, env, free_port, records

REPO = pathlib.Path(__file__).resolve().parents[1]


def examples(n, seed=0):
    """n images of assorted sizes (all smaller and larger than the crops); label = index."""
    rng = np.random.default_rng(seed)
    return [{"image": rng.integers(0, 256, (20 + 7 * (i % 5), 24 + 11 * (i % 3), 3), np.uint8),
             "label": i} for i in range(n)]


def take(batches):
    return {k: np.asarray(v) for k, v in batches.items()}


# --- Crops -------------------------------------------------------------------------------------


def test_random_resized_crop_covers_8_to_100_percent_at_allowed_aspect_ratios():
    # Pixels hold their own coordinates (y, x): a crop's corner pixels reveal its box.
    h, w = 200, 240
    ys, xs = np.mgrid[0:h, 0:w]
    image = np.stack([ys, xs, np.zeros_like(ys)], -1).astype(np.uint8)
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(30):
        out = pipeline.random_resized_crop(image, 64, rng).astype(float)
        assert out.shape == (64, 64, 3)
        (y0, x0), (y1, x1) = out[0, 0, :2], out[-1, -1, :2]
        side_y, side_x = y1 - y0, x1 - x0  # a pixel or two short of the box: bilinear corners
        areas.append(side_y * side_x / (h * w))
        assert 0.06 < areas[-1] <= 1.0
        assert 3 / 4 * 0.85 < side_x / side_y < 4 / 3 * 1.15
    assert max(areas) - min(areas) > 0.3  # random sizes, not one fixed crop
    # Deterministic in the generator.
    a = pipeline.random_resized_crop(image, 32, np.random.default_rng(5))
    b = pipeline.random_resized_crop(image, 32, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    # area=(1, 1), ratio=(6/5, 6/5) on a 6:5 image: the whole image, resized.
    whole = pipeline.random_resized_crop(image, 32, rng, area=(1, 1), ratio=(1.2, 1.2))
    np.testing.assert_array_equal(whole, pipeline.crop(Image.fromarray(image), (0, 0, w, h), 32))


def test_random_resized_crop_falls_back_to_the_largest_allowed_centre_crop():
    image = np.zeros((10, 100, 3), np.uint8)  # 10:1, wider than any allowed aspect ratio
    image[:, 43:57] = 255  # the central 14 columns: 10 x 13.3 is the fallback crop
    out = pipeline.random_resized_crop(image, 8, np.random.default_rng(0))
    assert out.min() > 200  # only the white centre is in the crop


def test_center_crop_takes_the_central_square_of_the_shorter_side():
    ys, xs = np.mgrid[0:64, 0:128]
    image = np.stack([ys, xs, np.zeros_like(ys)], -1).astype(np.uint8)  # pixels = (y, x)
    out = pipeline.center_crop(image, 16).astype(float)
    assert out.shape == (16, 16, 3)
    # The box is the central 56 x 56 (64 * 0.875): rows 4-60, columns 36-92; corner pixels sit
    # within one output pixel (3.5 input pixels) inside it.
    np.testing.assert_allclose(out[0, 0, :2], (4, 36), atol=3.5)
    np.testing.assert_allclose(out[-1, -1, :2], (60, 92), atol=3.5)


def test_grayscale_images_become_rgb():
    out = pipeline.center_crop(np.full((40, 40, 1), 7, np.uint8), 8)
    assert out.shape == (8, 8, 3) and (out == 7).all()
    for mode in ("L", "CMYK"):  # JPEGs that are not YCbCr decode to RGB too
        gray = Image.fromarray(np.full((40, 40), 7, np.uint8)).convert(mode)
        out = pipeline.center_crop(encoded(gray, quality=95), 8)
        assert out.shape == (8, 8, 3) and out.dtype == np.uint8
        assert np.abs(out.astype(int) - (np.asarray(gray.convert("RGB"))[:8, :8])).max() <= 2


# --- Decoding JPEGs in the crop (draft mode) ------------------------------------------------


def photo(h, w, seed=0):
    """A smooth random picture with mild grain: a few random colours upsampled, plus noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), np.uint8)).resize((w, h),
                                                                               Image.BICUBIC)
    return np.clip(np.asarray(coarse) + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)


def encoded(image, quality=90) -> bytes:
    """`image` (an array or a PIL image) as JPEG bytes."""
    out = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(
        out, "JPEG", quality=quality)
    return out.getvalue()


def decoded(jpeg: bytes) -> np.ndarray:
    """The whole JPEG as an array, as TFDS decodes it."""
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def test_a_jpeg_is_decoded_at_the_smallest_scale_that_keeps_the_crop_at_full_size(monkeypatch):
    jpeg = encoded(photo(300, 400))
    scales = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        out = draft(self, mode, size)
        scales.append(self.decoderconfig[0])
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    whole = Image.fromarray(decoded(jpeg))
    # Box sides over the output size: under 2 decodes in full, bit for bit as the array;
    # 2-4 at 1/2; 4-8 at 1/4; 8 and more at 1/8 (a 37-pixel side at 1/8 still holds 32).
    for box, size, scale in [((10, 20, 110, 100), 48, 1), ((0, 0, 399, 299), 150, 1),
                             ((0, 0, 300, 300), 150, 2), ((50, 0, 350, 300), 64, 4),
                             ((0, 0, 400, 300), 37, 8)]:
        scales.clear()
        out = pipeline.crop(Image.open(io.BytesIO(jpeg)), box, size)
        full = pipeline.crop(whole, box, size)
        assert out.shape == (size, size, 3) and out.dtype == np.uint8
        assert scales == ([] if scale == 1 else [scale])
        if scale == 1:
            np.testing.assert_array_equal(out, full)
        else:  # DCT-domain shrinking then bilinear, against bilinear alone: close, not equal
            diff = np.abs(out.astype(float) - full)
            assert 0 < diff.mean() < 1.5 and diff.max() < 12, (box, diff.mean(), diff.max())


def test_crops_of_jpeg_bytes_follow_the_seed_and_match_crops_of_the_decoded_image():
    jpegs = [encoded(photo(240 + 40 * (i % 3), 320 + 60 * (i % 2), seed=i)) for i in range(12)]
    from_bytes, from_arrays = [], []
    for seed in range(3):
        for i, jpeg in enumerate(jpegs):
            a = pipeline.random_resized_crop(jpeg, 56, np.random.default_rng([seed, i]))
            b = pipeline.random_resized_crop(jpeg, 56, np.random.default_rng([seed, i]))
            np.testing.assert_array_equal(a, b)  # deterministic in the generator
            from_bytes.append(a)
            from_arrays.append(pipeline.random_resized_crop(decoded(jpeg), 56,
                                                            np.random.default_rng([seed, i])))
    x, y = np.stack(from_bytes).astype(float), np.stack(from_arrays).astype(float)
    assert x.shape == y.shape == (36, 56, 56, 3)
    # The same boxes (the draws depend on the size alone, read from the header), so the same
    # pictures: per-crop means within a level, pixel statistics alike.
    np.testing.assert_allclose(x.mean(axis=(1, 2, 3)), y.mean(axis=(1, 2, 3)), atol=1.0)
    assert abs(x.std() - y.std()) < 0.02 * y.std()
    assert np.abs(x - y).mean() < 2.0
    # Some crops decoded at 1/2 or less (not equal), some in full (equal to the array's).
    equal = [np.array_equal(a, b) for a, b in zip(x, y)]
    assert 0 < sum(equal) < len(equal)


def test_the_stream_over_jpeg_bytes_is_deterministic_per_seed():
    source = [{"image": encoded(photo(200, 260, seed=i)), "label": i} for i in range(8)]
    stream = dict(STREAM, batch_size=4, image_size=32, num_steps=4)
    one = [take(b) for b in pipeline.iterate(pipeline.train_stream(source, **stream), threads=1)]
    two = [take(b) for b in pipeline.iterate(pipeline.train_stream(source, **stream), threads=2)]
    other = take(pipeline.train_stream(source, **dict(stream, seed=4))[0])
    for a, b in zip(one, two, strict=True):
        assert a["image"].shape == (4, 32, 32, 3)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(one[0]["image"], other["image"])


# --- Order and shares ------------------------------------------------------------------------

STREAM = dict(seed=3, batch_size=8, image_size=8, flip=True, num_steps=6)


def test_every_epoch_is_a_fresh_permutation_of_the_training_set():
    batches = pipeline.train_stream(examples(16), **STREAM)
    labels = [take(batches[s])["label"] for s in range(6)]  # 3 epochs of 2 batches
    epochs = [np.sort(np.concatenate(labels[i:i + 2])) for i in (0, 2, 4)]
    for epoch in epochs:
        np.testing.assert_array_equal(epoch, np.arange(16))
    assert not np.array_equal(np.concatenate(labels[0:2]), np.concatenate(labels[2:4]))


def test_processes_read_disjoint_rows_of_the_same_global_batches():
    source = examples(16)
    whole = pipeline.train_stream(source, **STREAM)
    halves = [pipeline.train_stream(source, **STREAM, part=(p, 2)) for p in range(2)]
    quarters = [pipeline.train_stream(source, **STREAM, part=(p, 4)) for p in range(4)]
    for step in range(6):
        one = take(whole[step])
        for shares in (halves, quarters):
            rows = [take(s[step]) for s in shares]
            assert all(len(r["label"]) == 8 // len(shares) for r in rows)
            for key in one:  # pixels too: the augmentation follows the example's position
                np.testing.assert_array_equal(np.concatenate([r[key] for r in rows]), one[key])


def test_resumed_stream_and_thread_count_do_not_change_the_batches():
    source = examples(16)
    stream = pipeline.train_stream(source, **STREAM)
    serial = [take(b) for b in pipeline.iterate(stream, threads=1)]
    threaded = [take(b) for b in pipeline.iterate(stream, threads=4)]
    resumed = [take(b) for b in pipeline.iterate(stream[4:], threads=2)]
    assert len(serial) == 6
    for a, b in zip(serial, threaded):
        np.testing.assert_array_equal(a["image"], b["image"])
    for a, b in zip(serial[4:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_eval_shares_cover_each_example_once_with_the_padding_masked():
    source = examples(13)
    for count in (1, 2):
        seen = []
        for p in range(count):
            for batch in pipeline.iterate(pipeline.eval_stream(
                    source, batch_size=4, image_size=8, part=(p, count)), threads=2):
                batch = take(batch)
                assert batch["image"].shape == (4 // count, 8, 8, 3)
                seen += list(batch["label"][batch["mask"]])
                assert (batch["image"][~batch["mask"]] == 0).all()
        assert sorted(seen) == list(range(13))
    subset = np.array([2, 5, 11])
    batches = pipeline.eval_stream(source, batch_size=2, image_size=8, indices=subset)
    got = [take(b) for b in pipeline.iterate(batches, threads=1)]
    assert [list(b["label"][b["mask"]]) for b in got] == [[2, 5], [11]]


def test_an_unprepared_imagenet_names_the_manual_download_and_the_build_command(tmp_path):
    with pytest.raises(data.DataError) as info:
        pipeline.source("imagenet2012", "train", str(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    assert "imagenet2012 is not prepared as array_record" in message
    assert "ILSVRC2012_img_train.tar" in message
    assert "tfds build imagenet2012 --file_format=array_record" in message


def test_cli_refuses_an_unprepared_imagenet_before_writing_anything(tmp_path):
    workdir = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "resnet_jax.main", "train",
         "--config=resnet_jax/configs/imagenet.py:depth=18",
         f"--config.tfds_data_dir={tmp_path / 'tfds'}", f"--workdir={workdir}"],
        cwd=REPO, capture_output=True, text=True, env=env(), timeout=300)
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert "imagenet2012 is not prepared" in last and "tfds build imagenet2012" in last
    assert not workdir.exists()


# --- Training on ImageNet configs ------------------------------------------------------------

N_TRAIN, N_VAL = 48, 13
# Small: process start-up and compilation are most of the time. Batch norm over 16 images
# makes rounding grow fast from step to step (the 2-process run reduces in another order):
# hence a low learning rate, two steps and 1e-4 tolerances below.
TRAIN_ARGS = {"image_size": 64, "batch_size": 16, "total_steps": 2, "log_every_steps": 1,
              "eval_every_steps": 1, "eval_batch_size": 8, "eval_subset": 5,
              "checkpoint_every_steps": 2, "input_threads": 2, "log_diagnostics": False,
              # Small enough that a step whose gradient moved by a ReLU flipped under another
              # reduction order (tests/test_distributed.py) moves no parameter past the
              # comparison's tolerance; a process reading the wrong rows still shows in the loss.
              "learning_rate": 1e-4}


def fake_imagenet():
    """{split: examples} with PNG-exact pixels, shared by the mock and the prepared copy."""
    return {"train": examples(N_TRAIN, seed=1), "validation": examples(N_VAL, seed=2)}


@pytest.fixture(scope="module")
def mock_run(tmp_path_factory):
    """ResNet-18 (imagenet.py) on TFDS mock data, 8 simulated devices, in this process."""
    splits = fake_imagenet()
    config = imagenet.get_config("depth=18")
    config.update(TRAIN_ARGS)
    workdir = tmp_path_factory.mktemp("imagenet") / "mock"
    as_source = lambda builder, split, **kwargs: splits[split]  # noqa: E731
    with tfds.testing.mock_data(as_data_source_fn=as_source):
        summary = train.train_and_evaluate(config, str(workdir))
    assert jax.device_count() == 8
    return workdir, summary


def test_imagenet_config_trains_on_mock_data_on_8_devices(mock_run):
    workdir, summary = mock_run
    got = records(workdir)
    assert [r["step"] for r in got] == [1, 2]
    assert all({"train/loss", "test/error", "test/loss"} <= r.keys() for r in got)
    assert all(np.isfinite(r["train/loss"]) for r in got)
    assert summary["step"] == 2
    # Mid-run on the 5-image subset, at the end on all 13 validation images.
    assert (got[0]["test/error"] * 5 / 100) == pytest.approx(round(got[0]["test/error"] * 5 / 100))
    assert (summary["test/error"] * 13 / 100) == pytest.approx(
        round(summary["test/error"] * 13 / 100))
    assert json.loads((workdir / "config.json").read_text())["model"] == "imagenet"


def test_imagenet_on_two_processes_trains_what_the_mock_run_trains(mock_run, tmp_path):
    """A prepared array_record copy of the same images, read by 2 processes x 4 devices, each
    reading only its share, gives the single-process mock run's metrics and parameters."""
    splits = fake_imagenet()
    write_array_record_dataset(tmp_path / "tfds", "imagenet2012", {
        split: [{"image": png(e["image"]), "label": e["label"], "file_name": b"%d.png" % i}
                for i, e in enumerate(examples)] for split, examples in splits.items()})
    workdir = tmp_path / "two"
    args = [f"--config.{k}={v}" for k, v in TRAIN_ARGS.items()]
    run = subprocess.run(
        ["bash", "launch/local.sh", "2", sys.executable, "-m", "resnet_jax.main", "train",
         "--config=resnet_jax/configs/imagenet.py:depth=18", *args,
         f"--config.tfds_data_dir={tmp_path / 'tfds'}", f"--workdir={workdir}"],
        cwd=REPO, env=env(DEVICES_PER_PROCESS="4", PORT=str(free_port()), LOG_DIR=str(tmp_path)),
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr + (tmp_path / "process-1.log").read_text()

    mock_dir, _ = mock_run
    two, one = records(workdir), records(mock_dir)
    assert len(two) == len(one) == 2
    for a, b in zip(two, one):
        assert a.keys() == b.keys()
        for key in a:
            # Gradient norms to GRAD_RTOL: a ReLU input within rounding of zero may fall on the
            # other side under another reduction order (tests/test_distributed.py).
            rel = GRAD_RTOL if key.startswith("grad_norm") else 1e-4
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-5), (a["step"], key)
    # Parameters and batch statistics; not the momentum (it holds the raw gradient, where a
    # different device count alone moves single components by ~1e-3, even in one process).
    two, one = (checkpoint.read(d / "checkpoints", 2) for d in (workdir, mock_dir))
    for x, y in zip(jax.tree.leaves((two["params"], two["batch_stats"])),
                    jax.tree.leaves((one["params"], one["batch_stats"])), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=3e-5)
