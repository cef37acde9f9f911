"""The package's shape, read from its source with `ast`: which module imports which (every `import` and `from ...
import`, inside functions too, relative ones resolved), the layers pointing one way, no file access or CPU probing
in the plain model, modules and functions of a readable length, and no CPU probing when `paligemma` is imported.

`python tests/test_package_layout.py` prints the import graph, one "module -> imports" line per module.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "paligemma"

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60  # from `def` to the last line, docstring included
SHORT_FUNCTIONS_IN = ("paligemma.models", "paligemma.inference")


def within(module: str, prefix: str) -> bool:
    """Whether `module` is `prefix` or lies under it (paligemma.io.layout is within paligemma.io, not paligemma.i)."""
    return module == prefix or module.startswith(prefix + ".")


class Rule(NamedTuple):
    """What the modules within `importers` may import of the package: `only` these (with everything under them), or
    anything but what is `never` allowed; modules within `exempt` ("*.__main__": any `__main__` module) are not
    held to the rule."""

    importers: str
    only: tuple[str, ...] | None = None
    never: tuple[str, ...] = ()
    exempt: tuple[str, ...] = ()


RULES = [
    # the plain model sits below everything: it reads nothing but the file format, and raises the package's errors
    Rule("paligemma.models", only=("paligemma.models", "paligemma.io.layout", "paligemma.io.safetensors",
                                   "paligemma.errors")),
    # the file format, which the model may use: nothing above it
    Rule("paligemma.io.layout", only=("paligemma.io.safetensors", "paligemma.errors")),
    Rule("paligemma.io.safetensors", only=("paligemma.errors",)),
    # the fast products are applied to a model from outside
    Rule("paligemma.kernels", only=("paligemma.kernels", "paligemma.errors")),
    # quantization works on a model with the kernels; loading and saving quantized folders is paligemma.io's
    Rule("paligemma.quantization", only=("paligemma.quantization", "paligemma.kernels", "paligemma.errors")),
    # decoding needs a model, not the loader, the interpretation tools, training or the entry points
    Rule("paligemma.inference", never=("paligemma.io.checkpoint", "paligemma.interpret", "paligemma.training",
                                       "paligemma.bench", "paligemma.cli")),
    # the entry points: only `__main__` modules, `paligemma.train` and `paligemma.finetune` start them; the command line dispatches
    # `paligemma bench`, and the benchmark's own modules import one another
    Rule("paligemma", never=("paligemma.cli", "paligemma.bench"),
         exempt=("*.__main__", "paligemma.train", "paligemma.finetune", "paligemma.cli", "paligemma.bench")),
]

FORMAT_MODULES = {  # reading or writing files in some format: the model leaves that to paligemma.io
    "json", "pickle", "shelve", "marshal", "csv", "struct", "mmap", "io", "zipfile", "tarfile", "gzip", "bz2",
    "lzma", "tomllib", "configparser", "yaml", "safetensors", "sentencepiece", "PIL", "h5py",
}
FILE_CALLS = {"open", "read_text", "read_bytes", "write_text", "write_bytes", "fromfile", "tofile", "memmap"}
PROBING_MODULES = {"platform", "psutil", "cpuinfo"}


# ---------------------------------------------------------------------------------------------------------------
# Reading the imports


def module_names(package: Path) -> dict[str, Path]:
    """Every module under `package` (a folder), by dotted name: paligemma/io/__init__.py is `paligemma.io`."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported_names(module: str, path: Path) -> list[str]:
    """What `module` imports, anywhere in its source, as absolute dotted names: `import a.b` gives `a.b`, and
    `from a import b` gives `a.b` too, whether b is a module or a name defined in a (relative imports resolved
    against the module's package). `__import__("x")` and `importlib.import_module("x")` with a constant name count
    too."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    raise ValueError(f"{path}:{node.lineno}: relative import beyond the top-level package")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module
            found += [source if alias.name == "*" else f"{source}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = node.func
            called = function.id if isinstance(function, ast.Name) else getattr(function, "attr", None)
            if called in ("__import__", "import_module") and isinstance(node.args[0].value, str):
                found.append(node.args[0].value)
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports. `from a import b` is an edge to the module `a.b` when
    there is one, else to `a` (b is a name defined in a). The parent packages that Python initialises on the way
    (`import a.b.c` runs a/__init__.py and a/b/__init__.py first) are not edges of their own: see
    `test_packages_the_model_imports_through_import_nothing` for the one place where that matters."""
    names = module_names(package)
    graph = {}
    for module, path in names.items():
        targets = set()
        for name in imported_names(module, path):
            if name in names:
                targets.add(name)
            elif name.rpartition(".")[0] in names:
                targets.add(name.rpartition(".")[0])  # a name defined in that module
        graph[module] = targets - {module}
    return graph


