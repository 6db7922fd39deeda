"""The training loop; `train_and_evaluate(config, workdir)` runs a whole job.

`train_runs` checks every run, `Training` builds one program (backend, data, compiled step,
checkpoints, outputs) from what passed, refusing before it writes anything, and `Training.loop`
calls the step (step.py), logs, evaluates and saves from the runs' common step to the last;
`finish` writes each summary. Data order and augmentation are functions of (seed, step), so a
resumed run continues exactly where an unbroken one would be: resume.py restores it, rundir.py
names and checks its files.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import time

import jax
import ml_collections
import numpy as np

from resnet_jax import data, parallel, pipeline, resume, rundir
from resnet_jax.checkpoint import Checkpointer, Preempted, PreemptionWatch
from resnet_jax.configs.check import check_config
from resnet_jax.errors import ConfigError
from resnet_jax.metrics import (CHECKPOINT_SECONDS, EVAL_SECONDS, EXAMPLES_PER_SEC, TIME,
                                MetricsWriter)
from resnet_jax.step import (TrainCalls, create_backend, evaluate, make_eval_step, make_training,
                             per_layer_metrics)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       restart: bool = False) -> dict:
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the summary.
    `restart`: when checkpoints exist but none can be read, set them aside, start from step 0."""
    return train_runs([config], [workdir], restart=restart)[0]


def _check_seed_group(configs) -> None:
    first = rundir.config_json(configs[0])
    for c in configs[1:]:
        changed = rundir.changed_keys(first, rundir.config_json(c), rundir.SEED_KEYS)
        if changed:
            raise ConfigError(f"runs trained in one program may differ only in seed, not in "
                              f"{', '.join(changed)}: train them separately")
    seeds = [c.seed for c in configs]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"runs trained in one program need distinct seeds, got {seeds}")


def _check_one_config_in_every_process(configs) -> None:
    """Stops every process of a job launched with different configs before anything is written:
    one with another learning_rate would train with it unseen (process 0 writes config.json),
    one with another total_steps would leave the others waiting in a collective."""
    values = {key + (f" (run {k})" if len(configs) > 1 else ""): json.dumps(value)
              for k, c in enumerate(configs) for key, value in rundir.config_json(c).items()}
    differing = parallel.differing_from_process_0(values)
    if differing:
        raise ConfigError("the processes of this job have different configs (" + "; ".join(
            f"process {p} differs from process 0 in {', '.join(keys)}"
            for p, keys in differing.items()) + "): launch every process with the same command")


def train_runs(configs: list, workdirs: list, *, restart: bool = False) -> list[dict]:
    """Trains runs that differ only in their seed, each in its own workdir, resuming each from
    its latest checkpoint; returns their summaries in order.

    Several runs are trained at once in one compiled program (the step mapped over a leading
    seed axis, `parallel.Backend.map_seeds`): each run's workdir ends up as that run alone
    would leave it, up to rounding (tests/test_train.py). Finished runs are skipped; the others
    must resume from one step.
    """
    workdirs = [pathlib.Path(w) for w in workdirs]
    for c in configs:
        check_config(c)
    _check_seed_group(configs)
    _check_one_config_in_every_process(configs)
    summaries = [None] * len(configs)
    for k, (c, w) in enumerate(zip(configs, workdirs)):
        rundir.check_workdir(w, c)
        summary = rundir.finished_summary(w, c.total_steps)
        if summary is not None:
            if jax.process_index() == 0:
                print(f"run in {w} already finished at step {summary['step']} "
                      f"(test error {summary['test/error']:.2f}%)", flush=True)
            summaries[k] = summary
    todo = [k for k, s in enumerate(summaries) if s is None]
    if todo:
        trained = _train([configs[k] for k in todo], [workdirs[k] for k in todo], restart)
        for k, summary in zip(todo, trained):
            summaries[k] = summary
    return summaries


