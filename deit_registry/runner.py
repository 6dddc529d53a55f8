"""Run an unmodified script (timm's ``train.py``, ``validate.py``, ``benchmark.py``...) with the DeiT models active.

timm's scripts never import a plugin, so ``timm.create_model("deit_tiny_patch16_224")`` in them builds timm's own
class. :func:`run` runs the script as ``__main__`` in this interpreter, as ``python SCRIPT ARGS...`` (or
``python -m MODULE ARGS...``) would, with our eight models registered in timm from the moment the script, or
any process it starts, imports timm::

    deit-registry run validate.py --model deit_tiny_patch16_224 --data-dir /data/imagenet
    python -m deit_registry run -m my_pkg.train --model deit_small_patch16_224

or from Python::

    from deit_registry.runner import run
    status = run("benchmark.py", ["--model", "deit_tiny_patch16_224", "--bench", "inference"])
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import runpy
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from . import timm_hook
from .errors import ModuleNotRunnableError, TimmRegistrationError

# Holds a sitecustomize.py that imports deit_registry: first on PYTHONPATH, it runs at the start of every Python
# process the script starts (multiprocessing's spawn and forkserver, torchrun's workers, subprocess), which
# would otherwise re-import the script without us. Python offers no other start-up hook that needs no write
# into site-packages; opentelemetry-instrument and ddtrace-run do the same.
STARTUP_DIR = Path(__file__).resolve().parent / "run_startup"


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def exit_status(code: object) -> int:
    """The process exit status for ``SystemExit(code)``, as the interpreter computes it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message") prints the message and exits 1
    return 1


def _module_problem(name: str) -> str | None:
    """Why ``python -m name`` would stop before running anything, in python's words (runpy's checks, through
    importlib's public API), or None. Imports the parent packages, as python does; an error raised inside one
    is the module's own and propagates."""
    if name.startswith("."):
        return "Relative module names not supported"
    parent = name.rpartition(".")[0]
    if parent:
        try:
            importlib.import_module(parent)
        except ImportError as err:  # a missing ancestor is reported below; other import errors are the code's
            if err.name is None or (err.name != parent and not parent.startswith(err.name + ".")):
                raise
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, AttributeError, TypeError, ValueError) as err:
        return f"Error while finding module specification for {name!r} ({type(err).__name__}: {err})"
    if spec is None:
        return f"No module named {name}"
    if spec.submodule_search_locations is not None:  # a package: python -m runs its __main__
        if name == "__main__" or name.endswith(".__main__"):
            return "Cannot use package as __main__ module"
        problem = _module_problem(f"{name}.__main__")
        if problem is not None and name in sys.modules:
            return f"{problem}; {name!r} is a package and cannot be directly executed"
        return problem
    if spec.loader is None:
        return f"{name!r} is a namespace package and cannot be executed"
    return None


def run(target: str, args: Sequence[str] = (), module: bool = False) -> int:
    """Run ``target`` (a script path, or a module name with ``module=True``) as ``__main__`` with ``args``.

    ``sys.argv`` is ``[target, *args]`` and the script's folder (the current folder for a module) comes first
    on ``sys.path``, as with ``python``. Returns the exit status: the script's ``SystemExit`` code, 0 when it
    ends normally, 1 (after printing the traceback) when it raises. ``sys.argv``, ``sys.path`` and the
    environment are restored afterwards. Raises :class:`TimmRegistrationError` if the models cannot be
    registered: before the script runs if timm is missing, else from the script's own ``import timm``. Raises
    ``FileNotFoundError`` for a missing script, and :class:`ModuleNotRunnableError` (an ``ImportError``, with
    the line ``python -m`` prints) for a module that cannot be found or run.
    """
    if not module and not os.path.exists(target):
        raise FileNotFoundError(f"can't open file {target!r}: no such file")
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [target, *args]
    sys.path.insert(0, os.getcwd() if module else os.path.dirname(os.path.abspath(target)))
    pythonpath = os.pathsep.join(filter(None, [str(STARTUP_DIR), os.environ.get("PYTHONPATH")]))
    try:
        with _environment(**{timm_hook.REQUIRE_ENV: "1", "PYTHONPATH": pythonpath}):
            # timm is looked up, not imported: the script imports it itself, so a timm folder beside it (a
            # pytorch-image-models checkout) and settings it makes first (TIMM_FUSED_ATTN) count, as under python
            if importlib.util.find_spec("timm") is None:
                raise TimmRegistrationError(
                    "timm is not installed; install it (pip install timm) to run timm scripts with DeiT models"
                )
            timm_hook.install()  # registers now if timm.models is imported (raising on failure), else on import
            if module:
                problem = _module_problem(target)  # runpy's own ImportError would print as a traceback
                if problem is not None:
                    raise ModuleNotRunnableError(problem, name=target)
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(target, run_name="__main__")
    except SystemExit as e:
        return exit_status(e.code)
    except (KeyboardInterrupt, TimmRegistrationError, ModuleNotRunnableError):
        raise
    except Exception:
        traceback.print_exc()  # what python prints for an uncaught exception
        return 1
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
    return 0


__all__ = ["ModuleNotRunnableError", "TimmRegistrationError", "exit_status", "run"]
