"""The package as a user installs it: dependency floors, one version, a quiet import, and a
layout whose imports follow the path of the data (no upward imports, no cycles)."""
import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import numbaem

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "numbaem"

# The lowest version of each dependency that has every API numbaem uses, and why.
API_FLOORS = {
    "numpy": ("1.26", "numba 0.60's floor and Generator.choice / astype(copy=False) as used"),
    "scipy": ("1.15", "scipy.special.sph_harm_y (basis, projection) is new in SciPy 1.15"),
    "numba": ("0.60", "first numba with NumPy 2.0 and Python 3.12 support"),
    "mrcfile": ("1.5", "mrcfile.mmap / new_mmap with the header fields as used"),
    "pyfftw": ("0.14", "pyfftw.FFTW with threads= and a planner lock around plan creation"),
    "threadpoolctl": ("3.1", "threadpool_limits(...).restore_original_limits() (use_threads)"),
    "tqdm": ("4.66", "tqdm.auto"),
    "matplotlib": ("3.8", "Figure.savefig(format='png') to an open file"),
    "gemmi": ("0.7", "DensityCalculatorE with blur / cutoff and Model.all() as used (tested with 0.7.5)"),
    "starfile": ("0.5", "starfile.read(path, always_dict=True) and write of a dict of DataFrames (data.star)"),
    "pandas": ("1.5", "DataFrame from a dict of lists (the blocks data.star writes)"),
}


def _version_tuple(text):
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def _project():
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]


def _floors(requirements):
    out = {}
    for req in requirements:
        m = re.match(r"\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*>=\s*([0-9.]+)", req)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def test_dependency_floors_cover_the_apis_used():
    floors = _floors(_project()["dependencies"])
    for name, (need, why) in API_FLOORS.items():
        assert name in floors, f"{name} is used ({why}) but not a dependency"
        assert _version_tuple(floors[name]) >= _version_tuple(need), f"{name}>={floors[name]}: {why}"


def _third_party_imports():
    """Top-level names of the non-standard-library modules imported anywhere in numbaem."""
    names = set()
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "numbaem"}


def test_every_import_is_declared():
    proj = _project()
    declared = set(_floors(proj["dependencies"]))
    for extra in proj.get("optional-dependencies", {}).values():
        declared |= set(_floors(extra))
    aliases = {"dask": "dask", "distributed": "dask", "llvmlite": "numba"}   # shipped with the named one
    for name in _third_party_imports():
        assert aliases.get(name, name) in declared, f"numbaem imports {name}, which pyproject.toml does not declare"


def test_one_version():
    assert numbaem.__version__ == importlib.metadata.version("numbaem")
    text = (PKG / "__init__.py").read_text() + (ROOT / "pyproject.toml").read_text()
    assert not re.search(r'version\s*=\s*"\d', text), "the version is written outside numbaem/_version.py"


def test_import_changes_no_process_wide_setting():
    """``import numbaem`` sets no environment variable, configures no logging, loads no
    pyFFTW (whose OpenMP runtime would read the wait policy) and leaves numba's threads."""
    code = (
        "import os, sys, logging, numba\n"
        "env = dict(os.environ); n = numba.get_num_threads()\n"
        "import numbaem, numbaem.cli.main\n"
        "assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())\n"
        "assert 'pyfftw' not in sys.modules\n"
        "assert numba.get_num_threads() == n\n"
        "assert not logging.getLogger('numbaem').handlers and not logging.getLogger().handlers\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# --------------------------------------------------------------------------- layout

#: Subpackages from the ground up; a module may import its own subpackage and those listed
#: before it, never one after it (``em`` and ``sim`` are peers and do not import each other).
LAYERS = {
    "runtime": set(),
    "model": {"runtime"},
    "data": {"runtime", "model"},
    "analysis": {"runtime", "model", "data"},
    "em": {"runtime", "model", "data", "analysis"},
    "sim": {"runtime", "model", "data", "analysis"},
    "cli": {"runtime", "model", "data", "analysis", "em", "sim"},
}


def _module_name(path):
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports_of(path):
    """numbaem modules imported by ``path`` (relative imports resolved; function-level ones too)."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("numbaem"):
                continue
            for alias in node.names:   # "from . import fft" names a module
                sub = f"{target}.{alias.name}"
                out.add(sub if (ROOT / (sub.replace(".", "/") + ".py")).exists() else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("numbaem"))
    return out


def _graph():
    return {_module_name(p): _imports_of(p) for p in PKG.rglob("*.py")}


def _layer(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def test_every_module_sits_in_a_layer():
    for module in _graph():
        if module in ("numbaem", "numbaem._version"):
            continue
        assert _layer(module) in LAYERS, f"{module} is outside the subpackages {sorted(LAYERS)}"


def test_no_upward_imports():
    bad = []
    for module, deps in _graph().items():
        src = _layer(module)
        if src is None:
            continue
        for dep in deps:
            dst = _layer(dep)
            if dst is not None and dst != src and dst not in LAYERS[src]:
                bad.append(f"{module} -> {dep}")
    assert not bad, "imports against the layering: " + ", ".join(sorted(bad))


def test_no_import_cycles():
    graph = {m: {d for d in deps if d != m} for m, deps in _graph().items() if m != "numbaem"}
    graph = {m: {d for d in deps if d in graph and d != "numbaem"} for m, deps in graph.items()}
    # a subpackage's __init__ is imported with each of its modules; it must not import them back
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in graph[m]:
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module, dep", [("numbaem.em.run", "numbaem.model.basis"),
                                         ("numbaem.cli.main", "numbaem.cli.reconstruct"),
                                         ("numbaem.em.mstep", "numbaem.runtime.fft"),
                                         ("numbaem.em.checkpoint", "numbaem.runtime.fft")])
def test_layout_checker_sees_real_edges(module, dep):
    """The checker itself finds the edges it judges, relative, ``from . import x`` and
    function-level imports included (a checker that sees nothing passes everything)."""
    assert dep in _graph()[module]
