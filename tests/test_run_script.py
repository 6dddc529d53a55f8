"""`deit-registry run`: an unmodified script's timm.create_model builds our DeiT, with argv, output, exit codes
and sys.path as python gives them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
import timm
from helper_mod import TAG  # a module next to the script: its folder must come first on sys.path

model = timm.create_model("deit_tiny_patch16_224", depth=1)
print("module", type(model).__module__)
print("argv", sys.argv[1:])
print("name", __name__, TAG)
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra)
    return env


def _py(*args: str, cwd: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=_env(**extra), capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def script_dir(tmp_path: Path) -> Path:
    d = tmp_path / "scripts"
    d.mkdir()
    (d / "bench.py").write_text(SCRIPT)
    (d / "helper_mod.py").write_text("TAG = 'helper'\n")
    return d


def test_plain_python_builds_timms_class(script_dir: Path, tmp_path: Path) -> None:
    # The baseline the command exists for: run plainly, the script gets timm's own DeiT.
    r = _py(str(script_dir / "bench.py"), "0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "module timm.models.vision_transformer" in r.stdout


def test_run_builds_ours_and_passes_argv_output_and_exit_code(script_dir: Path, tmp_path: Path) -> None:
    r = _py(
        "-m", "deit_registry", "run", str(script_dir / "bench.py"), "3", "--model", "x", "-m", cwd=tmp_path
    )
    assert r.returncode == 3, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("module deit_registry."), r.stdout
    assert lines[1] == "argv ['3', '--model', 'x', '-m']"
    assert lines[2] == "name __main__ helper"
    assert "to stderr" in r.stderr


def test_run_module_form(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from deit_registry.cli import main

    pkg = tmp_path / "h5_run_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tool.py").write_text(
        textwrap.dedent(
            """
            import sys, timm
            print(type(timm.create_model("deit_tiny_patch16_224", depth=1)).__module__, sys.argv[1:], __name__)
            raise SystemExit(5)
            """
        )
    )
    monkeypatch.chdir(tmp_path)  # python -m puts the current folder first on sys.path
    assert main(["run", "-m", "h5_run_pkg.tool", "--flag", "1"]) == 5
    out = capsys.readouterr().out
    assert out.startswith("deit_registry.") and "['--flag', '1'] __main__" in out


def test_exit_message_exception_and_missing_script(tmp_path: Path, capsys) -> None:
    from deit_registry.cli import main

    (tmp_path / "msg.py").write_text("import sys\nsys.exit('bad config')\n")
    assert main(["run", str(tmp_path / "msg.py")]) == 1
    assert capsys.readouterr().err.strip() == "bad config"

    (tmp_path / "boom.py").write_text("def f():\n    raise KeyError('boom')\nf()\n")
    assert main(["run", str(tmp_path / "boom.py")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'boom'" in err

    assert main(["run", str(tmp_path / "nope.py")]) == 1
    err = capsys.readouterr().err
    assert "nope.py" in err and "Traceback" not in err

    assert main(["run"]) == 1
    assert "run needs a script" in capsys.readouterr().err
    assert main(["run", "-m"]) == 1
    assert "run -m needs a module name" in capsys.readouterr().err


def test_a_module_python_cannot_run_is_its_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """``run -m`` checks the module as python -m does before anything runs: a missing module, or a package
    without ``__main__``, is python's own line (no traceback), exit 1; an error raised while importing the
    module's package is the code's, a traceback as under python."""
    from deit_registry.cli import main
    from deit_registry.errors import DeiTRegistryError
    from deit_registry.runner import ModuleNotRunnableError, run

    (tmp_path / "h6_no_main").mkdir()
    (tmp_path / "h6_no_main" / "__init__.py").write_text("")
    (tmp_path / "h6_broken").mkdir()
    (tmp_path / "h6_broken" / "__init__.py").write_text("import h6_missing_dependency\n")
    (tmp_path / "h6_broken" / "tool.py").write_text("print('ran')\n")
    monkeypatch.chdir(tmp_path)
    for name in ("h6_nonexistent_module", "h6_nonexistent_pkg.tool", "h6_no_main"):
        python = _py("-m", name, cwd=tmp_path)
        assert python.returncode == 1
        said = python.stderr.strip().split(": ", 1)[1]  # after "<interpreter>: "
        assert main(["run", "-m", name, "--flag"]) == 1
        assert capsys.readouterr().err.strip() == f"deit-registry: error: {said}"
    assert (
        said
        == "No module named h6_no_main.__main__; 'h6_no_main' is a package and cannot be directly executed"
    )
    with pytest.raises(ModuleNotRunnableError, match="No module named h6_nonexistent_module") as caught:
        run("h6_nonexistent_module", module=True)
    assert isinstance(caught.value, ImportError) and isinstance(caught.value, DeiTRegistryError)
    assert main(["run", "-m", "h6_broken.tool"]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" in err and "No module named 'h6_missing_dependency'" in err and "ran" not in out


def test_missing_timm_stops_before_the_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from deit_registry.cli import main

    monkeypatch.setitem(sys.modules, "timm", None)  # what importlib reports for a timm that is not there
    (tmp_path / "s.py").write_text("print('script ran')\n")
    assert main(["run", str(tmp_path / "s.py")]) == 1
    out, err = capsys.readouterr()
    assert "script ran" not in out and "timm is not installed" in err and "pip install timm" in err


def test_a_broken_timm_fails_the_scripts_own_import(tmp_path: Path) -> None:
    # The script imports timm itself, so a timm that cannot be imported fails there, loudly, as under python.
    broken = tmp_path / "broken"
    (broken / "timm").mkdir(parents=True)
    (broken / "timm" / "__init__.py").write_text("raise ImportError('this timm is broken')\n")
    (tmp_path / "s.py").write_text("import timm\nprint('script ran')\n")
    env_path = os.pathsep.join([str(broken), str(ROOT)])
    r = _py("-m", "deit_registry", "run", "s.py", cwd=tmp_path, PYTHONPATH=env_path)
    assert r.returncode == 1
    assert "script ran" not in r.stdout
    assert "this timm is broken" in r.stderr


def test_the_script_imports_timm_itself_from_its_own_folder(tmp_path: Path) -> None:
    # Running timm's train.py from a pytorch-image-models checkout: the timm beside the script is the one used,
    # and settings made before `import timm` (TIMM_FUSED_ATTN) are read by it.
    import timm

    scripts = tmp_path / "checkout"
    scripts.mkdir()
    (scripts / "timm").symlink_to(Path(timm.__file__).parent, target_is_directory=True)
    (scripts / "s.py").write_text(
        textwrap.dedent(
            """
            import os, sys
            print("imported before", "timm" in sys.modules)
            os.environ["TIMM_FUSED_ATTN"] = "0"
            import timm
            print("timm from", os.path.dirname(os.path.dirname(timm.__file__)))
            model = timm.create_model("deit_tiny_patch16_224", depth=1)
            print("model", type(model).__module__, model.blocks[0].attn.fused_attn)
            """
        )
    )
    r = _py("-m", "deit_registry", "run", str(scripts / "s.py"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "imported before False",
        f"timm from {scripts}",
        "model deit_registry.architecture False",
    ]


CHILDREN = """
import multiprocessing, subprocess, sys

