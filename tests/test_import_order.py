"""Registration with timm holds in every import order (each in a fresh interpreter, run side by side), a failure
to register is a visible warning with the fix, the package has no import cycles, and it reaches into no other
library's private state."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "deit_registry"

# Run after the imports under test: what timm builds, what it warned, and whether the hook is gone.
_CHECK = """
import json, sys, warnings
import timm, torch
from deit_registry import DeiT
from deit_registry.timm_hook import hook_installed
with torch.device("meta"):  # structure only
    built = [timm.create_model(n) for n in ("deit_tiny_patch16_224", "deit_base_distilled_patch16_384.fb_in1k")]
    deit3 = timm.create_model("deit3_small_patch16_224")
print(json.dumps(dict(
    ours=[type(m) is DeiT for m in built],
    crop=[m.pretrained_cfg["crop_pct"] for m in built],
    deit3=type(deit3).__module__,
    pretrained=timm.list_models("deit_*", pretrained=True),
    hook_left=hook_installed(),
    loaders=[type(sys.modules[m].__spec__.loader).__name__ for m in ("timm", "timm.models")],
    warnings=[str(w.message) for w in caught],
)))
"""

# A finder that imports deit_registry the moment timm's own import reaches ``trigger``: timm partly imported.
_IMPORT_DURING = """
import sys
class _Probe:
    def find_spec(self, name, path=None, target=None):
        if name == {trigger!r}:
            sys.meta_path.remove(self)
            import deit_registry
        return None
sys.meta_path.insert(0, _Probe())
"""

ORDERS = {
    "ours_transformers_timm": "import deit_registry, transformers, timm",
    "find_spec_before_timm": "import deit_registry, importlib.util\nimportlib.util.find_spec('timm')\n"
    "importlib.util.find_spec('timm')\nimport timm",
    "pkgutil_walk": "import deit_registry, pkgutil\n"
    "found = [m for m in pkgutil.iter_modules() if m.name == 'timm']\n"
    "assert found and found[0].module_finder.find_spec('timm') is not None\nimport timm",
    "timm_first": "import timm, deit_registry",
    "transformers_ours_timm": "import transformers, deit_registry, timm",
    "timm_layers_only": "import deit_registry, timm.layers",
    "during_timm_import": _IMPORT_DURING.format(trigger="timm.layers") + "import timm",
}


def _start(body: str) -> subprocess.Popen:
    code = (
        "import warnings\nwarnings.simplefilter('always')\n_rec = warnings.catch_warnings(record=True)\n"
        "caught = _rec.__enter__()\n" + textwrap.dedent(body) + "\n" + _CHECK
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def order_results() -> dict[str, dict]:
    """Every order at once, each in its own fresh interpreter (importing transformers and timm is slow)."""
    procs = {name: _start(body) for name, body in ORDERS.items()}
    return {name: _result(proc) for name, proc in procs.items()}


@pytest.mark.parametrize("order", list(ORDERS))
def test_every_import_order_registers_ours(order: str, order_results: dict[str, dict]) -> None:
    out = order_results[order]
    assert out["ours"] == [True, True], out
    assert out["crop"] == [0.875, 0.875]  # our pretrained cfg (timm's own says 0.9)
    assert out["deit3"] == "timm.models.vision_transformer"
    assert len(out["pretrained"]) == 8 and all(n.endswith(".fb_in1k") for n in out["pretrained"])
    assert not out["hook_left"] and out["loaders"] == ["SourceFileLoader", "SourceFileLoader"]
    relevant = [w for w in out["warnings"] if "registry" in w or "deit" in w.lower()]
    assert relevant == []  # neither timm's "Overwriting ... in registry" nor ours


def test_half_imported_timm_models_warns_with_the_fix_and_the_fix_works() -> None:
    """deit_registry imported from inside timm.models' own import: registering then is impossible; say so."""
    body = _IMPORT_DURING.format(trigger="timm.models.beit") + textwrap.dedent(
        """
        import timm
        import deit_registry
        said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert any("deit_registry.register_with_timm()" in s for s in said), said
        assert type(timm.create_model("deit_tiny_patch16_224", device="meta")).__module__.startswith("timm.")
        deit_registry.register_with_timm()
        caught.clear()
        """
    )
    out = _result(_start(body))
    assert out["ours"] == [True, True] and out["crop"] == [0.875, 0.875] and out["warnings"] == []


def test_a_registration_failure_is_a_warning_naming_the_fix() -> None:
    """timm.models imports, but our registering module cannot: timm's import goes on, the user is told."""
    body = textwrap.dedent(
        """
        import sys, deit_registry
        sys.modules["deit_registry.timm_adapter"] = None  # makes importing it raise ImportError
        import timm
        said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        print(json.dumps(dict(said=said, hook=deit_registry.timm_hook.hook_installed(),
                              cls=type(timm.create_model("deit_tiny_patch16_224", device="meta")).__module__)))
        """
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, warnings\nwarnings.simplefilter('always')\n"
            "caught = warnings.catch_warnings(record=True).__enter__()\n" + body,
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any("could not register" in s and "register_with_timm()" in s for s in out["said"]), out
    assert out["cls"].startswith("timm.") and not out["hook"]


# ------------------------------------------------------------------------------------------ the package
def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere (function bodies too), ``if TYPE_CHECKING`` excluded."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import x` imports the submodule x when there is one
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in modules and m != name}


def test_no_import_cycles_in_the_package() -> None:
    """A static check over every import statement, including those inside functions."""
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    graph = {_module_name(f): _imports(f, modules) for f in files}
    # A submodule always imports its parent package first: that edge is Python's, not a design choice.
    for name, deps in graph.items():
        deps -= {p for p in modules if name.startswith(p + ".")}
    cycles = []

    def walk(node: str, stack: list[str], done: set[str]) -> None:
        for dep in sorted(graph[node]):
            if dep in stack:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in done:
                walk(dep, [*stack, dep], done)
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        walk(start, [start], done)
    assert cycles == []
    assert "deit_registry.timm_adapter" in graph["deit_registry.timm_hook"]  # the checker sees lazy imports


_PRIVATE = re.compile(
    r"sys\._getframe|f_locals|_registry\._|_global_forward|_factory\._|__class__ *=|_hub_dir"
)


@pytest.mark.parametrize(
    "path",
    [
        "hubconf.py",
        "deit_registry/__init__.py",
        "deit_registry/deit.py",
        "deit_registry/registry.py",
        "deit_registry/timm_adapter.py",
        "deit_registry/timm_hook.py",
        "deit_registry/variants.py",
    ],
)
def test_no_private_state_of_other_libraries(path: str) -> None:
    assert _PRIVATE.findall((REPO / path).read_text(encoding="utf-8")) == []
    assert not (PACKAGE / "hub.py").exists()
