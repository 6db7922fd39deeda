"""The errors a user can act on, and which of them end a command in one line with exit status 2.

Standard library only: the CLI (main.py), the sweep and its runner name these errors without
importing the training stack.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot run. str(e) is one line naming the problem and the fix."""


class DataError(ValueError):
    """A bad dataset request. str(e) is ONE line naming the problem and the fix."""


# Bad input, or a run that diverged (a NaN: `train.check_finite`): each is said in one line
# (`resnet-jax: error: ...`, a sweep's failed run), with exit status 2, and no traceback.
USER_ERRORS = (ConfigError, DataError, FloatingPointError)
