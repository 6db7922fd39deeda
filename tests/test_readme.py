"""The README's commands run as written after its install line: every command of its ```bash
blocks calls a program of the virtual environment by its path (.venv/bin/...), a launcher of
this checkout, or the install line's python3; and each resnet-jax and `python -m` command's
arguments are accepted by that program's own parser (parsed, not run: some train for hours).
"""
import importlib
import importlib.util
import pathlib
import re
import shlex

import pytest

from resnet_jax import cli
from resnet_jax.main import COMMANDS, UsageError, parse_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
# What the install line and the extras the README names put into .venv/bin.
VENV_PROGRAMS = {"python", "pip", "resnet-jax", "tensorboard", "tfds"}


def readme_commands() -> list[list[str]]:
    """Each command of the README's bash blocks as its words, `a && b` as two commands,
    continuation lines joined, comments and leading VAR=value assignments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                command, words = ((words[:words.index("&&")], words[words.index("&&") + 1:])
                                  if "&&" in words else (words, []))
                while command and re.fullmatch(r"[A-Z_]+=.*", command[0]):
                    command = command[1:]
                if command and command[0] != "export":
                    out.append(command)
    return out


class Parsed(BaseException):
    """Raised by a parser that accepted its arguments: nothing runs after it."""


def check_parses(argv: list[str]) -> None:
    """Fails unless the command's own parser accepts its arguments."""
    program, args = pathlib.PurePath(argv[0]).name, argv[1:]
    if program == "resnet-jax":
        assert args and args[0] in COMMANDS, argv
        try:
            parse_flags(args[1:], args[0])
        except UsageError as e:
            pytest.fail(f"{shlex.join(argv)}: {e}")
    elif program == "python" and args[:1] == ["-m"] and args[1].split(".")[0] not in (
            "experiments", "benchmarks"):  # another package's (pytest): installed by an extra
        assert importlib.util.find_spec(args[1]), argv
    elif program == "python" and args[:1] == ["-m"]:
        module = importlib.import_module(args[1])
        original = cli.ArgumentParser.parse_args

        def parse_args(self, *a, **k):
            original(self, *a, **k)
            raise Parsed

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cli.ArgumentParser, "parse_args", parse_args)
            with pytest.raises(Parsed):  # an error would be SystemExit(2), with its line
                module.main(args[2:])
    elif program == "python":
        assert args[:1] == ["-c"], argv
        compile(args[1], "<README>", "exec")


def test_the_readme_has_the_commands_this_test_reads():
    programs = {pathlib.PurePath(c[0]).name for c in readme_commands()}
    assert {"resnet-jax", "python", "pip", "local.sh", "tpu.sh", "slurm.sh"} <= programs
    assert len(readme_commands()) > 20


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda argv: " ".join(argv)[:70])
def test_each_readme_command_runs_as_written_after_the_install_line(argv, capsys):
    program = argv[0]
    if program == "python3":  # the install line itself
        assert argv[1:4] == ["-m", "venv", ".venv"]
        return
    if program.startswith("launch/"):
        assert (REPO / program).is_file() and (REPO / program).stat().st_mode & 0o111
        if program == "launch/local.sh":  # N, then a command run as written here
            check_parses(argv[2:])
        return
    assert program.startswith(".venv/bin/") and program.removeprefix(".venv/bin/") in \
        VENV_PROGRAMS, f"{program} is not found after the install line: use .venv/bin/{program}"
    check_parses(argv)