@functools.cache
def package_graph() -> dict[str, set[str]]:
    return import_graph(PACKAGE)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None when there is none (depth-first, in sorted order)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every path from it was followed
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def format_graph(graph: dict[str, set[str]]) -> str:
    """One "module -> imports" line per module, sorted."""
    lines = [f"{module} -> {', '.join(sorted(targets)) or '(nothing)'}" for module, targets in sorted(graph.items())]
    return "\n".join(lines)


def exempt(module: str, rule: Rule) -> bool:
    return any(module.endswith(e[1:]) if e.startswith("*.") else within(module, e) for e in rule.exempt)


def broken_rules(graph: dict[str, set[str]], rules: list[Rule]) -> list[str]:
    """"importer -> target (rule)" for every import that a rule forbids."""
    broken = []
    for module, targets in sorted(graph.items()):
        for rule in rules:
            if not within(module, rule.importers) or exempt(module, rule):
                continue
            for target in sorted(targets):
                allowed = rule.only is None or any(within(target, a) for a in rule.only)
                if not allowed or any(within(target, n) for n in rule.never):
                    broken.append(f"{module} -> {target} (rule for {rule.importers})")
    return broken


# ---------------------------------------------------------------------------------------------------------------
# The reader on a package written here, so that a reader which saw nothing could not pass the tests below


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_reader_resolves_every_kind_of_import(tmp_path):
    package = write_package(tmp_path, {
        "pkg/__init__.py": "from .a import thing\nfrom . import b\n",
        "pkg/a.py": "import os\nthing = 1\n",
        "pkg/b.py": "def later():\n    from .sub.c import name\n    import pkg.a as alias\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from .. import a, thing\nfrom ..b import later\nname = __import__('pkg.sub')\n",
    })
    assert import_graph(package) == {
        "pkg": {"pkg.a", "pkg.b"},
        "pkg.a": set(),  # os is not of the package
        "pkg.b": {"pkg.sub.c", "pkg.a"},  # inside a function, and through an alias
        "pkg.sub": set(),
        "pkg.sub.c": {"pkg", "pkg.a", "pkg.b", "pkg.sub"},  # pkg: `thing` is a name its __init__ defines
    }


def test_cycles_and_broken_rules_are_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    graph = {"p.low": {"p.high", "p.errors"}, "p.high": {"p.low"}, "p.main": {"p.high"}, "p.x.__main__": {"p.high"}}
    rules = [Rule("p.low", only=("p.errors",)), Rule("p", never=("p.high",), exempt=("p.main", "*.__main__"))]
    assert broken_rules(graph, rules) == ["p.low -> p.high (rule for p.low)", "p.low -> p.high (rule for p)"]


# ---------------------------------------------------------------------------------------------------------------
# The package


def test_the_graph_covers_the_package():
    graph = package_graph()
    assert set(graph) == set(module_names(PACKAGE))
    assert {"paligemma", "paligemma.models.paligemma", "paligemma.io.layout", "paligemma.cli"} <= set(graph)
    assert sum(len(targets) for targets in graph.values()) > len(graph), "too few imports: the reader saw nothing"


