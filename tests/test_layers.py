"""Imports run downward only: no module of passl imports one of a higher layer.

The layers are the table in docs/internals.md. Every ``import``/``from ... import`` of every
module counts, also those inside functions (a lazy import is still a dependency).
"""
import ast
import pathlib
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "passl"

# Lowest first; a module may import its own layer and those below it.
LAYERS = [
    {"passl.errors"},  # and passl/__init__.py, which imports nothing
    {"passl.io", "passl.registry", "passl.runtime", "passl.rendezvous", "passl.distributed",
     "passl.preemption"},
    {"passl.config", "passl.utils"},
    {"passl.data", "passl.solver", "passl.models"},
    {"passl.evaluation"},
    {"passl.deploy"},
    {"passl.engine"},
    {"passl.cli", "passl.doctor"},
]
# The one module of a higher package that lower layers may use, placed at the layer of
# what it imports: running a static graph with Paddle Inference (``backbone_engine:
# inference``, kNN feature extraction) or an onnxruntime session of it (``onnxruntime``)
# needs nothing above io and runtime.
INTERFACES = {"passl.deploy.engine": 1, "passl.deploy.onnx_runtime": 1}


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module):
    """Layer index of a ``passl.*`` module (an interface first, else its package's)."""
    if module == "passl":
        return 0
    for interface, layer in INTERFACES.items():
        if module == interface or module.startswith(interface + "."):
            return layer
    for index, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py (add it there and "
                         f"to the table in docs/internals.md)")


def imported_modules(path):
    """``(line, module)`` of every passl module ``path`` imports, at any depth of its code."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from passl.x import y`` may name the submodule passl.x.y
            names = [f"{base}.{alias.name}" for alias in node.names] if base in {
                "passl", *(m for layer in LAYERS for m in layer)} else [base]
        else:
            continue
        for name in names:
            if name == "passl" or name.startswith("passl."):
                yield node.lineno, name


def upward_imports():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        for line, imported in imported_modules(path):
            if layer_of(imported) > layer_of(importer):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported}")
    return found


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))


def test_no_module_imports_a_higher_layer():
    assert upward_imports() == []


def test_the_check_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    fake = tmp_path / "passl"
    (fake / "models").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "models" / "__init__.py").write_text("from . import heads\n")
    (fake / "models" / "heads.py").write_text(
        "import paddle\n"
        "def build():\n"
        "    from passl.engine import trainer\n"
        "    from ..deploy import export\n"
        "    from passl.deploy.engine import compile_layer\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert upward_imports() == ["passl/models/heads.py:3 imports passl.engine.trainer",
                                "passl/models/heads.py:4 imports passl.deploy.export"]


@pytest.mark.parametrize("module, layer", [("passl.io.checkpoint", 1), ("passl.deploy.export", 5),
                                           ("passl.deploy.engine", 1), ("passl.cli", 7)])
def test_layer_of(module, layer):
    assert layer_of(module) == layer
