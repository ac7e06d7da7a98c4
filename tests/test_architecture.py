"""The layering the project keeps, checked on the source: the runtime never imports the exporter, the
CLI or the server; inside the runtime, each layer (a sub-package) imports only the layers below it;
the project's modules import each other without cycles (function-level imports count: a lazy import
is still a dependency); no module imports another module's private names."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = {"runtime": "ditrt.runtime", "exporter": "ditrt.exporter", "ditrt": "ditrt"}

# The runtime's layers, lowest first (docs/architecture.md): a module may import its own layer and the
# layers before it, never one after it, and never the `ditrt.runtime` facade (the public API).
LAYERS = ["core", "spec", "sampling", "artifact", "execution", "jobs"]


def project_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


MODULES = project_modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports(module: str) -> list[tuple[str, str | None]]:
    """(imported project module, name imported from it or None) for every import in the file."""
    found = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name in MODULES]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:  # `from package import submodule`
                    found.append((f"{base}.{alias.name}", None))
                elif base in MODULES:
                    found.append((base, alias.name))
    return found


def graph() -> dict[str, set[str]]:
    return {m: {target for target, _ in imports(m) if target != m} for m in MODULES}


def layer_of(module: str) -> int | None:
    """The rank of a runtime module's layer; None for the facade (`ditrt.runtime` itself)."""
    parts = module.split(".")
    return LAYERS.index(parts[2]) if len(parts) > 2 else None


def upward_imports() -> list[tuple[str, str]]:
    return [(m, t) for m, targets in graph().items() if m.startswith("ditrt.runtime.")
            for t in targets if t.startswith("ditrt.runtime") and (layer_of(t) is None or layer_of(t) > layer_of(m))]


def test_the_module_list_is_the_project():
    assert {"ditrt.runtime", "ditrt.runtime.execution.pipeline", "ditrt.runtime.execution.trt.backend",
            "ditrt.exporter.onnx_export", "ditrt.cli", "ditrt.serve", "ditrt.serve.app"} <= set(MODULES)


def test_every_runtime_module_sits_in_one_layer():
    loose = [m for m in MODULES if m.startswith("ditrt.runtime.") and m.split(".")[2] not in LAYERS]
    assert loose == [], f"runtime modules outside the layers {LAYERS}: {loose}"


def test_the_runtime_layers_import_only_downward():
    assert upward_imports() == []


def test_the_installed_packages_are_the_folders():
    """pyproject's package list names every folder with an __init__.py (a missing one is absent from a
    wheel), and the training program is not among them (examples/digits/train_digits.py)."""
    import tomllib
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {m for m, path in MODULES.items() if path.name == "__init__.py"} | {"ditrt.exporter.data"}
    assert listed == packages
    assert not any("train_digits" in m for m in MODULES) and (ROOT / "examples/digits/train_digits.py").is_file()


def test_the_flat_names_are_the_moved_modules():
    """Code written against ditrt <= 0.3's flat layout imports the same module objects (one registry)."""
    import importlib
    from ditrt import runtime
    from ditrt.runtime.backends import BackendKind, register_backend
    from ditrt.runtime.execution import backends
    assert (register_backend, BackendKind) == (backends.register_backend, backends.BackendKind)
    for flat, moved in runtime.MOVED.items():
        assert importlib.import_module(f"ditrt.runtime.{flat}") is importlib.import_module(f"ditrt.runtime.{moved}")
        assert f"ditrt.runtime.{moved}" in MODULES
    assert runtime.noise is importlib.import_module("ditrt.runtime.sampling.noise")
    assert importlib.import_module("ditrt.runtime.trt.build").__spec__.name == "ditrt.runtime.jobs.build"


def test_the_runtime_imports_no_exporter_cli_or_server():
    bad = [(m, t) for m, targets in graph().items() if m.startswith("ditrt.runtime")
           for t in targets if not t.startswith("ditrt.runtime")]
    assert bad == []


def test_the_import_graph_is_acyclic():
    edges, state, cycles = graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_names_cross_modules():
    bad = [(m, f"{t}.{name}") for m in MODULES for t, name in imports(m)
           if name and name.startswith("_") and not name.startswith("__") and t != m]
    assert bad == []


def test_the_checks_see_a_cycle_and_a_private_import(tmp_path, monkeypatch):
    """The checks above are real: a cycle and a private import planted in copies are found."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from ditrt.runtime import b_mod\n")
    b.write_text("def f():\n    from ditrt.runtime.a_mod import _secret\n")
    monkeypatch.setitem(MODULES, "ditrt.runtime.a_mod", a)
    monkeypatch.setitem(MODULES, "ditrt.runtime.b_mod", b)
    edges = graph()
    assert "ditrt.runtime.b_mod" in edges["ditrt.runtime.a_mod"] and "ditrt.runtime.a_mod" in edges["ditrt.runtime.b_mod"]
    assert ("ditrt.runtime.a_mod", "_secret") in imports("ditrt.runtime.b_mod")


def test_the_layer_check_sees_an_upward_import(tmp_path, monkeypatch):
    """A sampling module that imports the pipeline, and a job-free module that imports the facade, are found."""
    up = tmp_path / "up.py"
    up.write_text("def f():\n    from ..execution.pipeline import load\n    from .. import load\n")
    monkeypatch.setitem(MODULES, "ditrt.runtime.sampling.up", up)
    found = upward_imports()
    assert ("ditrt.runtime.sampling.up", "ditrt.runtime.execution.pipeline") in found
    assert ("ditrt.runtime.sampling.up", "ditrt.runtime") in found