def build(queue):
    import builtins, timm
    model = timm.create_model("deit_tiny_patch16_224", depth=1)
    queue.put(f"{type(model).__module__} {getattr(builtins, 'CHAINED', False)}")

if __name__ == "__main__":
    for method in sys.argv[1:]:
        if method == "subprocess":
            code = "import timm; print(type(timm.create_model('deit_tiny_patch16_224', depth=1)).__module__)"
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100)
            print(method, done.stdout.strip(), done.stderr[-2000:])
            continue
        ctx = multiprocessing.get_context(method)
        queue = ctx.Queue()
        child = ctx.Process(target=build, args=(queue,))
        child.start()
        print(method, queue.get(timeout=100))
        child.join()
"""


def test_processes_the_script_starts_build_ours_too(tmp_path: Path) -> None:
    # multiprocessing's spawn re-imports the script in a fresh interpreter and torchrun starts new ones: without
    # the start-up hook each built timm's own DeiT. A sitecustomize already on the path still runs.
    other = tmp_path / "site"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import builtins\nbuiltins.CHAINED = True\n")
    (tmp_path / "children.py").write_text(CHILDREN)
    env_path = os.pathsep.join([str(other), str(ROOT)])
    methods = ("spawn", "forkserver", "subprocess")
    r = _py("-m", "deit_registry", "run", "children.py", *methods, cwd=tmp_path, PYTHONPATH=env_path)
    assert r.returncode == 0, r.stderr
    assert [line.strip() for line in r.stdout.splitlines()] == [
        "spawn deit_registry.architecture True",
        "forkserver deit_registry.architecture True",
        "subprocess deit_registry.architecture",
    ]
    plain = _py("children.py", "spawn", cwd=tmp_path, PYTHONPATH=env_path)  # the baseline: timm's own
    assert plain.stdout.splitlines() == ["spawn timm.models.vision_transformer True"], plain.stderr


def test_a_registration_failure_inside_the_scripts_import_stops_it(tmp_path: Path) -> None:
    (tmp_path / "s.py").write_text("import timm\nprint('script ran')\n")
    code = (
        "import sys, deit_registry\n"
        "sys.modules['deit_registry.timm_adapter'] = None\n"  # importing it raises ImportError
        "from deit_registry.cli import main\n"
        "sys.exit(main(['run', 's.py']))\n"
    )
    r = _py("-c", code, cwd=tmp_path)
    assert r.returncode == 1
    assert "script ran" not in r.stdout
    assert "registering the DeiT models with timm failed: ModuleNotFoundError" in r.stderr
    assert "Traceback" not in r.stderr  # the package's error, printed as one


def test_the_wheel_ships_the_startup_hook(tmp_path: Path) -> None:
    import zipfile

    from deit_registry.runner import STARTUP_DIR

    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (tree / name).write_bytes((ROOT / name).read_bytes())
    shutil.copytree(
        ROOT / "deit_registry", tree / "deit_registry", ignore=shutil.ignore_patterns("__pycache__")
    )
    code = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "dist")],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    names = zipfile.ZipFile(tmp_path / "dist" / r.stdout.split()[-1]).namelist()
    hook = STARTUP_DIR.relative_to(ROOT).as_posix() + "/sitecustomize.py"
    assert {hook, "deit_registry/py.typed", "deit_registry/imagenet_classes.txt"} <= set(names)


def test_in_process_run_restores_argv_and_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deit_registry.cli import main

    (tmp_path / "p.py").write_text("import sys\nprint(sys.argv)\nsys.exit(0)\n")
    argv, path = sys.argv[:], sys.path[:]
    assert main(["run", str(tmp_path / "p.py"), "a"]) == 0
    assert capsys.readouterr().out.strip() == str([str(tmp_path / "p.py"), "a"])
    assert (sys.argv, sys.path) == (argv, path)


def _refuse() -> list[str]:
    raise RuntimeError("timm said no")


@pytest.mark.parametrize(
    "target, replacement, message",
    [
        ("model_entrypoint", lambda name: print, "still resolves deit_tiny_patch16_224"),  # did not take
        ("register_with_timm", _refuse, "timm said no"),
    ],
)
def test_registration_that_fails_or_does_not_take_is_an_error(
    target: str, replacement, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import timm  # noqa: F401  (imported already: run registers before the script, and must refuse to start it)

    import deit_registry.timm_adapter
    from deit_registry.cli import main

    monkeypatch.setattr(deit_registry.timm_adapter, target, replacement)
    (tmp_path / "s.py").write_text("print('script ran')\n")
    assert main(["run", str(tmp_path / "s.py")]) == 1
    out, err = capsys.readouterr()
    assert "script ran" not in out and message in err
