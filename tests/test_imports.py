"""The import graph of resnet_jax/ and experiments/, read with ast (nothing is imported): no
cycle, not even one hidden by an import inside a function or under TYPE_CHECKING, and the
modules that promise the standard library only keep that promise."""

from __future__ import annotations

import ast
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("resnet_jax", "experiments")


def modules(repo: pathlib.Path = REPO) -> dict[str, pathlib.Path]:
    """Every module of the packages, by dotted name ('resnet_jax.configs' for its __init__)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((repo / package).rglob("*.py")):
            parts = path.relative_to(repo).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(name: str, found: dict[str, pathlib.Path], *, at_import: bool = False) -> set[str]:
    """The modules `name` imports, ours by their module ('from resnet_jax import data' is
    resnet_jax.data), others by their top-level name. All of them, wherever they stand, or
    with `at_import` only those run when the module is imported (not inside a function)."""
    path = found[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if at_import and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(child, ast.Import):
                out.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the package, one level up per extra dot
                    parent = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join([*parent, *([base] if base else [])])
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    out.add(full if full in found else base)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m if m in found else m.split(".")[0] for m in out}


def cycle(found: dict[str, pathlib.Path]) -> list[str] | None:
    """One import cycle among our modules, as the list of modules around it; None if none."""
    graph = {name: sorted(m for m in imported(name, found) if m in found and m != name)
             for name in found}
    state, stack = {}, []

    def walk(name):
        state[name] = "open"
        stack.append(name)
        for nxt in graph[name]:
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found_cycle := walk(nxt)):
                return found_cycle
        stack.pop()
        state[name] = "done"
        return None

    for name in graph:
        if name not in state and (found_cycle := walk(name)):
            return found_cycle
    return None


def closure(name: str, found: dict[str, pathlib.Path], *, at_import: bool) -> set[str]:
    """Everything `name` imports, directly or through our modules it imports."""
    seen, todo, outside = set(), [name], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for m in imported(current, found, at_import=at_import):
            if m in found:
                todo.append(m)
            else:
                outside.add(m)
    return outside


JAX = ("jax", "jaxlib", "flax", "optax", "orbax")


def not_standard_library(names: set[str]) -> list[str]:
    return sorted(n for n in names if n.split(".")[0] not in sys.stdlib_module_names)


def test_our_modules_import_in_no_cycle():
    found = modules()
    assert "experiments.sweep" in found and "resnet_jax.train" in found
    assert cycle(found) is None, " -> ".join(cycle(found))


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    """The test above can fail: two modules that import each other, one of them only inside a
    function (the import a cycle hides behind), are a cycle."""
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "experiments" / "a.py").write_text("from experiments import b\n")
    (tmp_path / "experiments" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    pass\n\n\ndef f():\n"
        "    from experiments.a import g\n")
    assert cycle(modules(tmp_path)) in (["experiments.a", "experiments.b", "experiments.a"],
                                        ["experiments.b", "experiments.a", "experiments.b"])


def test_the_run_directory_module_imports_no_jax():
    """rundir.py answers what a workdir holds without starting JAX (sweeps, reports): it and
    what it imports, at import or later, are the standard library only."""
    found = modules()
    outside = closure("resnet_jax.rundir", found, at_import=False)
    assert not [n for n in outside if n.split(".")[0] in JAX]
    assert not_standard_library(outside) == []


def test_what_a_launcher_imports_is_the_standard_library():
    """A launcher lists a study's runs (`experiments.sweep --list`) with any Python, and the CLI
    starts without JAX (`resnet-jax --help`): what these modules import when imported."""
    found = modules()
    for name in ("experiments.sweep", "experiments.common", "experiments.declaration",
                 "experiments.sweep_root", "resnet_jax.configs", "resnet_jax.errors"):
        assert not_standard_library(closure(name, found, at_import=True)) == [], name
    assert not [n for n in closure("resnet_jax.main", found, at_import=True)
                if n.split(".")[0] in JAX]


def private_uses(path: pathlib.Path, found: dict[str, pathlib.Path]) -> list[str]:
    """Where the file at `path` uses a private name (`_x`, not `__x__`) of one of our modules:
    imports it, reads it as `module._x`, or patches it (`setattr(module, "_x", ...)`)."""
    private = lambda name: name.startswith("_") and not name.endswith("__")  # noqa: E731
    tree = ast.parse(path.read_text(), str(path))
    bound, out = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound.update(a.asname for a in node.names if a.asname and a.name in found)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in (
                *PACKAGES, "benchmarks"):
            for a in node.names:
                if f"{node.module}.{a.name}" in found:
                    bound.add(a.asname or a.name)
                elif private(a.name):
                    out.append(f"{path.name}:{node.lineno} from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in bound and private(node.attr)):
            out.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "setattr"
                and len(node.args) > 1 and isinstance(node.args[0], ast.Name)
                and node.args[0].id in bound and isinstance(node.args[1], ast.Constant)
                and private(str(node.args[1].value))):
            out.append(f"{path.name}:{node.lineno} setattr({node.args[0].id}, "
                       f"{node.args[1].value!r})")
    return out


def test_no_module_of_ours_uses_another_modules_private_names():
    """A module's `_names` are its own: another module, a test or a benchmark that needs one is
    a sign that it should be public (or tested through what is)."""
    found = modules()
    files = [*found.values(), *sorted((REPO / "tests").glob("*.py")),
             *sorted((REPO / "benchmarks").glob("*.py"))]
    assert [use for path in files for use in private_uses(path, found)] == []
