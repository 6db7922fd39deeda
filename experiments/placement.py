"""Where a sweep's runs train on this machine: one run per local accelerator (or per K of them).

    slots("gpu", ["0", "1", "2", "3"], per_run=2)  # two runs at a time: GPUs 0,1 and 2,3

A `Slot` is the environment one run's process gets. Each run sees only its own devices, so JAX
in it takes what it sees (`num_devices=0`), data-parallel over them:
  gpu  CUDA_VISIBLE_DEVICES. Memory preallocation stays on (JAX's fastest setting): the run is
       alone on its GPUs. Runs that share GPUs (`--processes` without placement) get
       XLA_PYTHON_CLIENT_PREALLOCATE=false instead, so that N of them fit (`shared_env`).
  tpu  TPU_VISIBLE_CHIPS with the chip bounds of a single-host sub-slice and a port of its own
       per process (TPU_PROCESS_BOUNDS=1,1,1, TPU_CHIPS_PER_PROCESS_BOUNDS, TPU_PROCESS_PORT,
       TPU_PROCESS_ADDRESSES): the way libtpu runs independent processes on one host's chips.
       Not yet run on a TPU here.
  cpu  XLA's simulated host devices (--xla_force_host_platform_device_count), split between the
       runs: how the placement is tested on a laptop.
The sweep's own process finds the accelerators without starting JAX (`local_accelerators`), since
a JAX GPU client in it would preallocate memory on every GPU before any run starts.
Standard library only.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re

PLATFORMS = ("cpu", "gpu", "tpu")
_CPU_COUNT = re.compile(r"--xla_force_host_platform_device_count=(\d+)")
# Chips of a single-host TPU sub-slice (x, y, z) for 1, 2, 4 and 8 chips (v4: 4 chips a host as
# 2x2; v5e/v6e: up to 8 as 2x4).
_TPU_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1", 8: "2,4,1"}
TPU_BASE_PORT = 8476


@dataclasses.dataclass(frozen=True)
class Slot:
    platform: str
    devices: tuple[str, ...]  # local accelerator ids this slot's runs see
    env: dict  # set in the run's process

    def describe(self) -> str:
        return f"{self.platform} {','.join(self.devices)}"


def local_accelerators(platform: str | None = None,
                       environ: dict | None = None) -> tuple[str, list[str]]:
    """(platform, ids) of this machine's accelerators, found from the environment and /dev
    without starting JAX: CUDA_VISIBLE_DEVICES or /dev/nvidiaN (gpu); /dev/accelN or
    /dev/vfio/N (tpu); else the CPU's simulated devices in XLA_FLAGS (1 without). `platform`
    (or JAX_PLATFORMS=cpu) chooses instead of looking."""
    environ = os.environ if environ is None else environ
    forced = platform or ("cpu" if environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu"
                          else None)
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    nvidia = sorted(glob.glob("/dev/nvidia[0-9]*"))
    chips = sorted(glob.glob("/dev/accel[0-9]*")) or sorted(glob.glob("/dev/vfio/[0-9]*"))
    if forced == "gpu" or (forced is None and (visible or nvidia)):
        return "gpu", [d.strip() for d in visible] or [str(i) for i in range(len(nvidia))]
    if forced == "tpu" or (forced is None and chips):
        return "tpu", [str(i) for i in range(len(chips))]
    count = _CPU_COUNT.findall(environ.get("XLA_FLAGS", ""))
    return "cpu", [str(i) for i in range(int(count[-1]) if count else 1)]


def slots(platform: str, devices: list[str], per_run: int,
          environ: dict | None = None) -> list[Slot]:
    """The devices in groups of `per_run`, one group per run at a time. Raises ValueError (one
    line) if there are fewer devices than one run needs, or a TPU group no sub-slice fits."""
    environ = os.environ if environ is None else environ
    if platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}: use one of {', '.join(PLATFORMS)}")
    if per_run < 1 or per_run > len(devices):
        raise ValueError(f"--devices-per-run={per_run} but this machine shows {len(devices)} "
                         f"{platform} device(s) ({','.join(devices) or 'none'}): use 1 to "
                         f"{len(devices)}, or name them with --devices")
    if platform == "tpu" and per_run not in _TPU_BOUNDS:
        raise ValueError(f"--devices-per-run={per_run} on TPU: a run needs a sub-slice of "
                         f"{', '.join(map(str, _TPU_BOUNDS))} chips")
    groups = [tuple(devices[i:i + per_run]) for i in range(0, len(devices) - per_run + 1, per_run)]
    return [Slot(platform, group, _env(platform, group, index, environ))
            for index, group in enumerate(groups)]


def _env(platform: str, group: tuple[str, ...], index: int, environ: dict) -> dict:
    if platform == "gpu":
        return {"CUDA_VISIBLE_DEVICES": ",".join(group)}
    if platform == "tpu":
        port = TPU_BASE_PORT + index
        return {"TPU_VISIBLE_CHIPS": ",".join(group), "TPU_PROCESS_BOUNDS": "1,1,1",
                "TPU_CHIPS_PER_PROCESS_BOUNDS": _TPU_BOUNDS[len(group)],
                "TPU_PROCESS_PORT": str(port), "TPU_PROCESS_ADDRESSES": f"localhost:{port}"}
    flags = _CPU_COUNT.sub("", environ.get("XLA_FLAGS", "")).split()
    return {"XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count="
                                           f"{len(group)}"])}


def shared_env(platform: str) -> dict:
    """The environment of runs that share this machine's accelerators (`--processes=N` without
    placement): on GPU, no process may preallocate most of every GPU's memory."""
    return {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"} if platform == "gpu" else {}
