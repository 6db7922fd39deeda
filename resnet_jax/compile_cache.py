"""The entries of JAX's persistent compilation cache (`parallel.use_compilation_cache`), written
whole or not at all, and removed when they cannot be read.

JAX writes an entry in place, and takes any file under an entry's name as cached: a full disk
or a kill mid-write leaves a cut (or zero-byte) entry that every later run warns of, compiles
again and never rewrites. Here an entry is written into a temporary file and renamed
(`files.write_atomically`), so a cut one is never visible and a reader never sees half of one
(so no lock is needed either, and JAX's `filelock` dependency of a bounded cache is not taken
on); one that cannot be decompressed (damaged from outside) is removed and compiled again. One
line per process says so. JAX's own entry class is extended in its place (`install`), so this
leans on JAX internals: tests/test_faults_resume.py checks it against the installed JAX.
"""

from __future__ import annotations

import sys

from resnet_jax.files import write_atomically

_said: set[str] = set()  # what this process has said: one line each


def _say_once(kind: str, line: str) -> None:
    if kind not in _said:
        _said.add(kind)
        print(f"warning: {line}", file=sys.stderr, flush=True)


def install() -> None:
    """Makes the compilation cache JAX creates next one of whole entries; where JAX's internals
    are not as expected, leaves JAX's own."""
    from jax._src import compilation_cache, lru_cache

    base = getattr(compilation_cache, "LRUCache", None)
    if base is not lru_cache.LRUCache or not hasattr(compilation_cache, "decompress_executable"):
        return
    suffix = lru_cache._CACHE_SUFFIX

    class WholeEntries(base):
        def get(self, key: str) -> bytes | None:
            value = super().get(key)
            if value is None:
                return None
            try:  # what JAX does first with an entry: a cut or overwritten one fails here
                compilation_cache.decompress_executable(value)
            except Exception as e:  # noqa: BLE001 - zlib and zstd raise their own errors
                (self.path / f"{key}{suffix}").unlink(missing_ok=True)
                _say_once("unreadable", f"removed unreadable entries of the compilation cache "
                          f"{self.path} ({type(e).__name__}: {e}); compiling them again")
                return None
            return value

        def put(self, key: str, value: bytes) -> None:
            if self.eviction_enabled or not lru_cache._is_local_filesystem(str(self.path)):
                return super().put(key, value)  # a bounded or remote cache: JAX's own writes
            path = self.path / f"{key}{suffix}"
            if path.exists():
                return
            try:
                write_atomically(path, value)
            except OSError as e:  # a full disk: the run goes on, compiling what it must
                _say_once("unwritable", f"cannot write to the compilation cache {self.path} "
                          f"({e.strerror or e}); its programs are compiled, not cached")

    compilation_cache.LRUCache = WholeEntries
