"""The ImageNet input rate (issue 17, item 4): CPU seconds per image, and so images/s per host
core, of the streamed pipeline as training runs it (pipeline.py: array_record read, JPEG decode,
random-resized crop, flip, batching), on JPEGs of ImageNet's sizes that it makes itself:

    python -m benchmarks.input_rate --data=/tmp/inet_like --make=3000 --from=/tmp/cifar10_jpeg/train
    python -m benchmarks.input_rate --data=/tmp/inet_like --threads=1,2 --workers=1,2 --json=OUT

`--make=N` (when DATA holds no images yet) writes N JPEGs to DATA/jpeg/<class>/ and the same
files as TFDS imagenet2012 prepared as array_record to DATA/tfds, the layout `tfds build` writes
(tests/test_data.write_array_record_dataset). Each is a picture from `--from` (an image folder,
e.g. CIFAR-10's JPEGs; without it, random smooth colour fields) resized to an ImageNet-like size
(`image_size`) with film-grain-like noise added so that it compresses like a photograph (about
105 KB at quality 90, near the ~110 KB mean commonly quoted for ILSVRC-2012's training JPEGs,
which is not measured here; `make_image`).

Measured, all on the same images in one process:
  1. per image, one thread, in `--rounds` rounds, the variants taking turns image by image
     or batch by batch (CPU seconds, which a busy machine changes less than wall time): the
     record read; the whole-image decode alone (as TFDS decodes); batches of the pipeline
     computed in this thread, as training runs it (images kept encoded, decoded by the crop, in
     JPEG draft mode where the crop allows), the same with draft mode off, and as it ran before
     (TFDS decoding every image whole into an array first); plus the share of crops that draft
     mode decoded below full size;
  2. the pipeline made ahead by `pipeline.iterate` with each of `--threads` threads in this
     process, and with each of `--workers` grain worker processes: wall images/s once started,
     not counting what it read ahead (`stream_rate`; CPU seconds per image too for threads).
One core keeps up with 1 / (CPU s per image) images/s; an accelerator training at R images/s
needs R x (CPU s per image) cores (benchmarks/time_model.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np
from absl import flags
from PIL import Image, JpegImagePlugin, features

from resnet_jax import pipeline
from resnet_jax.cli import ArgumentParser, int_list

NAME = "imagenet2012"


class BadInput(ValueError):
    """A request this benchmark cannot carry out; str(e) names the fix (exit status 2)."""

# Aspect ratios (w:h), drawn uniformly: landscape photographs dominate ImageNet.
ASPECTS = ((4, 3), (4, 3), (4, 3), (3, 2), (1, 1), (3, 4), (2, 3), (16, 9))
LONG_SIDE, LARGE_SHARE, LARGE_SIDES = 500, 0.1, (501, 1000)  # most ImageNet images: 500 px long
GRAIN, QUALITY = 24.0, 90  # noise level (grey levels) and JPEG quality: ~105 KB per image


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): an aspect ratio from ASPECTS; the long side 500 pixels, or for a tenth of
    the images uniform in 501-1000 (ImageNet's larger photographs)."""
    aw, ah = ASPECTS[rng.integers(len(ASPECTS))]
    large = rng.random() < LARGE_SHARE
    long = int(rng.integers(*LARGE_SIDES, endpoint=True)) if large else LONG_SIDE
    return (long, round(long * ah / aw)) if aw >= ah else (round(long * aw / ah), long)