def test_no_import_cycles():
    cycle = find_cycle(package_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_point_one_way():
    broken = broken_rules(package_graph(), RULES)
    assert not broken, "imports against the layering:\n" + "\n".join(broken)


def test_packages_the_model_imports_through_import_nothing():
    """Importing paligemma.io.layout runs paligemma/io/__init__.py first: it must not pull in what the model may not
    import (the top-level `paligemma` is the public face, run by any import of the package, and is exempt)."""
    graph = package_graph()
    parents = {target.rsplit(".", depth)[0]
               for module in graph if within(module, "paligemma.models")
               for target in graph[module] if not within(target, "paligemma.models")
               for depth in range(1, target.count("."))}
    assert "paligemma.io" in parents
    assert {parent: graph[parent] for parent in parents if graph[parent]} == {}


def _model_files() -> dict[str, Path]:
    return {name: path for name, path in module_names(PACKAGE).items() if within(name, "paligemma.models")}


@pytest.mark.parametrize("module", sorted(_model_files()))
def test_the_model_reads_no_files_and_probes_no_cpu(module):
    path = _model_files()[module]
    tree = ast.parse(path.read_text(), str(path))
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            function = node.func
            called = function.id if isinstance(function, ast.Name) else getattr(function, "attr", None)
            if called in FILE_CALLS:
                problems.append(f"line {node.lineno}: calls {called}(")
            if isinstance(function, ast.Attribute) and called in ("load", "save") and \
                    isinstance(function.value, ast.Name) and function.value.id in ("torch", "np", "numpy"):
                problems.append(f"line {node.lineno}: calls {function.value.id}.{called}(")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "/proc" in node.value:
            problems.append(f"line {node.lineno}: names /proc")
    external = {name.split(".")[0] for name in imported_names(module, path)}
    problems += [f"imports {name} (a file format)" for name in sorted(external & FORMAT_MODULES)]
    problems += [f"imports {name} (CPU probing)" for name in sorted(external & PROBING_MODULES)]
    assert not problems, f"{path.relative_to(ROOT)}: " + "; ".join(problems)


def test_no_module_is_too_long():
    lengths = {name: len(path.read_text().splitlines()) for name, path in module_names(PACKAGE).items()}
    long = {name: lines for name, lines in sorted(lengths.items()) if lines > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def function_lengths(path: Path) -> dict[str, int]:
    """Every function and method (nested ones too), as "Class.method" or "function", with its length in lines."""
    lengths = {}

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                lengths[f"{name} (line {child.lineno})"] = child.end_lineno - child.lineno + 1
                walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")
            else:
                walk(child, prefix)

    walk(ast.parse(path.read_text(), str(path)), "")
    return lengths


def test_functions_of_the_model_and_decoding_are_short():
    long = {}
    for name, path in module_names(PACKAGE).items():
        if any(within(name, part) for part in SHORT_FUNCTIONS_IN):
            long.update({f"{name}: {function}": lines for function, lines in function_lengths(path).items()
                         if lines > MAX_FUNCTION_LINES})
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_function_lengths_count_from_def_to_the_last_line(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('@decorator\ndef f():\n    """Doc."""\n\n    return 1\n\n\nclass C:\n    def g(self):\n'
                    '        def h():\n            pass\n        return h\n')
    assert function_lengths(path) == {"f (line 2)": 4, "C.g (line 9)": 4, "C.g.h (line 10)": 2}


# ---------------------------------------------------------------------------------------------------------------
# Importing the package


OPEN_RECORDER = r"""
import builtins, io, json, os, pathlib, sys

seen = []

def recorded(real):
    def record(file, *args, **kwargs):
        seen.append(os.fsdecode(file) if isinstance(file, (str, bytes, os.PathLike)) else repr(file))
        return real(file, *args, **kwargs)
    return record

builtins.open = io.open = recorded(io.open)
os.open = recorded(os.open)
for name in ("open", "read_text", "read_bytes"):
    def method(self, *args, _real=getattr(pathlib.Path, name), **kwargs):
        seen.append(str(self))
        return _real(self, *args, **kwargs)
    setattr(pathlib.Path, name, method)

import paligemma

on_import = list(seen)
from paligemma.kernels.cpu import cpu_flags

cpu_flags()  # what reading the CPU's flags looks like to the recorder
print(json.dumps({"library": paligemma.__file__, "on_import": on_import, "probing": seen[len(on_import):]}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="no /proc/cpuinfo to read (not Linux)")
def test_importing_the_package_does_not_read_proc_cpuinfo():
    """`open`, `io.open`, `os.open` and pathlib's readers are wrapped before `import paligemma`, in a fresh process;
    the CPU is probed on first use only (then the recorder does see /proc/cpuinfo being read)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", OPEN_RECORDER], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(record["library"]).resolve() == PACKAGE / "__init__.py"
    assert "/proc/cpuinfo" not in record["on_import"]
    assert "/proc/cpuinfo" in record["probing"]


if __name__ == "__main__":
    print(format_graph(package_graph()))
