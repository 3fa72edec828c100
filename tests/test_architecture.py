"""The package's folders are its architecture: each depends only on the layers below it, with no cycles.

``sara/`` (the method) must stay liftable into anyone's training script, so it
may import only torch, safetensors and the two shared modules (``errors``,
``io``); the course's heavy dependencies must not load with it.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sara_edu"

# folder -> the folders it may import from (lazily or not). Top-level modules count as folders.
ALLOWED = {
    "errors": set(),
    "colours": set(),
    "io": {"errors"},
    "sara": {"errors", "io"},
    "measure": {"errors"},
    "training": {"errors", "io", "sara"},
    "world": {"errors", "io", "training"},  # the recipes pretrain with the shared loop
    "sd": {"errors", "io", "training", "world"},
    "study": {"errors", "io", "sara", "training", "world", "measure", "colours"},
    "lessons": {"errors", "io", "sara", "training", "world", "sd", "measure", "study", "colours"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(target module, at module level?) for every sara_edu import in ``path``."""
    name = _module_name(path)
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target]
            if node.module is None or target.count(".") == 0:  # "from . import x": x may be a submodule
                targets = [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            if target == "sara_edu" or target.startswith("sara_edu."):
                yield target, id(node) in top


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_every_folder_is_known():
    assert {_folder(m) for m in MODULES} - {""} == set(ALLOWED), "add the new folder to ALLOWED with its layer"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_folders_import_only_the_layers_below(module):
    here = _folder(module)
    if not here:
        return  # sara_edu/__init__.py resolves names lazily, on first use
    for target, _ in _imports(MODULES[module]):
        there = _folder(target)
        assert there == here or there in ALLOWED[here], f"{module} imports {target}: {here}/ may not use {there}/"


def _resolve(target: str) -> str | None:
    """The module a dotted import name refers to (a name inside a module maps to that module)."""
    while target:
        if target in MODULES:
            return target
        target = target.rpartition(".")[0]
    return None


def test_no_import_cycles():
    graph = defaultdict(set)
    for module, path in MODULES.items():
        for target, at_top in _imports(path):
            resolved = _resolve(target)
            if at_top and resolved and resolved != module:
                graph[module].add(resolved)
                # importing a submodule runs its package's __init__ first
                parent = resolved.rpartition(".")[0]
                while parent and parent != "sara_edu":
                    if parent != module and not module.startswith(parent + "."):
                        graph[module].add(parent)
                    parent = parent.rpartition(".")[0]
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])


def test_the_method_imports_without_the_course_dependencies():
    code = ("import sys, sara_edu.sara as s; s.SaRAAdamW; "
            "heavy = [m for m in ('pandas', 'diffusers', 'matplotlib', 'ipywidgets', 'seaborn', 'transformers', "
            "'peft', 'accelerate') if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import sara_edu.sara loaded {out.stdout.strip()}"


def test_the_cycle_check_can_fail(tmp_path, monkeypatch):
    """The checker itself: a two-module cycle is reported."""
    a, b = "sara_edu.sara.fake_a", "sara_edu.sara.fake_b"
    (tmp_path / "fake_a.py").write_text("from .fake_b import x\n")
    (tmp_path / "fake_b.py").write_text("from .fake_a import y\n")
    monkeypatch.setitem(MODULES, a, tmp_path / "fake_a.py")
    monkeypatch.setitem(MODULES, b, tmp_path / "fake_b.py")
    real = _module_name
    monkeypatch.setattr(sys.modules[__name__], "_module_name",
                        lambda p: a if p.name == "fake_a.py" else b if p.name == "fake_b.py" else real(p))
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycles()
