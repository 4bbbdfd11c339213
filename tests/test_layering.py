"""Dependencies point one way: CLI/jobs -> pipeline (Ray) -> core (docs/architecture.md).

An AST walk over raycompat/ fails when a core module imports the Ray layer, the
composed pipeline config, the CLI, the local-cluster harness or Ray itself, at
module level or inside a function (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "raycompat"

# The core: plain torch / numpy / faiss / pyarrow, importable without a Ray runtime.
CORE = ("data", "models", "compat", "training", "retrieval", "backfill", "storage", "suite", "chain", "configio", "errors")
# What the core must not import (each also forbids its submodules).
FORBIDDEN = ("ray", "raycompat.pipeline", "raycompat.cli", "raycompat.local_cluster")


def module_name(path: Path) -> str:
    """The dotted module name of a file under raycompat/ (a package is named by its __init__)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_core(module: str) -> bool:
    """Whether ``module`` (dotted) belongs to one of the core packages or modules."""
    return any(module == f"raycompat.{c}" or module.startswith(f"raycompat.{c}.") for c in CORE)


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in ``source``, relative imports resolved against ``module``.

    ``from pkg import name`` yields both ``pkg`` and ``pkg.name``: ``name`` may be a submodule.
    """
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """``module:line imports name`` for each forbidden import of core module ``module``."""
    if not is_core(module):
        return []
    return [f"{module}:{line} imports {name}" for line, name in imported_modules(source, module, is_package)
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)]


def test_core_never_imports_the_ray_layer_the_cli_or_ray():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += violations(path.read_text(), module_name(path), path.name == "__init__.py")
    assert not found, "core modules import the layers above them:\n" + "\n".join(found)


def test_every_core_package_exists():
    # A renamed package would silently leave the walk with nothing to check.
    for name in CORE:
        assert (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file(), name


@pytest.mark.parametrize("source", [
    "import ray\n",
    "from ray import train\n",
    "def f():\n    import ray.data\n",
    "from raycompat.pipeline.config import PipelineConfig\n",
    "from raycompat import pipeline\n",
    "from raycompat import cli\n",
    "def f():\n    from ... import pipeline\n",
    "from ...local_cluster import LocalCluster\n",
])
def test_the_walk_catches_an_offending_core_module(source):
    assert violations(source, "raycompat.models.losses.example")


@pytest.mark.parametrize("source, module", [
    ("import torch\nfrom raycompat.compat.config import CompatConfig\n", "raycompat.models.example"),
    ("from raycompat.errors import DataError\nimport rayon\n", "raycompat.data.example"),
    ("import ray\n", "raycompat.pipeline.example"),
])
def test_the_walk_allows_what_is_allowed(source, module):
    assert not violations(source, module)


def test_the_readme_layout_names_every_package_and_top_level_module():
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    names = [p.name + "/" for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))
             and p.name != "__pycache__" and p.name.isidentifier()]
    names += [p.name for p in PACKAGE.glob("*.py") if not p.name.startswith("_")]
    missing = [n for n in sorted(names) if n not in layout]
    assert not missing, f"README's Layout section does not name {missing}"
