"""argparse for the `python -m experiments.X` and `benchmarks.X` entry points: the same help and
the same one-line errors as `resnet-jax` (resnet_jax/main.py), and the signals that stop both.
Standard library only, so that a launcher can ask a sweep for its runs (`experiments.sweep
--sweep=FILE --list`) with any Python.
"""

from __future__ import annotations

import argparse
import re
import signal
import textwrap

# The signals that stop a run or a sweep, and how their messages name each: Ctrl-C, a closed
# terminal or ssh session, a preemption notice (SLURM, a TPU maintenance event). Each stops at a
# checkpoint and exits 128 + its number, as a shell reports a process a signal ended.
STOP_SIGNALS = {signal.SIGINT: "interrupted", signal.SIGHUP: "hung up",
                signal.SIGTERM: "preempted"}


def stopped(signum: int) -> str:
    """'interrupted (SIGINT)', 'hung up (SIGHUP)', 'preempted (SIGTERM)'."""
    return f"{STOP_SIGNALS[signum]} ({signal.Signals(signum).name})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the `python -m experiments.X` and `benchmarks.X` entry points.

    `--help` shows the module docstring's opening, every flag with its default, and the
    docstring's first indented block (its example commands). Bad input is one line, exit 2,
    including an argument that is not a flag (`total_steps=100`), which argparse reports after
    the whole usage text.
    """

    def __init__(self, module: str, doc: str):
        opening, examples = re.match(r"(.*?)((?:\n {4}[^\n]*)+)", doc, re.S).groups()
        super().__init__(prog=f"python -m {module}",
                         description=textwrap.fill(" ".join(opening.split()).rstrip(":"), 96),
                         epilog="examples:" + examples,
                         formatter_class=_RawTextWithDefaults)

    def parse_args(self, args=None, namespace=None):
        parsed, stray = self.parse_known_args(args, namespace)
        if stray:
            key, is_pair, _ = stray[0].partition("=")
            hint = (f" (did you mean --{stray[0]}?)"
                    if is_pair and f"--{key}" in self._option_string_actions else "")
            self.error(f"unexpected argument{'s' * (len(stray) > 1)} "
                       f"{', '.join(map(repr, stray))}{hint}")
        return parsed

    def error(self, message):
        self.exit(2, f"{self.prog.rpartition('.')[2]}: error: {message}: see {self.prog} "
                  "--help\n")


def int_list(text: str) -> list[int]:
    """argparse `type=` for comma-separated integers (`--depths=20,56,110`); bad text is the
    parser's one-line error naming the flag."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not comma-separated integers (e.g. 20,56,110)") from None


class _RawTextWithDefaults(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        shown = not (action.default is None or action.default is False or action.default == []
                     or action.default is argparse.SUPPRESS)
        return (action.help or "") + (" (default: %(default)s)" if shown else "")
