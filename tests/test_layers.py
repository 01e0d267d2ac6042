"""The packages import one way: adapters <- surgery <- zoo <- bench (benchmarks and CLI).

Every import in every module (top level or inside a function, absolute or relative, and
``importlib.import_module("pnc....")`` strings) is read with ``ast``; a module may import
its own layer and the layers below it, never one above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: folder -> (package, rank): lower ranks never import higher ones
LAYERS = {
    "adapters": ("pnc.adapters", 0),
    "surgery": ("pnc.surgery", 1),
    "zoo": ("pnc.zoo", 2),
    "benchmarks": ("pnc.bench", 3),
}
RANK = {package: rank for package, rank in LAYERS.values()}


def _module_name(path: Path) -> tuple[str, bool]:
    folder = path.relative_to(ROOT).parts[0]
    parts = [LAYERS[folder][0], *path.relative_to(ROOT / folder).with_suffix("").parts]
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import in ``path``."""
    name, is_package = _module_name(path)
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found += [(node.lineno, module)] + [(node.lineno, f"{module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            found += [
                (node.lineno, a.value) for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
            ]
    return found


def _layer(module: str) -> str | None:
    return next((p for p in RANK if module == p or module.startswith(p + ".")), None)


SOURCES = sorted(p for folder in LAYERS for p in (ROOT / folder).rglob("*.py"))


def test_every_layer_has_modules():
    assert {p.relative_to(ROOT).parts[0] for p in SOURCES} == set(LAYERS)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    own = _layer(_module_name(path)[0])
    against = [
        f"line {line}: {module}"
        for line, module in _imports(path)
        if (layer := _layer(module)) is not None and RANK[layer] > RANK[own]
    ]
    assert not against, f"{own} must not import a higher layer: {against}"


def test_the_checker_sees_every_kind_of_import(tmp_path, monkeypatch):
    probe = ROOT / "surgery" / "probe.py"
    text = (
        "import pnc.zoo\nfrom pnc.bench import cli\nfrom ..zoo import store\n"
        "def f():\n    import importlib\n    importlib.import_module('pnc.zoo.archs')\n"
    )
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: text if self == probe else "")
    modules = [m for _, m in _imports(probe)]
    assert {"pnc.zoo", "pnc.bench.cli", "pnc.zoo.store", "pnc.zoo.archs"} <= set(modules)


def test_ray_stays_in_the_bench_layer():
    """Ray is an optional extra (pnc[ray]): only pnc.bench may import it."""
    against = [
        f"{path.relative_to(ROOT)} line {line}"
        for path in SOURCES
        if path.relative_to(ROOT).parts[0] != "benchmarks"
        for line, module in _imports(path)
        if module == "ray" or module.startswith("ray.")
    ]
    assert not against, f"only pnc.bench may import ray: {against}"
