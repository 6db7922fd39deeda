"""tcmalloc for the commands, where the machine has it: the same numbers, fewer page faults.

XLA CPU allocates each execution's temporaries afresh. glibc serves blocks that large with
`mmap` and unmaps them when they are freed, so every train step faults in and zeroes new pages:
1.75 M page faults in 22 steps of ResNet-20, 18 % of the step in the kernel; tcmalloc keeps the
pages (benchmarks/RESULTS.md). Glibc's own settings did not get there, and a process chooses its
allocator when it starts. So the commands' entry points (`resnet-jax`, `python -m
experiments.sweep`, `python -m benchmarks.compare`) call `preload()` first: where
libtcmalloc_minimal is installed (Debian and Ubuntu: `apt install libtcmalloc-minimal4`) and
not loaded yet, the same command starts again in the same process (`exec`: the same pid, the
same open files) with it in LD_PRELOAD, which the processes it starts inherit.

`RESNET_JAX_MALLOC=system` keeps the C library's allocator (to compare, or where tcmalloc is
unwanted). Nothing else depends on it: without the library everything runs as before.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

VARIABLE = "RESNET_JAX_MALLOC"
CHOICES = ("tcmalloc", "system")


def preload(environ=os.environ) -> None:
    """Starts this command again with tcmalloc preloaded, where it is installed and neither
    loaded already nor declined; returns where it does not (only then)."""
    choice = environ.get(VARIABLE, "tcmalloc")
    if choice not in CHOICES:
        print(f"error: {VARIABLE}={choice!r}: set it to one of {', '.join(CHOICES)} (tcmalloc, "
              "the default, where it is installed)", file=sys.stderr)
        raise SystemExit(2)
    if choice == "system" or "tcmalloc" in environ.get("LD_PRELOAD", ""):
        return
    library = ctypes.util.find_library("tcmalloc_minimal")
    if library is None:
        return
    preloaded = " ".join(filter(None, [library, environ.get("LD_PRELOAD")]))
    # tcmalloc reports every allocation of 1 GiB or more on stderr by default: a dataset held
    # in memory is one, and nothing to report.
    env = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40), **environ,
           "LD_PRELOAD": preloaded}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