def _grain(rng: np.random.Generator, h: int, w: int, channels: int) -> np.ndarray:
    """Unit-variance noise with detail at 1, 2 and 4 pixels (finer than any JPEG block)."""
    octaves = []
    for k in (1, 2, 4):
        layers = [Image.fromarray(rng.normal(0, 1, (-(-h // k), -(-w // k))).astype(np.float32),
                                  "F").resize((w, h), Image.BILINEAR) for _ in range(channels)]
        octaves.append(np.stack([np.asarray(x) for x in layers], -1))
    return sum(octaves) / np.sqrt(len(octaves))


def make_image(base: np.ndarray, rng: np.random.Generator) -> bytes:
    """`base` (uint8 RGB) resized (bicubic) to `image_size`, plus grain shared by the channels
    and 0.7 as much per channel (GRAIN grey levels in all), as a quality-90 JPEG (4:2:0)."""
    w, h = image_size(rng)
    picture = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC), np.float32)
    grain = (_grain(rng, h, w, 1) + 0.7 * _grain(rng, h, w, 3)) / np.sqrt(1.49)
    out = io.BytesIO()
    Image.fromarray(np.clip(picture + GRAIN * grain, 0, 255).astype(np.uint8)).save(
        out, "JPEG", quality=QUALITY)
    return out.getvalue()


def _bases(source: str | None, count: int, rng) -> list[tuple[str, np.ndarray]]:
    """(class, picture) for each image to make: `source`'s images, evenly spaced in sorted order
    (so every class folder gives its share), class = their folder's name; or random 8x6 colour
    fields, in 10 classes."""
    if source is None:
        return [(f"c{i % 10}", rng.integers(0, 256, (6, 8, 3), np.uint8)) for i in range(count)]
    files = sorted(str(p) for p in pathlib.Path(source).rglob("*")
                   if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise BadInput(f"--from={source} holds no .jpg/.jpeg/.png images: pass an image "
                       "folder, e.g. CIFAR-10's JPEGs")
    picked = [files[i * len(files) // count] if count <= len(files) else files[i % len(files)]
              for i in range(count)]
    return [(pathlib.Path(f).parent.name, np.asarray(Image.open(f).convert("RGB"))) for f in picked]


def make(data: pathlib.Path, count: int, source: str | None, seed: int = 0) -> dict:
    """Writes `count` images to data/jpeg and data/tfds; returns their statistics."""
    from tests.test_data import write_array_record_dataset  # the checkout's tfds-layout writer

    rng = np.random.default_rng(seed)
    bases = _bases(source, count, rng)
    classes = sorted({c for c, _ in bases})
    examples, sizes = [], []
    for i, (cls, base) in enumerate(bases):
        jpeg = make_image(base, rng)
        path = data / "jpeg" / cls / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg)
        with Image.open(io.BytesIO(jpeg)) as image:
            sizes.append(image.size)
        examples.append({"image": jpeg, "label": classes.index(cls),
                         "file_name": path.name.encode()})
    write_array_record_dataset(data / "tfds", NAME, {"train": examples})
    return stats(examples, sizes, source)


def stats(examples: list[dict], sizes: list[tuple[int, int]], source: str | None) -> dict:
    kb = np.array([len(e["image"]) for e in examples]) / 1e3
    pixels = np.array([w * h for w, h in sizes])
    return {"count": len(examples), "source": source or "random colour fields",
            "mean_kb": float(kb.mean()), "median_kb": float(np.median(kb)),
            "mean_pixels": float(pixels.mean()),
            "share_500_long": float(np.mean([max(s) == LONG_SIDE for s in sizes]))}


# --- Measuring ---------------------------------------------------------------------------------


def _cpu_s() -> float:
    return time.process_time()  # all threads of this process


def interleaved(variants: dict, items) -> dict[str, float]:
    """CPU seconds per item of each variant's function, in this thread, the variants taking
    turns item by item, so that a busy machine's drift hits them alike. A variant is fn or
    (fn, context manager factory) to run fn in."""
    totals = dict.fromkeys(variants, 0.0)
    for item in items:
        for name, variant in variants.items():
            fn, context = (variant if isinstance(variant, tuple)
                           else (variant, contextlib.nullcontext))
            with context():
                start = _cpu_s()
                fn(item)
                totals[name] += _cpu_s() - start
    return {name: total / len(items) for name, total in totals.items()}


@contextlib.contextmanager
def draft_off():
    """Every JPEG decoded whole, as if draft mode did not exist (to tell its share apart)."""
    draft = JpegImagePlugin.JpegImageFile.draft
    JpegImagePlugin.JpegImageFile.draft = lambda self, mode, size: None
    try:
        yield
    finally:
        JpegImagePlugin.JpegImageFile.draft = draft


@contextlib.contextmanager
def draft_scales():
    """Records the scale of every JPEG draft-mode decode (1/2, 1/4, 1/8: 2, 4, 8)."""
    scales, draft = [], JpegImagePlugin.JpegImageFile.draft

    def recording(self, mode, size):
        out = draft(self, mode, size)
        if out is not None:
            scales.append(self.decoderconfig[0])
        return out

    JpegImagePlugin.JpegImageFile.draft = recording
    try:
        yield scales
    finally:
        JpegImagePlugin.JpegImageFile.draft = draft


def stream_rate(stream, batches: int, *, threads: int, workers: int,
                seconds_per_batch: float) -> dict:
    """Images/s (wall) of the first `batches` batches of `stream` made ahead by pipeline.iterate,
    once started and idle: after the first batch it waits until the threads' or workers'
    read-ahead is full (twice as long as the first batch took, start-up included), then takes
    the rest, the clock starting after the batches that come at once from the read-ahead (in
    under a fifth of `seconds_per_batch` (one thread's time per batch) / the threads or
    workers). CPU seconds per image over the same span for threads (grain's worker processes
    are not in this process's CPU time)."""
    iterator = pipeline.iterate(stream[:batches], threads=threads, workers=workers)
    start = time.perf_counter()
    next(iterator)
    time.sleep(max(0.2, 2 * (time.perf_counter() - start)))
    at_once = 0.2 * seconds_per_batch / max(threads, workers)
    wall, cpu, images, buffered = time.perf_counter(), _cpu_s(), 0, 0
    for batch in iterator:
        if not images and time.perf_counter() - wall < at_once:
            buffered += 1  # made while we waited: restart the clock
            wall, cpu = time.perf_counter(), _cpu_s()
        else:
            images += len(batch["label"])
    wall, cpu = time.perf_counter() - wall, _cpu_s() - cpu
    if hasattr(iterator, "close"):
        iterator.close()
    if not images:
        raise BadInput(f"all {batches} batches were read ahead before the clock started: "
                       "pass a larger --batches")
    row = {"threads": threads, "workers": workers, "images": images,
           "read_ahead_batches": buffered, "images_per_sec": images / wall}
    if not workers:
        row["cpu_s_per_image"] = cpu / images
    return row


def measure(data: pathlib.Path, *, size: int, batch: int, batches: int, rounds: int,
            threads: list[int], workers: list[int], per_image_count: int) -> dict:
    import tensorflow_datasets as tfds

    tfds_dir = str(data / "tfds")
    encoded = pipeline.source(NAME, "train", tfds_dir)  # as training reads it
    decoded = tfds.data_source(NAME, split="train", data_dir=tfds_dir, download=False)  # before
    n = len(encoded)
    jpegs = [encoded[i]["image"] for i in range(min(n, per_image_count))]
    sizes = []
    for jpeg in jpegs:
        with Image.open(io.BytesIO(jpeg)) as image:
            sizes.append(image.size)
    common = dict(seed=0, batch_size=batch, image_size=size, flip=True,
                  num_steps=max(1, per_image_count // batch))
    after = pipeline.train_stream(encoded, **common)
    before = pipeline.train_stream(decoded, **common)
    steps = range(common["num_steps"])

    def decode(jpeg):
        with Image.open(io.BytesIO(jpeg)) as image:
            return np.asarray(image)

    timings = {}
    for _ in range(rounds):
        alone = interleaved({"read": lambda i: encoded[i], "decode": lambda i: decode(jpegs[i])},
                            range(len(jpegs)))
        whole = interleaved({"pipeline_before": lambda s: before[s],
                             "pipeline_no_draft": (lambda s: after[s], draft_off),
                             "pipeline": lambda s: after[s]}, steps)
        for key, value in alone.items() | {k: v / batch for k, v in whole.items()}.items():
            timings.setdefault(key, []).append(value)
    serial = {k: statistics.median(v) for k, v in timings.items()}
    serial["rounds"] = timings

    rng = np.random.default_rng(0)
    with draft_scales() as scales:
        for jpeg in jpegs:
            pipeline.random_resized_crop(jpeg, size, rng)
    drafted = {str(s): scales.count(s) / len(jpegs) for s in (2, 4, 8)}

    stream = pipeline.train_stream(encoded, **dict(common, num_steps=batches))
    per_batch = serial["pipeline"] * batch
    parallel = [stream_rate(stream, batches, threads=t, workers=0, seconds_per_batch=per_batch)
                for t in threads]
    parallel += [stream_rate(stream, batches, threads=1, workers=w, seconds_per_batch=per_batch)
                 for w in workers]
    return {"serial_cpu_s_per_image": serial, "drafted_share": drafted, "streamed": parallel,
            "images_measured": len(jpegs), "image_sizes": {
                "mean_kb": float(np.mean([len(j) for j in jpegs]) / 1e3),
                "mean_pixels": float(np.mean([w * h for w, h in sizes]))}}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(),
            "load_average": os.getloadavg(), "python": platform.python_version(),
            "pillow": Image.__version__,
            "libjpeg_turbo": features.version("libjpeg_turbo"),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def markdown(result: dict) -> str:
    s = result["serial_cpu_s_per_image"]
    size = result["size"]
    lines = [f"| per image, one thread (median of {len(s['rounds']['read'])} rounds) | CPU ms "
             "| images/s per core |", "|---|---:|---:|"]
    for key, what in (("read", "array_record read + parse"),
                      ("decode", "decode alone, whole image (Pillow)"),
                      ("pipeline_before", f"pipeline before: whole decode, crop to {size}, flip, "
                                          "batch"),
                      ("pipeline_no_draft", "pipeline now, draft mode off: decode in the crop, "
                                            "whole"),
                      ("pipeline", f"pipeline now: decode in the crop (draft), crop to {size}, "
                                   "flip, batch")):
        lines.append(f"| {what} | {1e3 * s[key]:.2f} | {1 / s[key]:,.0f} |")
    ratio = s["pipeline_before"] / s["pipeline"]
    drafted = ", ".join(f"1/{k}: {100 * v:.0f} %" for k, v in result["drafted_share"].items())
    lines += ["", f"now / before: {ratio:.2f}x the images per CPU second; crops decoded below full "
              f"size: {drafted}", "",
              "| streamed (pipeline.iterate) | threads | grain workers | images/s (wall) "
              "| CPU ms per image |", "|---|---:|---:|---:|---:|"]
    for row in result["streamed"]:
        cpu = row.get("cpu_s_per_image")
        cpu = "-" if cpu is None else f"{1e3 * cpu:.2f}"
        lines.append(f"| {row['images']} images | {row['threads']} | {row['workers']} "
                     f"| {row['images_per_sec']:,.0f} | {cpu} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = ArgumentParser("benchmarks.input_rate", __doc__)
    parser.add_argument("--data", required=True, help="folder of the images (made by --make)")
    parser.add_argument("--make", type=int, default=0,
                        help="make this many images first, if --data holds none")
    parser.add_argument("--from", dest="source", help="image folder the pictures come from")
    parser.add_argument("--size", type=int, default=224, help="side of the training crops")
    parser.add_argument("--batch", type=int, default=64, help="images per batch (one host)")
    parser.add_argument("--batches", type=int, default=32, help="batches per streamed run")
    parser.add_argument("--per-image", type=int, default=512,
                        help="images in the one-thread measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the one-thread measure")
    parser.add_argument("--threads", type=int_list, default="1,2",
                        help="thread counts to stream with")
    parser.add_argument("--workers", type=int_list, default="1,2",
                        help="grain worker counts to stream with")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    threads, workers = args.threads, args.workers
    if any(t < 1 for t in threads) or any(w < 1 for w in workers):
        parser.error("--threads and --workers take counts of 1 or more")
    for flag in ("size", "batch", "batches", "per_image", "rounds"):
        if getattr(args, flag) < 1 or (flag == "batches" and args.batches < 2):
            parser.error(f"--{flag.replace('_', '-')}={getattr(args, flag)}: pass a positive "
                         "integer (--batches: 2 or more)")
    data = pathlib.Path(args.data)
    made = None
    if not (data / "tfds").is_dir():
        if not args.make:
            parser.error(f"--data={data} holds no images yet: add --make=N (e.g. --make=3000) "
                         "to make them")
        if args.source and not pathlib.Path(args.source).is_dir():
            parser.error(f"--from={args.source} is not a folder: pass an image folder")
        start = time.perf_counter()
        try:
            made = make(data, args.make, args.source)
        except BadInput as e:
            parser.error(str(e))
        print(f"[input_rate] made {made['count']} images ({made['mean_kb']:.0f} KB, "
              f"{made['mean_pixels']:,.0f} pixels on average) in "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags (the CLI parses them)
    try:
        measured = measure(data, size=args.size, batch=args.batch, batches=args.batches,
                           rounds=args.rounds, threads=threads, workers=workers,
                           per_image_count=args.per_image)
    except BadInput as e:
        parser.error(str(e))
    result = {"machine": machine(), "size": args.size, "batch": args.batch, **measured}
    if made:
        result["made"] = made
    result["machine"]["load_average_after"] = os.getloadavg()
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
