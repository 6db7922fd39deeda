"""Where the devices come in: the mesh, the shardings and the two data-parallel backends.

Everything else is written for one global batch. This module decides how that batch and the
train state live on devices, as one `Backend` class per `config.parallelism`:
- 'jit' (default, `JitBackend`): `jax.jit` over a 1-D device mesh, the global batch sharded on the
  `data` axis and the state replicated; XLA inserts the gradient and batch-norm all-reduces (what
  pjit became).
- 'pmap' (`PmapBackend`): `jax.pmap` over the same devices; the state carries a leading device
  axis, gradients and losses are averaged with explicit collectives over the `batch` axis.
Both give the same numbers on the same global batch (tests/test_parallel.py).

Several processes (TPU pod workers, SLURM tasks, local processes) become one job with
`initialize_distributed()`; the mesh then spans every device of every process and nothing else
changes: each process computes its own devices' share of every batch, and process 0 writes the
logs (tests/test_distributed.py).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import sys
import tempfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"  # mesh axis of the jit backend
PMAP_AXIS = "batch"  # mapped axis of the pmap backend

# XLA CPU (JAX 0.10) hands convolutions to its YNNPACK library by default. There the weight
# gradients of these nets' convolutions run at about 4 GFLOP/s against 50 in XLA's own (Eigen)
# convolution, so a ResNet-20 train step took twice as long (benchmarks/RESULTS.md). This list
# leaves out convolutions and keeps the library's dots and reductions, which do pay. It can go
# when `python -m benchmarks.xla_options` shows XLA's own defaults (`xla`) as fast as these.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}

# How several seeds in one program run, by platform (default 'vmap'). vmap turns each seed's
# convolutions into one grouped convolution, which XLA CPU runs slowly: 8 seeds of ResNet-20
# vmapped gave 0.36x one net's images/s on 2 cores, in a loop 1.32x (benchmarks/RESULTS.md).
# The entry can go when `resnet-jax bench --seeds=8` on CPU gives more images/s without it
# (vmap) than with it (loop).
SEED_MAPS = {"cpu": "loop"}


@functools.cache
def compiler_options(platform: str) -> dict | None:
    """XLA options for the compiled steps on `platform`; None where its defaults are best, or
    where this XLA does not know the options."""
    if platform != "cpu":
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(1.0).compile()
    except jax.errors.JaxRuntimeError:
        return None
    return CPU_COMPILER_OPTIONS


def initialize_distributed(env=os.environ) -> None:
    """Joins this process to its multi-process job, if it was launched as one (launch/).

    - JAX_NUM_PROCESSES, JAX_PROCESS_ID and JAX_COORDINATOR_ADDRESS (host:port of process 0)
      name the job explicitly (launch/local.sh, or any launcher);
    - RESNET_JAX_DISTRIBUTED=1 lets JAX detect it (Cloud TPU pod slices, SLURM's srun:
      launch/tpu.sh, launch/slurm.sh).
    Otherwise this is a single-process run and nothing happens. Call before JAX starts up.
    """
    if env.get("JAX_NUM_PROCESSES"):
        jax.distributed.initialize(env.get("JAX_COORDINATOR_ADDRESS"),
                                   int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"]))
    elif env.get("RESNET_JAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def differing_from_process_0(values: dict[str, str]) -> dict[int, list[str]]:
    """{process: the keys whose value differs from process 0's} over the processes of this job,
    each process passing its own `values` (every process must call this). Only a digest per key
    travels, so values of any size cost the same. One process: {}."""
    if jax.process_count() == 1:
        return {}
    from jax.experimental import multihost_utils

    def digests(texts):
        return np.array([zlib.crc32(t.encode()) for t in texts], np.uint32).view(np.int32)

    keys = sorted(values)
    # The keys themselves first: with other keys (another version of the code) the per-key
    # digests below would not line up, nor even have one length.
    shapes = multihost_utils.process_allgather(digests(["\n".join(keys)]))
    if not np.all(shapes == shapes[0]):
        return {int(p): ["the set of keys"] for p in np.flatnonzero(shapes[:, 0] != shapes[0, 0])}
    gathered = multihost_utils.process_allgather(digests([values[k] for k in keys]))
    return {int(p): [k for k, a, b in zip(keys, gathered[p], gathered[0]) if a != b]
            for p in range(1, len(gathered)) if np.any(gathered[p] != gathered[0])}


def use_compilation_cache() -> str | None:
    """Keeps every compiled program on disk, so that a resumed run, or the next run of a sweep
    with the same net, loads its train step instead of compiling it again (JAX's persistent
    compilation cache). The directory: $RESNET_JAX_COMPILE_CACHE, else `jax-compile` in the data
    cache ($RESNET_JAX_CACHE, else ~/.cache/resnet_jax); RESNET_JAX_COMPILE_CACHE=off turns it
    off. An entry is reused only for the same program, compiler options, JAX version and
    devices (JAX's cache key), so it cannot change what is computed. Entries are written whole
    or not at all, and a damaged one is removed and compiled again (compile_cache.py). A
    directory that cannot be written is one line on stderr and no cache: the run goes on. The
    path, or None."""
    from resnet_jax import compile_cache, data

    value = os.environ.get("RESNET_JAX_COMPILE_CACHE")
    if value == "off":
        return None
    path = pathlib.Path(value).expanduser() if value else data.cache_dir() / "jax-compile"
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:  # else JAX warns at every compile
        print(f"warning: compilation cache {path}: {e.strerror or e}: compiling without it; set "
              "RESNET_JAX_COMPILE_CACHE to a directory you can write to, or to off",
              file=sys.stderr)
        return None
    compile_cache.install()
    jax.config.update("jax_compilation_cache_dir", str(path))
    # JAX caches only programs that took over a second to compile, and on CPU most take less.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return str(path)


def create_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
    """A 1-D mesh over the first `num_devices` devices (0: all of them, on every host)."""
    devices = jax.devices()
    if num_devices < 0:  # a slice would silently take all but |num_devices| of them
        raise ValueError(f"num_devices={num_devices} must be >= 0: set --config.num_devices to "
                         f"the number of devices to use, at most {len(devices)} (0 = all)")
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(
                f"num_devices={num_devices} but only {len(devices)} devices are visible: "
                f"set --config.num_devices to at most {len(devices)} (0 = all)"
            )
        devices = devices[:num_devices]
    return jax.sharding.Mesh(np.array(devices), (DATA_AXIS,),
                             axis_types=(jax.sharding.AxisType.Auto,))


@dataclasses.dataclass(frozen=True)
class Backend:
    """One data-parallel strategy over `mesh` for a fixed global batch size: `JitBackend` or
    `PmapBackend`. What differs between them is in their methods; the rest of the code asks
    these, never which backend it has."""

    mesh: jax.sharding.Mesh
    batch_size: int
    # Several seeds in one program: the seeds of K independent runs of one net, which differ
    # only in their seed (initialisation, data order, augmentation). The state, every batch and
    # the metrics carry a leading axis of K, run k's row k (`stack_runs`, `runs_of`), and the
    # steps map over it (`map_seeds`; jit only). (): one ordinary run, no seed axis; its seed is
    # its config's.
    seeds: tuple[int, ...] = ()
    # XLA options for every program compiled here; None: `compiler_options(platform)`.
    xla_options: dict | None = None

    # The collective axis the train step averages gradients and batch statistics over (None:
    # XLA inserts the all-reduces itself).
    axis_name = None

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    @property
    def platform(self) -> str:
        """'cpu', 'gpu' or 'tpu': what the compiled programs run on."""
        return self.mesh.devices.flat[0].platform

    @property
    def data_sharding(self) -> NamedSharding:
        """A batch split over the devices (behind the seed axis, if there is one)."""
        return NamedSharding(self.mesh, P(None, DATA_AXIS) if self.seeds else P(DATA_AXIS))

    @property
    def shared_batch_sharding(self) -> NamedSharding:
        """A batch every seed sees (evaluation data), split over the devices."""
        return NamedSharding(self.mesh, P(DATA_AXIS))

    @property
    def compiler_options(self) -> dict | None:
        """XLA options for every program compiled for these devices (see `compiler_options`)."""
        if self.xla_options is not None:
            return self.xla_options or None
        return compiler_options(self.platform)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def state_sharding(self) -> NamedSharding:
        """How the compiled steps hold the train state (`put_state`'s layout)."""
        return self.replicated

    def batch_norm_groups(self, group_size: int) -> dict:
        """Which examples share batch-norm statistics when the net sees this backend's batches,
        as keyword arguments of `models.BatchNormConfig` (group_size, axis_name,
        axis_index_groups): statistics over `group_size` consecutive examples of the global
        batch (0: the whole global batch)."""
        raise NotImplementedError

    def compile_batch(self, make_batch):
        """`make_batch(*args, part=(i, n))` run on every device for its own slice of the batch.

        Each device cuts its share from its replica of the data, so no collective (and no
        guess by the partitioner) is involved; the result is one globally sharded batch.
        """
        def per_device(*args):
            return make_batch(*args, part=(jax.lax.axis_index(DATA_AXIS), self.num_devices))

        def run(*args):
            return jax.shard_map(per_device, mesh=self.mesh, in_specs=P(),
                                 out_specs=self.data_sharding.spec)(*args)

        return jax.jit(run)

    def put_state(self, state):
        """Host or global state -> the layout the compiled step takes."""
        return jax.device_put(state, self.replicated)

    def get_state(self, state):
        """The step's state layout -> one global, replicated copy (for eval and checkpoints)."""
        return jax.device_put(state, self.replicated)

    @property
    def seed_map(self) -> str:
        """How `map_seeds` runs the seeds: 'vmap' (one wider computation) or 'loop' (one after
        another, `jax.lax.map`). See SEED_MAPS."""
        return SEED_MAPS.get(self.platform, "vmap")

    def seeds_of(self, config_seed: int) -> tuple[int, ...]:
        """The seed of each run this backend trains: `seeds`, or the one run's `config_seed`."""
        return self.seeds or (config_seed,)

    def stack_runs(self, trees: list):
        """One tree per run (in `seeds_of` order) -> the layout with the seed axis, if any."""
        return jax.tree.map(lambda *x: jnp.stack(x), *trees) if self.seeds else trees[0]

    def runs_of(self, tree) -> list:
        """A tree with the seed axis, if any -> one tree per run (`stack_runs` undone)."""
        if not self.seeds:
            return [tree]
        return [jax.tree.map(lambda x: x[k], tree) for k in range(len(self.seeds))]

    def map_seeds(self, fn, in_axes=0):
        """`fn` over the leading seed axis of the arguments whose `in_axes` entry is 0 (None: the
        argument is shared), as `jax.vmap(fn, in_axes)` computes it, by `seed_map`; `fn` itself
        when there is no seed axis."""
        if not self.seeds:
            return fn
        if self.seed_map == "vmap":
            return jax.vmap(fn, in_axes)

        def loop(*args):
            axes = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)

            def one(rows):
                rows = iter(rows)
                return fn(*(next(rows) if ax == 0 else a for a, ax in zip(args, axes)))

            return jax.lax.map(one, [a for a, ax in zip(args, axes) if ax == 0])

        return loop

    def compile_step(self, train_step):
        """Wraps a pure `(state, batch) -> (state, metrics)` for this backend."""
        raise NotImplementedError

    def map_step(self, train_step):
        """A pure `(state, batch) -> (state, metrics)` over this backend's devices (and seeds),
        to be traced inside a compiled program (`compile_steps`)."""
        raise NotImplementedError

    def compile_steps(self, train_step, batch_of, max_steps: int):
        """Up to `max_steps` train steps in one compiled call, for one dispatch from the host
        instead of one per step: `(state, data, carry, first, count) -> (state, metrics)` runs
        steps first..first+count-1 (1 <= count <= max_steps; `count` is traced, so one program
        serves every length), each on the batch of `batch_of(data, carry, step) -> (batch,
        carry)` computed inside the call, `carry` handed from each step to the next (the feed's
        state, such as the epoch's order, starting from the argument), and returns the metrics of
        step first+i in row i of a leading axis of `max_steps` (the rows from `count` on are
        zeros). The numbers of `count` calls of `compile_step` on those batches, bit for bit on
        CPU (tests/test_steps_per_call.py)."""
        step = self.map_step(train_step)

        def one(state, data, carry, t):
            batch, carry = batch_of(data, carry, t)
            state, metrics = step(state, batch)
            return state, metrics, carry

        def steps(state, data, carry, first, count):
            shapes = jax.eval_shape(one, state, data, carry, first)[1]
            rows = jax.tree.map(lambda s: jnp.zeros((max_steps, *s.shape), s.dtype), shapes)

            def body(i, loop):
                state, rows, carry = loop
                state, metrics, carry = one(state, data, carry, first + i)
                return state, jax.tree.map(lambda r, m: r.at[i].set(m), rows, metrics), carry

            state, rows, _ = jax.lax.fori_loop(0, count, body, (state, rows, carry))
            return state, rows

        return jax.jit(steps, out_shardings=(self.state_sharding, self.replicated),
                       donate_argnums=0, compiler_options=self.step_compiler_options)

    @property
    def step_compiler_options(self) -> dict | None:
        """The XLA options `compile_step`'s program compiles with, and so `compile_steps'`."""
        return self.compiler_options

    def trace(self, step, state, batch):
        """The compiled `step`'s program traced for (state, batch) (`jax.jit(...).trace`, for
        counting FLOPs and compiling ahead of time), or None where the backend compiles at the
        first call."""
        return None


@dataclasses.dataclass(frozen=True)
class JitBackend(Backend):
    """'jit' (default): `jax.jit` over the mesh, the global batch sharded on its `data` axis and
    the state replicated; XLA inserts the gradient and batch-norm all-reduces."""

    def batch_norm_groups(self, group_size: int) -> dict:
        # The model sees the global batch and groups it itself.
        return {"group_size": group_size or self.batch_size}

    def compile_step(self, train_step):
        return jax.jit(self.map_step(train_step),
                       in_shardings=(self.replicated, self.data_sharding),
                       out_shardings=(self.replicated, self.replicated), donate_argnums=0,
                       compiler_options=self.compiler_options)

    def map_step(self, train_step):
        return self.map_seeds(train_step)

    def trace(self, step, state, batch):
        return step.trace(state, batch)


@dataclasses.dataclass(frozen=True)
class PmapBackend(Backend):
    """'pmap': `jax.pmap` over the mesh's devices, in one process; the state carries a leading
    device axis, gradients and losses are averaged with explicit collectives over `PMAP_AXIS`."""

    axis_name = PMAP_AXIS

    def __post_init__(self):
        if self.seeds:
            raise ValueError("several seeds in one program run under parallelism=jit: use jit")
        if jax.process_count() > 1:
            raise ValueError(f"parallelism=pmap runs in one process here, but this job has "
                             f"{jax.process_count()}: use parallelism=jit across processes")

    def batch_norm_groups(self, group_size: int) -> dict:
        # Each device sees batch_size / num_devices examples: groups inside a device are local,
        # groups spanning devices average over device groups.
        group = group_size or self.batch_size
        local = self.batch_size // self.num_devices
        if group % local and local % group:
            raise ValueError(
                f"bn_group_size={group} neither divides nor is a multiple of the {local} examples "
                f"per device: pick a divisor or multiple of {local}, or use parallelism=jit")
        if group <= local:
            return {"group_size": group}
        per_group = group // local
        groups = [list(range(i, i + per_group)) for i in range(0, self.num_devices, per_group)]
        return {"axis_name": PMAP_AXIS,
                "axis_index_groups": None if per_group == self.num_devices else groups}

    @property
    def state_sharding(self) -> NamedSharding:
        # The leading device axis split over the devices, named as pmap names it in the state
        # it returns: the step's second call then takes the layout of its first and does not
        # compile again (with the mesh's `data` axis it did, doubling the compile time).
        mesh = jax.sharding.Mesh(self.mesh.devices, (PMAP_AXIS,))
        return NamedSharding(mesh, P(PMAP_AXIS))

    def put_state(self, state):
        # One copy per device, stacked on a leading device axis.
        stack = lambda x: jnp.broadcast_to(x, (self.num_devices, *x.shape))  # noqa: E731
        return jax.jit(lambda s: jax.tree.map(stack, s), out_shardings=self.state_sharding)(state)

    def get_state(self, state):
        return jax.device_put(jax.tree.map(lambda x: x[0], state), self.replicated)

    @property
    def step_compiler_options(self) -> dict | None:
        return None  # jax.pmap takes none: its step compiles with XLA's defaults

    def compile_step(self, train_step):
        return self._pmapped(train_step, donate_argnums=0)

    def map_step(self, train_step):
        # The pmap traced into `compile_steps`' program, whose jit donates the state.
        return self._pmapped(train_step, donate_argnums=())

    def _pmapped(self, train_step, donate_argnums):
        mapped = jax.pmap(train_step, axis_name=PMAP_AXIS, donate_argnums=donate_argnums,
                          devices=list(self.mesh.devices.flat))
        split = jax.jit(
            lambda b: jax.tree.map(lambda x: x.reshape(self.num_devices, -1, *x.shape[1:]), b),
            out_shardings=self.data_sharding)

        def step(state, batch):
            state, metrics = mapped(state, split(batch))
            return state, jax.tree.map(lambda x: x[0], metrics)

        return step


BACKENDS = {"jit": JitBackend, "pmap": PmapBackend}  # config.parallelism -> its backend


def check_parallelism(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown parallelism {name!r}: use one of {', '.join(BACKENDS)}")


def create_backend(name: str, batch_size: int, num_devices: int = 0,
                   seeds: tuple[int, ...] = (), xla_options: dict | None = None) -> Backend:
    """The backend `name` (config.parallelism) over `num_devices` devices (0: all), for a
    global batch of `batch_size`; `seeds`: several seeds in one program (`Backend.seeds`)."""
    check_parallelism(name)
    mesh = create_mesh(num_devices)
    if batch_size % mesh.size:
        raise ValueError(
            f"global batch_size={batch_size} does not split over {mesh.size} devices: "
            f"use a multiple of {mesh.size} or set --config.num_devices"
        )
    return BACKENDS[name](mesh, batch_size, tuple(seeds), xla_options)


def pmean_if(tree, axis_name: str | None):
    """Average over the mapped axis when there is one (pmap); identity under jit."""
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)

