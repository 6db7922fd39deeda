"""Run outputs: `metrics.jsonl`, TensorBoard event files and the progress line on the console.

One JSON object per logged step: `step`, `time` (Unix seconds), `train/loss`, `train/error`
(percent, like the paper), `lr`, the gradient norms and depth diagnostics, `examples_per_sec` (the
train step alone), and where they happened `test/error` (and `val/error`) with `eval_seconds`, and
`checkpoint_seconds` (the saves since the previous record).
Only the main process writes; others keep the same calls as no-ops.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct

import jax


# Wall-clock measurements: `time` (Unix seconds), the train step's throughput, and the seconds
# spent evaluating and checkpointing. Two runs of the same computation differ only in these.
TIMING_KEYS = frozenset({"time", "examples_per_sec", "eval_seconds", "checkpoint_seconds"})


class MetricsWriter:
    def __init__(self, workdir: pathlib.Path, *, total_steps: int, label: str = ""):
        self.path = workdir / "metrics.jsonl"
        self.total_steps = total_steps
        self.label = label  # prefixes progress lines: which of several runs in one program
        self.main = jax.process_index() == 0
        self.tensorboard = workdir / "tensorboard"
        self._tb = None  # opened at the first write, after `truncate` has cut the old files

    def records(self) -> list[dict]:
        """The complete records on disk; a line cut short by a killed process is not one."""
        out = []
        for line in self.path.read_text().splitlines() if self.path.exists() else []:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out

    def truncate(self, step: int) -> None:
        """Drops records after `step`, from metrics.jsonl and TensorBoard's event files: a resumed
        run rewrites them exactly as it goes. Called before the first write."""
        if not self.main:
            return
        if self.path.exists():
            kept = [r for r in self.records() if r["step"] <= step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        for path in sorted(self.tensorboard.glob("events.out.tfevents.*")):
            _truncate_events(path, step)

    def last_record(self) -> dict:
        records = self.records()
        return records[-1] if records else {}

    def write(self, step: int, record: dict) -> None:
        if not self.main:
            return
        record = {"step": step, **{k: float(v) for k, v in record.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is None:
            from tensorboardX import SummaryWriter  # imported late: protobuf is slow to load

            self._tb = SummaryWriter(str(self.tensorboard))
        for key, value in record.items():
            if key not in ("step", "time"):  # every TensorBoard event has its own wall time
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def progress(self, step: int, record: dict, seconds_left: float | None) -> None:
        if not self.main:
            return
        parts = [f"{self.label}step {step}/{self.total_steps}"]
        names = {"train/loss": "loss {:.3f}", "train/error": "train err {:.2f}%",
                 "val/error": "val err {:.2f}%", "test/error": "test err {:.2f}%",
                 "examples_per_sec": "{:.0f} img/s"}
        parts += [fmt.format(record[k]) for k, fmt in names.items() if k in record]
        if seconds_left is not None:
            parts.append(f"{_duration(seconds_left)} left")
        print(" | ".join(parts), flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _truncate_events(path: pathlib.Path, step: int) -> None:
    """Rewrites a TensorBoard event file without its summaries after `step` and without a record
    cut short by a killed process. Every reader then agrees (TensorBoard's own purge of
    "orphaned" steps is a display option that other readers do not share).

    An event file is a sequence of TFRecords: length (uint64), its CRC, an Event proto, its CRC.
    """
    from tensorboardX.proto.event_pb2 import Event

    data, kept, i = path.read_bytes(), [], 0
    while i + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[i:i + 8])
        end = i + 12 + length + 4
        if end > len(data):
            break
        try:
            event = Event.FromString(data[i + 12:end - 4])
        except Exception:  # noqa: BLE001 - protobuf's DecodeError: the rest is not a record
            break
        if not (event.HasField("summary") and event.step > step):
            kept.append(data[i:end])
        i = end
    if sum(map(len, kept)) == len(data):
        return
    tmp = path.with_name("truncating.tmp")  # no "tfevents" in the name: no reader takes it
    try:
        tmp.write_bytes(b"".join(kept))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
