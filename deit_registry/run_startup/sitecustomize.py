"""Start-up hook of ``deit-registry run`` (see ``deit_registry.runner.STARTUP_DIR``): never imported by hand.

``run`` puts this folder first on ``PYTHONPATH``, so ``site`` runs this file at the start of every Python
process the script starts. It runs the ``sitecustomize`` this file shadows (a distribution's or a virtual
environment's), which ``site`` would otherwise have run, then imports ``deit_registry``, which registers the
DeiT models with timm as in the parent.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _run_shadowed() -> None:
    here = os.path.dirname(os.path.realpath(__file__))
    path = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


_run_shadowed()
try:
    import deit_registry  # noqa: F401  (installs the finder that registers the models when timm is imported)
except ImportError as exc:  # another interpreter, without this package: say so rather than build timm's DeiT
    print(
        f"deit-registry run: this Python ({sys.executable}) cannot import deit_registry ({exc}), so "
        "timm.create_model('deit_*') in it builds timm's own classes; install deit-registry there",
        file=sys.stderr,
    )
