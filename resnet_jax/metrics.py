"""Run outputs: `metrics.jsonl`, TensorBoard event files and the progress lines on the console.

One JSON object per logged step: `step`, `time` (Unix seconds), `train/loss`, `train/error`
(percent, like the paper), `lr`, the gradient norms and depth diagnostics, `examples_per_sec` (the
train step alone), and where they happened `test/error` (and `val/error`) with `eval_seconds`, and
`checkpoint_seconds` (the saves since the previous record).
Only the main process writes; others keep the same calls as no-ops.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import jax

from resnet_jax.files import write_atomically
from resnet_jax.rundir import METRICS_JSONL, TENSORBOARD


# Wall-clock measurements: `time` (Unix seconds), the train step's throughput, and the seconds
# spent evaluating and checkpointing. Two runs of the same computation differ only in these.
# The last two are the loop's time aside from training (`train.Clock.aside`).
TIME, EXAMPLES_PER_SEC = "time", "examples_per_sec"
EVAL_SECONDS, CHECKPOINT_SECONDS = "eval_seconds", "checkpoint_seconds"
TIMING_KEYS = frozenset({TIME, EXAMPLES_PER_SEC, EVAL_SECONDS, CHECKPOINT_SECONDS})


def read_records(path: pathlib.Path) -> list[dict]:
    """The complete records of a metrics.jsonl; a line cut short by a killed process is not one
    (the resumed run writes it again), for the trainer and every reader alike. Neither is a
    damaged line (bytes that are not UTF-8, JSON that is not an object with a step): each is
    read like a cut one, line by line, so that one bad line costs only itself."""
    out = []
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append(record)
    return out


def hparams(config: dict, prefix: str = "") -> dict:
    """A run's config as TensorBoard HParams: nested keys as 'outer.inner', lists as JSON text,
    None left out; numbers stay numbers (HParams holds every number as a double: depth 14 is
    14, not '14')."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= hparams(value, f"{prefix}{key}.")
        elif value is not None:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) else value
    return out


def hparams_session(values: dict, end: bool = False):
    """The Summary that starts a run's HParams session with `values` (from `hparams`), or with
    `end`, the one that marks it finished. Written into the run's own event files, beside its
    scalars: TensorBoard lists the run once, its final metrics the last points of its curves."""
    from tensorboardX.summary import hparams as summaries  # late: protobuf is slow to load

    _, start, finish = summaries(values, {})
    return finish if end else start


class MetricsWriter:
    def __init__(self, workdir: pathlib.Path, *, total_steps: int, label: str = "",
                 config: dict | None = None):
        self.path = workdir / METRICS_JSONL
        self.total_steps = total_steps
        self.label = label  # prefixes progress lines: which of several runs in one program
        self.hparams = None if config is None else hparams(config)
        self.main = jax.process_index() == 0
        self.tensorboard = workdir / TENSORBOARD
        self._tb = None  # opened at the first write, after `truncate` has cut the old files

    def records(self) -> list[dict]:
        return read_records(self.path) if self.path.exists() else []

    def truncate(self, step: int) -> None:
        """Drops records after `step` from metrics.jsonl, and rebuilds TensorBoard's event files
        from the records kept: a resumed run rewrites the rest exactly as it goes. metrics.jsonl
        is the source of truth: a process killed between writing a record there and to
        TensorBoard leaves the two apart otherwise. Called before the first write."""
        if not self.main:
            return
        kept = [r for r in self.records() if r["step"] <= step]
        if self.path.exists():
            write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        for path in self.tensorboard.glob("events.out.tfevents.*"):
            path.unlink()  # first: killed before the rebuild, the next resume rebuilds again
        for record in kept:
            self._to_tensorboard(record)

    def last_record(self) -> dict:
        records = self.records()
        return records[-1] if records else {}

    def write(self, step: int, record: dict) -> None:
        if not self.main:
            return
        record = {"step": step, **{k: float(v) for k, v in record.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self._to_tensorboard(record)

    def _to_tensorboard(self, record: dict) -> None:
        if self._tb is None:
            from tensorboardX import SummaryWriter  # imported late: protobuf is slow to load

            self._tb = SummaryWriter(str(self.tensorboard))
            if self.hparams is not None:  # each new event file: `truncate` deleted the old
                self._tb.file_writer.add_summary(hparams_session(self.hparams))
        for key, value in record.items():
            if key not in ("step", TIME):  # `time` is each event's own wall time
                self._tb.add_scalar(key, value, record["step"], walltime=record.get(TIME))
        if self.hparams is not None and record["step"] == self.total_steps:
            self._tb.file_writer.add_summary(hparams_session({}, end=True))
        self._tb.flush()

    def progress(self, step: int, record: dict, seconds_left: float | None) -> None:
        if not self.main:
            return
        parts = [f"{self.label}step {step}/{self.total_steps}"]
        names = {"train/loss": "loss {:.3f}", "train/error": "train err {:.2f}%",
                 "val/error": "val err {:.2f}%", "test/error": "test err {:.2f}%",
                 EXAMPLES_PER_SEC: "{:.0f} img/s"}
        parts += [fmt.format(record[k]) for k, fmt in names.items() if k in record]
        if seconds_left is not None:
            parts.append(f"{_duration(seconds_left)} left")
        print(" | ".join(parts), flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class Phase:
    """A long wait announced: one line on stderr as it starts (`decoding ... into the cache
    ...`) and one with its time as it ends (`decoded ... in 70.1s -> ...`), so that a first
    run does not sit silent for a minute before its first logged step. Set `detail` inside the
    block to end the second line with what only the end knows. Nothing is printed at the end
    of a phase that raised: its error speaks. `show=False`: silent (processes other than 0)."""

    def __init__(self, starting: str, done: str, *, show: bool = True):
        self.starting, self.done, self.show, self.detail = starting, done, show, ""

    def __enter__(self):
        if self.show:
            print(f"{self.starting} ...", file=sys.stderr, flush=True)
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type, *_) -> None:
        if self.show and exc_type is None:
            seconds = time.perf_counter() - self._start
            took = f"{seconds:.1f}s" if seconds < 60 else _duration(seconds)
            print(f"{self.done} in {took}{self.detail}", file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
