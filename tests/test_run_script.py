"""`deit-registry run`: an unmodified script's timm.create_model builds our DeiT, with argv, output, exit codes
and sys.path as python gives them."""

from __future__ import annotations

import os
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


def test_registration_failure_stops_before_the_script(tmp_path: Path) -> None:
    # A timm that cannot be imported: the script must not run with whatever create_model it would find.
    broken = tmp_path / "broken"
    (broken / "timm").mkdir(parents=True)
    (broken / "timm" / "__init__.py").write_text("raise ImportError('this timm is broken')\n")
    (tmp_path / "s.py").write_text("print('script ran')\n")
    env_path = os.pathsep.join([str(broken), str(ROOT)])
    r = _py("-m", "deit_registry", "run", "s.py", cwd=tmp_path, PYTHONPATH=env_path)
    assert r.returncode == 1
    assert "script ran" not in r.stdout
    assert "this timm is broken" in r.stderr and "timm" in r.stderr


def test_in_process_run_restores_argv_and_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deit_registry.cli import main

    (tmp_path / "p.py").write_text("import sys\nprint(sys.argv)\nsys.exit(0)\n")
    argv, path = sys.argv[:], sys.path[:]
    assert main(["run", str(tmp_path / "p.py"), "a"]) == 0
    assert capsys.readouterr().out.strip() == str([str(tmp_path / "p.py"), "a"])
    assert (sys.argv, sys.path) == (argv, path)


@pytest.mark.parametrize(
    "register, message",
    [
        (lambda: ["resnet18"], "resolves resnet18 to another package"),  # registration that did not take
        (lambda: (_ for _ in ()).throw(RuntimeError("timm said no")), "timm said no"),
    ],
)
def test_registration_that_fails_or_does_not_take_is_an_error(
    register, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import deit_registry.timm_adapter
    from deit_registry.cli import main

    monkeypatch.setattr(deit_registry.timm_adapter, "register_with_timm", register)
    (tmp_path / "s.py").write_text("print('script ran')\n")
    assert main(["run", str(tmp_path / "s.py")]) == 1
    out, err = capsys.readouterr()
    assert "script ran" not in out and message in err
