"""Files written whole or not at all: the one way run files, caches and sweep records are written.

Standard library only: experiments/sweep.py imports it, and a launcher runs that with any Python.
"""

from __future__ import annotations

import os
import pathlib
import secrets
from collections.abc import Callable
from typing import BinaryIO


def write_atomically(path: str | os.PathLike, content: str | bytes | Callable[[BinaryIO], None]
                     ) -> None:
    """Writes `path` into a temporary file beside it, then renames that over it: an interrupted
    or failed write (a kill, a full disk) leaves the old file or none, never a partial one, and
    no temporary; the error (OSError, KeyboardInterrupt) goes on. `content`: the text (UTF-8)
    or bytes, or a function that writes them to the open binary file. Writers racing on one
    path each use their own temporary; the last rename wins."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after the rename
