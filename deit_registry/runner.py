"""Run an unmodified script (timm's ``train.py``, ``validate.py``, ``benchmark.py``...) with the DeiT models active.

timm's scripts never import a plugin, so ``timm.create_model("deit_tiny_patch16_224")`` in them builds timm's own
class. :func:`run` imports timm, registers our eight models with it and then runs the script as ``__main__`` in
this interpreter, as ``python SCRIPT ARGS...`` (or ``python -m MODULE ARGS...``) would::

    deit-registry run validate.py --model deit_tiny_patch16_224 --data-dir /data/imagenet
    python -m deit_registry run -m my_pkg.train --model deit_small_patch16_224

or from Python::

    from deit_registry.runner import run
    status = run("benchmark.py", ["--model", "deit_tiny_patch16_224", "--bench", "inference"])
"""

from __future__ import annotations

import os
import runpy
import sys
import traceback
from collections.abc import Sequence

from .errors import DeiTRegistryError


class TimmRegistrationError(DeiTRegistryError, RuntimeError):
    """timm is missing or refused our models: the script would silently build timm's own DeiT classes."""


def activate_timm() -> list[str]:
    """Import timm and register the eight DeiT models with it; return their names.

    Raises :class:`TimmRegistrationError` if timm is not installed or registration fails.
    """
    try:
        import timm  # noqa: F401
    except ImportError as e:
        raise TimmRegistrationError(
            f"timm is not installed ({e}); install it (pip install timm) to run timm scripts with DeiT models"
        ) from e
    from .timm_adapter import register_with_timm

    try:
        names = list(register_with_timm())
    except Exception as e:
        raise TimmRegistrationError(
            f"registering the DeiT models with timm failed: {type(e).__name__}: {e}"
        ) from e
    # Trust but verify through timm's public lookup: a registration that did not take would leave timm's own
    # DeiT in place and the script would run with it without a word.
    from timm.models import model_entrypoint

    stale = [n for n in names if not getattr(model_entrypoint(n), "__module__", "").startswith(__package__)]
    if stale:
        raise TimmRegistrationError(
            f"timm.create_model still resolves {', '.join(stale)} to another package's code after registration; "
            f"report this with your timm version (import timm; timm.__version__)"
        )
    return names


def exit_status(code: object) -> int:
    """The process exit status for ``SystemExit(code)``, as the interpreter computes it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message") prints the message and exits 1
    return 1


def run(target: str, args: Sequence[str] = (), module: bool = False) -> int:
    """Run ``target`` (a script path, or a module name with ``module=True``) as ``__main__`` with ``args``.

    ``sys.argv`` is ``[target, *args]`` and the script's folder (the current folder for a module) comes first
    on ``sys.path``, as with ``python``. Returns the exit status: the script's ``SystemExit`` code, 0 when it
    ends normally, 1 (after printing the traceback) when it raises. ``sys.argv`` and ``sys.path`` are restored
    afterwards. Raises :class:`TimmRegistrationError` before running anything if the models cannot be
    registered, and ``FileNotFoundError`` for a missing script.
    """
    if not module and not os.path.exists(target):
        raise FileNotFoundError(f"can't open file {target!r}: no such file")
    activate_timm()
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [target, *args]
    sys.path.insert(0, os.getcwd() if module else os.path.dirname(os.path.abspath(target)))
    try:
        if module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
    except SystemExit as e:
        return exit_status(e.code)
    except KeyboardInterrupt:
        raise
    except Exception:
        traceback.print_exc()  # what python prints for an uncaught exception
        return 1
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
    return 0
