"""The benchmark scripts run, and compare against what they claim to (no timings are asserted here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import deit_registry as dr
from deit_registry.architecture import Block

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_inference_benchmark_compares_with_timms_own_model():
    pytest.importorskip("timm")
    inference = load_script("inference")
    ours, theirs, diff = inference.build_pair("deit_tiny_patch16_224")
    # timm.create_model would return ours once deit_registry is imported; the benchmark must not.
    assert isinstance(ours, dr.DeiT) and not isinstance(theirs, dr.DeiT)
    assert type(theirs).__module__.startswith("timm.")
    assert diff < 1e-5


@pytest.mark.slow  # a timed run, even at its smallest setting
def test_inference_benchmark_runs(capsys):
    pytest.importorskip("timm")
    inference = load_script("inference")
    torch.manual_seed(0)
    inference.main(
        ["--variants", "deit_tiny_patch16_224", "--batch-sizes", "1", "--modes", "exact", "--repeats", "1"]
    )
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("deit_tiny_patch16_224"))
    assert " exact " in row and row.rstrip().endswith("0.0e+00")  # exact mode: our logits are eager fp32's


@pytest.mark.slow  # compiles timm's model and trains the agreement model
def test_inference_benchmark_fast_mode_against_timm_compiled(capsys):
    pytest.importorskip("timm")
    pytest.importorskip("sklearn")
    inference = load_script("inference")
    torch.manual_seed(0)
    args = ["--variants", "deit_tiny_patch16_224", "--batch-sizes", "1", "--modes", "fast", "--repeats", "1"]
    inference.main(args + ["--quick-agreement"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("deit_tiny_patch16_224"))
    picked = inference.dtype_name(inference.pick_dtype(torch.device("cpu")))
    assert f" fast      {picked} " in row
    assert "# CPU features: AVX2 " in out and "top-1 agreement with fp32" in out
    for dtype in ("qint8", "bfloat16"):  # both CPU trades are reported, whichever this CPU picks
        assert f"#   {dtype} " in out


def test_inference_benchmark_counts_the_fast_modes_executed_flops():
    """The fast copy skips the last block's patch-token work: its %mm must count what it runs, not more."""
    inference = load_script("inference")
    model = dr.create_model("deit_tiny_patch16_224")
    assert 0.92 < inference.executed_fraction(model) < 0.94  # about 1/12 of the blocks' FLOPs, less k and v
    assert all(type(b) is Block for b in model.blocks)  # measured on copies