def _train(configs: list, workdirs: list[pathlib.Path], restart: bool) -> list[dict]:
    """Trains runs that passed `train_runs`' checks from their common step; their summaries."""
    with contextlib.ExitStack() as held:  # the workdirs' locks, released however it ends
        training = Training(held, configs, workdirs, restart)
        training.loop()
        return [finish(c, w, record, training.feed.num_classes)
                for c, w, record in zip(configs, workdirs, training.final_records())]


class Training:
    """One training program: its runs (one, or several seeds at once: `parallel.Backend.seeds`),
    their data, compiled step, checkpoints and outputs. Built by checking everything that can
    refuse the runs before writing anything; `loop` then trains them from their common step."""

    def __init__(self, held: contextlib.ExitStack, configs: list, workdirs: list[pathlib.Path],
                 restart: bool):
        config = self.config = configs[0]
        self.workdirs = workdirs
        # Several runs are several seeds in one program; one run has no seed axis.
        seeds = tuple(c.seed for c in configs) if len(configs) > 1 else ()
        backend = self.backend = create_backend(config, seeds=seeds)
        # Data before anything is written: a bad dataset must fail first.
        self.feed = create_feed(config, backend)
        if self.feed.num_train < config.batch_size:
            raise ConfigError(f"dataset {config.dataset} has {self.feed.num_train} training "
                              f"images, fewer than batch_size={config.batch_size}: lower "
                              "batch_size")
        facts = rundir.dataset_facts(self.feed)
        self.locks = resume.lock_workdirs(held, configs, workdirs, facts)
        graphdef, state, train_step = make_training(
            config, backend, num_classes=self.feed.num_classes,
            in_channels=self.feed.in_channels)
        self.calls = TrainCalls(config, backend, train_step, self.feed)
        self.checkpointers = [Checkpointer(w / rundir.CHECKPOINTS, keep=config.keep_checkpoints)
                              for w in workdirs]
        self.start, state, windows = resume.restore(self.checkpointers, workdirs, backend, state,
                                                    restart, config.total_steps)
        # Only now that every check has passed: a refused rerun leaves the run as it was.
        for c, w in zip(configs, workdirs):
            if jax.process_index() == 0:  # one writer; the net's input for `resnet_jax.load`
                rundir.write_json(w / rundir.CONFIG_JSON, rundir.config_json(c))
                rundir.write_json(w / rundir.DATASET_JSON, facts)
                self.feed.preprocessing.save(w)
        self.writers = [MetricsWriter(w, total_steps=config.total_steps,
                                      label=f"seed {c.seed}: " if backend.seeds else "",
                                      config=rundir.config_json(c))
                        for c, w in zip(configs, workdirs)]
        for writer in self.writers:
            writer.truncate(self.start)
        # The step of each run's last record: the record after the warm-up's end names it.
        self.logged = [writer.last_record().get("step", 0) for writer in self.writers]
        for w, window, logged in zip(workdirs, windows, self.logged):
            if window is None and logged < self.start:
                print(f"checkpoint {self.start} in {w} holds no record window (written by an "
                      f"older version): the next record averages the steps from "
                      f"{self.start} on, not from {logged}", flush=True)
        # Each run's steps since its last record that are not in `pending` (restored ones).
        self.carried = [resume.window_steps(w or resume.EMPTY_WINDOW) for w in windows]
        self.eval_step = jax.jit(backend.map_seeds(make_eval_step(graphdef), (0, None, None)),
                                 compiler_options=backend.compiler_options)
        self.state = backend.put_state(state)
        self.records = [{} for _ in workdirs]  # each run's last record written here
        self.clock = Clock(self.start, config)
        self.profile = Profile(config, workdirs[0], self.start)
        self.evaluate_lost_final_records()

    def loop(self) -> None:
        """call -> log -> evaluate -> save, from the runs' common step to `total_steps`; each
        call trains up to `steps_per_call` steps (`TrainCalls`) and ends where a step is logged,
        evaluated or saved (`call_end`)."""
        config, pending, watch = self.config, [], PreemptionWatch()
        try:
            step = self.start
            while step < config.total_steps:
                done = self.call_end(step)
                with self.profile.step(step):
                    self.state, metrics = self.calls(self.state, step, done - step)
                self.profile.stepped(done - 1, (self.state, metrics))
                pending.append((metrics, done - step))  # on the device until a record needs it
                if len(pending) > 2:
                    # Let the host run at most two calls ahead: a deeper queue gains nothing, and
                    # on simulated CPU devices it can starve a device of threads in a collective.
                    jax.block_until_ready(pending[-3][0])
                self.clock.stepped(done, metrics)
                last = done == config.total_steps
                evaluate = done % config.eval_every_steps == 0 or last
                save = done % config.checkpoint_every_steps == 0 or last
                preempted = not last and watch.reached(done)  # every process, at every call
                if done % config.log_every_steps == 0 or evaluate:
                    fetched, pending = self._fetch(pending), []
                    check_finite(fetched, done)
                    speed = self.clock.speed(done)  # of the train steps alone: before evaluating
                    evaluated = (self.clock.aside(EVAL_SECONDS, self.evaluate, whole=last)
                                 if evaluate else None)
                    self.log(done, fetched, speed, evaluated)
                if save or preempted:
                    fetched = self._fetch(pending)
                    check_finite(fetched, done)  # never checkpoint a NaN
                    self.clock.aside(CHECKPOINT_SECONDS, self.save, done, fetched)
                if preempted:
                    raise Preempted(done, self.workdirs[0], watch.signum)
                step = done
        finally:
            self.profile.close()  # a run stopped inside the window still leaves its trace
            self.feed.close()
            watch.close()
            for closable in (*self.checkpointers, *self.writers):
                closable.close()

    def call_end(self, step: int) -> int:
        """The step after the call that starts at `step`: `steps_per_call` steps later, or
        sooner at the next step that ends the run, is logged, evaluated or saved, or starts or
        ends the profile, so that those fall between calls (a call then trains fewer steps)."""
        c = self.config
        ends = [(step // every + 1) * every for every in
                (c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps)]
        ends += [end for end in self.profile.edges if end > step]
        return min(step + self.calls.per_call, c.total_steps, *ends)

    def _fetch(self, pending: list[tuple]) -> list[dict]:
        """The metrics of the calls in `pending` on the host, one dict per step, in order."""
        fetched = jax.device_get([metrics for metrics, _ in pending])
        return [m for f, (_, count) in zip(fetched, pending)
                for m in self.calls.per_step(f, count)]

    def log(self, done: int, fetched: list[dict], speed, evaluated: list[dict] | None) -> None:
        """Writes each run's record of the steps since the last (`fetched`, their metrics): loss
        and error averaged over them, the rest (lr, diagnostics) of the last; and `evaluated`."""
        resume.check_locks(self.locks)
        rate, seconds_left = speed
        timings = self.clock.take_timings()
        per_step = [self.backend.runs_of(m) for m in fetched]
        for k, writer in enumerate(self.writers):
            own = [runs[k] for runs in per_step]
            window = self.carried[k] + own
            record = {**per_layer_metrics(own[-1]),
                      "train/loss": np.mean([m["loss"] for m in window]),
                      "train/error": np.mean([m["error"] for m in window])}
            del record["loss"], record["error"], record["finite"]
            warmup_end = int(record.pop("warmup_end_step"))
            if self.logged[k] < warmup_end <= done:
                record["warmup_end_step"] = warmup_end  # the last step warmed up
            self.logged[k] = done
            record[TIME] = time.time()
            if rate is not None:
                record[EXAMPLES_PER_SEC] = rate * self.config.batch_size
            record |= (evaluated[k] if evaluated else {}) | timings
            writer.write(done, record)
            writer.progress(done, record, seconds_left)
            self.records[k] = record
        self.carried = [[] for _ in self.workdirs]

    def evaluate(self, whole: bool) -> list[dict]:
        """Each run's error (%) and loss on every evaluation split (`step.evaluate`); `whole`:
        all of each split, else the fixed subset (`eval_subset`)."""
        return evaluate(self.eval_step, self.backend.get_state(self.state), self.feed,
                        self.feed.mean, self.backend, whole=whole)

    def save(self, done: int, fetched: list[dict]) -> None:
        """Checkpoints each run at `done` with its record window: the steps since its last
        record, those restored and `fetched` (the metrics of the steps not yet logged)."""
        resume.check_locks(self.locks)
        global_state = self.backend.get_state(self.state)
        per_step = [self.backend.runs_of(m) for m in fetched]
        for k, (checkpointer, state) in enumerate(zip(self.checkpointers,
                                                      self.backend.runs_of(global_state))):
            window = self.carried[k] + [runs[k] for runs in per_step]
            checkpointer.save(done, state, {key: [float(m[key]) for m in window]
                                            for key in resume.EMPTY_WINDOW})

    def evaluate_lost_final_records(self) -> None:
        """A run restored at its last step whose final record is lost (killed between its last
        checkpoint and the record) gets its final state evaluated again; the training error
        stays the last one logged (a mean over steps that are not trained again)."""
        lasts = [writer.last_record() for writer in self.writers]
        lost = [k for k, last in enumerate(lasts) if self.start == self.config.total_steps
                and not (last.get("step") == self.start and "test/error" in last)]
        if lost:
            evaluated = self.evaluate(whole=True)
            for k in lost:
                print(f"run in {self.workdirs[k]} is at its last step {self.start} but its final "
                      f"record is lost: evaluating it (train error of step "
                      f"{lasts[k].get('step')})", flush=True)
                self.records[k] = {"train/loss": lasts[k].get("train/loss", np.nan),
                                   "train/error": lasts[k].get("train/error", np.nan),
                                   **evaluated[k]}

    def final_records(self) -> list[dict]:
        """Each run's last record: written here, else (nothing trained now) its file's."""
        return [record or writer.last_record()
                for record, writer in zip(self.records, self.writers)]


class Clock:
    """The loop's wall-clock measurements (metrics.TIMING_KEYS): the train steps' speed, with
    evaluations and saves kept out, and the seconds those took."""

    def __init__(self, start: int, config):
        self.total_steps, self.batch_size = config.total_steps, config.batch_size
        self.t_start, self.step_start = None, start
        self.seconds_aside = 0.0  # since t_start, spent evaluating and checkpointing
        self.timings = {}  # seconds per kind since the last record

    def stepped(self, done: int, metrics) -> None:
        if self.t_start is None:  # the first step compiles: measure speed from after it
            jax.block_until_ready(metrics)
            self.t_start, self.step_start = time.perf_counter(), done

    def speed(self, done: int) -> tuple[float | None, float | None]:
        """(train steps per second, seconds left) at step `done`; None before a timed step."""
        if done <= self.step_start:
            return None, None
        elapsed, steps = time.perf_counter() - self.t_start, done - self.step_start
        return steps / (elapsed - self.seconds_aside), (self.total_steps - done) * elapsed / steps

    def aside(self, key: str, fn, *args, **kwargs):
        """`fn(...)`, its seconds added to `key` and kept out of the speed."""
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - start
        self.seconds_aside += seconds
        self.timings[key] = self.timings.get(key, 0.0) + seconds
        return result

    def take_timings(self) -> dict:
        """The seconds per kind since the last record (eval_seconds, checkpoint_seconds)."""
        out = {k: self.timings[k] for k in (EVAL_SECONDS, CHECKPOINT_SECONDS) if k in self.timings}
        self.timings = {}
        return out


class Profile:
    """`profile_steps=(first, end)`: a jax.profiler trace of train steps first..end-1 written
    to WORKDIR/profile (TensorBoard's profile plugin reads its .xplane.pb, ui.perfetto.dev its
    perfetto_trace.json.gz). Each step is a `train_step` step annotation with its number, so the
    viewers mark and time the steps (with `steps_per_call` > 1, each call: its steps together,
    named by the first). Only the steps this run trains are traced: a resume past
    the window traces nothing, one inside it the rest, and a run ending inside it stops there.

    Process 0 traces (the profiler is per process and needs no other to take part; every
    process writing the same folder would collide); several seeds in one program trace once,
    into the first run's workdir."""

    def __init__(self, config, workdir: pathlib.Path, start: int):
        first, end = config.profile_steps or (0, 0)
        steps = range(max(first, start), min(end, config.total_steps))
        # Where the trace starts and stops, on every process alike (all make the same calls):
        # calls of several steps end there.
        self.edges = (steps.start, steps.stop) if steps else ()
        self.window = steps if jax.process_index() == 0 else range(0)
        self.dir, self.tracing, self.last = workdir / rundir.PROFILE, False, None

    def step(self, step: int):
        """Around one call of the train step (one step, or with `steps_per_call` several, from
        `step` on): starts the trace at the window's first step, names the call by `step`."""
        if step not in self.window:  # off (an empty window) or outside it: this test only
            return contextlib.nullcontext()
        if step == self.window.start:
            jax.profiler.start_trace(self.dir, create_perfetto_trace=True)
            self.tracing = True
        self.last = step
        return jax.profiler.StepTraceAnnotation("train_step", step_num=step)

    def stepped(self, step: int, outputs) -> None:
        """After the dispatch of the call whose last step is `step`: at the window's last step,
        waits for `outputs` so that the device work is in the trace, then writes it."""
        if self.tracing:
            self.last = step
        if self.tracing and step + 1 == self.window.stop:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self.tracing:
            self.tracing = False
            jax.profiler.stop_trace()
            print(f"profile of steps {self.window.start}-{self.last} -> {self.dir}", flush=True)


def create_feed(config, backend: parallel.Backend):
    """The training data as the loop sees it: on the devices (CIFAR-sized sets, data.py) or
    streamed from the hosts, each process reading its share (ImageNet, pipeline.py). With
    several seeds in one program (`backend.seeds`), one batch per seed (its own order and
    augmentation), stacked."""
    if pipeline.is_streamed(config.dataset):
        if backend.seeds:
            raise ConfigError(f"{config.dataset} is streamed: train its seeds as separate runs")
        return pipeline.StreamFeed(config, backend)
    return data.DeviceFeed(data.load_for(config), config, backend)


def check_finite(fetched_metrics: list[dict], step: int) -> None:
    """Stops at a non-finite loss or a step that left non-finite parameters (`finite`)."""
    loss_ok = all(np.all(np.isfinite(m["loss"])) for m in fetched_metrics)
    if not (loss_ok and all(np.all(m["finite"]) for m in fetched_metrics)):
        raise FloatingPointError(
            f"{'loss is' if not loss_ok else 'parameters are'} not finite by step {step}; "
            "training stopped and the last good checkpoint is kept: train in a new --workdir "
            "with a lower learning_rate or warmup_steps (this one refuses a changed config)")


def finish(config, workdir: pathlib.Path, final: dict, num_classes: int) -> dict:
    """Writes and returns the summary of a run whose last record is `final` (a run restored at
    its last step, killed before writing its summary, trained nothing now: its last record)."""
    summary = {"step": config.total_steps, "train/error": float(final["train/error"]),
               "train/loss": float(final["train/loss"]), "test/error": float(final["test/error"])}
    if "val/error" in final:
        summary["val/error"] = float(final["val/error"])
    # Not converged: the net did not train (the paper's failed runs), its final training error
    # (the last logging window's mean) at least `not_converged_fraction_of_chance` of chance's.
    threshold = config.not_converged_fraction_of_chance * 100.0 * (1 - 1 / num_classes)
    summary["not_converged_from_train_error"] = threshold
    summary["converged"] = summary["train/error"] < threshold
    summary_path = workdir / rundir.SUMMARY_JSON
    if jax.process_index() == 0:  # one file and one result line per run, not one per process
        rundir.write_json(summary_path, summary)
        print(f"finished: train error {summary['train/error']:.2f}%, "
              f"test error {summary['test/error']:.2f}%"
              + ("" if summary["converged"] else " (not converged)") + f" -> {summary_path}",
              flush=True)
    return summary
