"""torch.hub's door: hubconf.py from a plain checkout without timm, list/help through torch.hub's cache layout,
pretrained weights from a local server, and mistyped entry names."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from weights_server import Route, WeightsServer

import deit_registry
from deit_registry.variants import VARIANTS

REPO = Path(__file__).resolve().parent.parent
NAMES = sorted(VARIANTS)
TINY = "deit_tiny_patch16_224"

# The torch-only environment .ci/run builds (torch, no timm, no torchvision, deit_registry not installed).
_DEFAULT_TORCH_ONLY = Path.home() / ".cache" / "deit-registry-ci" / "venv-torch-only" / "bin" / "python"

# Used when that environment is absent: the same interpreter with timm and torchvision made unimportable.
_BLOCK_TIMM = """
import sys
class _NoTimm:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("timm", "torchvision"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
sys.meta_path.insert(0, _NoTimm())
"""


def _torch_only_python() -> Path | None:
    python = Path(os.environ.get("DEIT_TORCH_ONLY_PYTHON") or _DEFAULT_TORCH_ONLY)
    return python if python.is_file() and (python.parent.parent / ".complete").is_file() else None


def _run_without_timm(code: str, cwd: Path, env: dict[str, str] | None = None) -> dict:
    python = _torch_only_python()
    prelude = "" if python is not None else _BLOCK_TIMM
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(
        [str(python or sys.executable), "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_hubconf_imports_only_deit_registry_and_lists_torch() -> None:
    tree = ast.parse((REPO / "hubconf.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported == {"deit_registry"}
    deps = [n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "dependencies"]
    assert ast.literal_eval(deps[0].value) == ["torch"]
    # plain: the eight constructors imported from the one builder's module, nothing defined or patched here
    assert not [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Expr))][1:]
    (imports,) = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
    assert imports.module == "deit_registry.deit" and sorted(a.name for a in imports.names) == NAMES
    from deit_registry import deit

    assert all(getattr(deit, n).__doc__ for n in NAMES)


def test_hub_load_all_eight_from_a_checkout_without_timm(tmp_path: Path) -> None:
    out = _run_without_timm(
        f"""
        import importlib.util, json, sys
        import torch
        repo = {str(REPO)!r}
        names = {NAMES!r}

        def importable(name):
            try:
                return importlib.util.find_spec(name) is not None
            except ImportError:
                return False

        assert not importable("timm")
        params, kinds = {{}}, set()
        with torch.device("meta"):  # structure and parameter counts; one real forward below
            for name in names:
                m = torch.hub.load(repo, name, source="local")
                kinds.add(type(m).__module__ + "." + type(m).__name__)
                params[name] = sum(p.numel() for p in m.parameters())
        tiny = torch.hub.load(repo, "deit_tiny_distilled_patch16_224", source="local", num_classes=5).eval()
        with torch.no_grad():
            shape = list(tiny(torch.randn(1, 3, 224, 224)).shape)
        try:
            torch.hub.load(repo, "deit_smal_patch16_224", source="local")
            typo = None
        except Exception as e:
            typo = [type(e).__name__, str(e), getattr(e, "suggestions", None)]
        import deit_registry
        print(json.dumps(dict(
            kinds=sorted(kinds), params=params, shape=shape, typo=typo,
            package=deit_registry.__file__,
            heavy=sorted(m for m in sys.modules if m.split(".")[0] in ("timm", "torchvision")),
            torch_only=not importable("timm") and not importable("torchvision"),
        )))
        """,
        cwd=tmp_path,
    )
    assert out["torch_only"] and out["heavy"] == []
    assert out["kinds"] == ["deit_registry.architecture.DeiT"]
    assert out["params"] == {n: VARIANTS[n].num_params for n in NAMES}
    assert out["shape"] == [1, 5]
    assert Path(out["package"]).resolve().parent == REPO / "deit_registry"  # the checkout's copy
    kind, message, _ = out["typo"]
    assert kind == "RuntimeError" and "Cannot find callable deit_smal_patch16_224" in message  # torch.hub's


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the repository where torch.hub leaves a GitHub download: ``<hub dir>/owner_repo_branch``."""
    hub_dir = tmp_path / "hub"
    repo_copy = hub_dir / "example_deit-registry_main"
    shutil.copytree(
        REPO / "deit_registry", repo_copy / "deit_registry", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / "hubconf.py", repo_copy / "hubconf.py")
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub_dir))
    return hub_dir


def test_hub_list_and_help_from_the_cache_without_network(hub_cache: Path) -> None:
    repo = "example/deit-registry:main"
    entries = torch.hub.list(repo, skip_validation=True, trust_repo=True)
    assert sorted(entries) == NAMES
    doc = torch.hub.help(repo, "deit_base_distilled_patch16_384", skip_validation=True, trust_repo=True)
    assert "DeiT-B distilled 384" in doc and "Options:" in doc and "num_classes" in doc and "weights=" in doc
    with torch.device("meta"):
        model = torch.hub.load(repo, "deit_small_patch16_224", skip_validation=True, trust_repo=True)
    assert isinstance(model, deit_registry.DeiT) and model.embed_dim == 384
    with pytest.raises(RuntimeError, match="Cannot find callable deit_base_patch16_348"):  # torch.hub's own
        torch.hub.load(repo, "deit_base_patch16_348", skip_validation=True, trust_repo=True)


def test_hub_pretrained_weights_from_a_local_server(tmp_path: Path) -> None:
    torch.manual_seed(1)
    state = deit_registry.create_model(TINY).state_dict()
    tmp = tmp_path / "tmp.pth"
    torch.save({"model": state}, tmp)
    name = f"{TINY}-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    torch.save(state, tmp_path / "expected.pth")
    server = WeightsServer()
    try:
        url = server.add(f"/deit/{name}", Route(tmp.read_bytes()))
        out = _run_without_timm(
            f"""
            import json, torch
            model = torch.hub.load({str(REPO)!r}, {TINY!r}, source="local", pretrained=True, weights={url!r})
            expected = torch.load({str(tmp_path / "expected.pth")!r}, weights_only=True)
            got = model.state_dict()
            print(json.dumps(dict(same=all(torch.equal(got[k], v) for k, v in expected.items()),
                                  keys=len(expected) == len(got))))
            """,
            cwd=tmp_path,
            env={
                "TORCH_HOME": str(tmp_path / "torch_home"),
                "HF_HUB_OFFLINE": "0",
                "DEIT_REGISTRY_OFFLINE": "0",
            },
        )
    finally:
        server.close()
    assert out == {"same": True, "keys": True}
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / name).is_file()
