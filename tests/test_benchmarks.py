"""The benchmark scripts run, and compare against what they claim to (no timings are asserted here)."""

from __future__ import annotations

import importlib.util
import time
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


@pytest.mark.parametrize(
    "mode, dtype", [("fast-fp32", torch.float32), ("fast-bf16", torch.bfloat16), ("fast-int8", torch.qint8)]
)
@pytest.mark.filterwarnings("ignore:this CPU has no native bf16")  # fast-bf16 builds its copy on any CPU
def test_inference_benchmark_forced_modes_run_their_dtype(mode, dtype):
    """The forced fast modes build our fast copy in their dtype, beside timm's model compiled in fp32."""
    pytest.importorskip("timm")
    inference = load_script("inference")
    ours, theirs, _ = inference.build_pair("deit_tiny_patch16_224")
    fast_model, got = inference.prepare_ours(mode, ours)
    timm_compiled = inference.prepare_timm(mode, theirs, torch.float32)
    assert (
        got is dtype
        and fast_model.dtype is dtype
        and inference.mode_dtype(mode, torch.device("cpu")) is dtype
    )
    assert timm_compiled is not theirs


def test_inference_benchmark_runs_timm_in_its_fastest_dtype_beside_int8(monkeypatch):
    """timm has no int8 path: beside our int8 copy its model runs bf16 where the CPU has native bf16, else fp32;
    beside our float dtypes, the same dtype."""
    inference = load_script("inference")
    cpu = torch.device("cpu")
    for picked, beside_int8 in ((torch.bfloat16, torch.bfloat16), (torch.qint8, torch.float32)):
        monkeypatch.setattr(inference, "pick_dtype", lambda device, model=None, picked=picked: picked)
        assert inference.timm_dtype(torch.qint8, cpu) is beside_int8
        for dtype in (torch.float32, torch.bfloat16):
            assert inference.timm_dtype(dtype, cpu) is dtype


def test_inference_benchmark_bf16_mode_runs_both_models_eagerly_in_bf16():
    pytest.importorskip("timm")
    inference = load_script("inference")
    ours, theirs, _ = inference.build_pair("deit_tiny_patch16_224")
    ours_bf16, got = inference.prepare_ours("bf16", ours)
    theirs_bf16 = inference.prepare_timm("bf16", theirs, got)
    assert got is torch.bfloat16 and inference.mode_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert isinstance(ours_bf16, dr.DeiT) and type(theirs_bf16) is type(theirs)  # eager: not compiled
    assert {p.dtype for p in ours_bf16.parameters()} == {p.dtype for p in theirs_bf16.parameters()} == {got}
    assert next(ours.parameters()).dtype is torch.float32  # copies: the fp32 pair is untouched
    x = torch.randn(1, 3, 224, 224, dtype=got)
    with torch.inference_mode():
        assert (ours_bf16(x).float() - theirs_bf16(x).float()).abs().max() < 0.1


def test_inference_benchmark_skips_the_cuda_only_modes_on_cpu(capsys):
    pytest.importorskip("timm")
    inference = load_script("inference")
    args = ["--variants", "deit_tiny_patch16_224", "--batch-sizes", "1", "--modes", "fast-nographs"]
    inference.main(args + ["--repeats", "1", "--sample-seconds", "0"])
    out = capsys.readouterr().out
    assert "# skipped: fast-nographs rows: CUDA graphs exist on CUDA only, not cpu" in out
    assert not [line for line in out.splitlines() if line.startswith("deit_tiny_patch16_224")]


def test_inference_benchmark_names_the_instruction_set_caps_it_runs_under(monkeypatch):
    inference = load_script("inference")
    for name in inference.ISA_CAPS:
        monkeypatch.delenv(name, raising=False)
    assert inference.isa_caps() == ""
    monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", "AVX2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert inference.isa_caps() == "ONEDNN_MAX_CPU_ISA=AVX2, FBGEMM_ENABLE_INSTRUCTIONS=AVX2"


def test_inference_benchmark_warms_the_compiler_up_before_any_row(capsys, monkeypatch):
    """torch's layers are compiled once before the first row, so neither model's ``ready`` time pays the
    compiler's one-time start-up (ours would: it compiles first in every row)."""
    pytest.importorskip("timm")
    inference = load_script("inference")
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: compiled.append(model) or model)
    monkeypatch.setattr(inference, "compiler_available", lambda device: True)
    args = ["--variants", "deit_tiny_patch16_224", "--batch-sizes", "1", "--modes", "fast-fp32"]
    inference.main(args + ["--repeats", "1", "--sample-seconds", "0", "--no-agreement"])
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("deit_tiny_patch16_224")]
    layers = {type(m) for m in compiled[0].modules()}
    assert {torch.nn.Linear, torch.nn.LayerNorm, torch.nn.GELU, torch.nn.Dropout} <= layers
    assert len(compiled) == 3  # then ours and timm's model


def test_inference_benchmark_alternates_which_side_runs_first():
    inference = load_script("inference")
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("ours", "timm")}
    samples = inference.timed_alternately(fns, repeats=3, device=torch.device("cpu"), target_s=0, budget_s=0)
    assert {name: len(s) for name, s in samples.items()} == {"ours": 3, "timm": 3}
    # one sample per side and round, the order reversed every round; the calibrating calls are round 0
    assert calls == ["ours", "timm", "timm", "ours", "ours", "timm"]
    calls.clear()
    inference.timed_alternately(fns, repeats=3, device=torch.device("meta"), target_s=0, budget_s=0)
    assert calls == ["ours", "timm", "ours", "timm", "timm", "ours", "ours", "timm"]  # a GPU calibrates apart


def test_inference_benchmark_caps_the_slow_rows_at_three_rounds():
    """Rows whose rounds take long (deit_base at batch 32 on a 2-vCPU machine) are steady: three rounds, not
    ``repeats``, once ``repeats`` would pass the row's cap; quick rows still get up to five times more."""
    inference = load_script("inference")

    def sleeper(seconds: float):
        return lambda: time.sleep(seconds)

    slow = inference.timed_alternately(
        {"a": sleeper(0.05)}, repeats=9, device=torch.device("cpu"), target_s=0, budget_s=0, row_cap_s=0.2
    )
    quick = inference.timed_alternately(
        {"a": sleeper(0.001)}, repeats=2, device=torch.device("cpu"), target_s=0, budget_s=0.02, row_cap_s=60
    )
    assert len(slow["a"]) == 3 and len(quick["a"]) >= 5


def test_inference_benchmark_row_reports_the_spread_of_its_rounds(monkeypatch):
    """A row's speedup is the median of the per-round ratios, and its range their lowest and highest."""
    pytest.importorskip("timm")
    inference = load_script("inference")
    samples = {"ours": [1.0, 2.0, 1.0, 1.0, 4.0], "timm": [1.5, 2.0, 1.2, 1.3, 4.4]}
    monkeypatch.setattr(inference, "timed_alternately", lambda *args, **kwargs: samples)
    ours, theirs, _ = inference.build_pair("deit_tiny_patch16_224")
    row = inference.run_row("exact", ours, theirs, 1, 5, torch.device("cpu"))
    assert row["speedup"] == pytest.approx(1.2) and row["spread"] == pytest.approx((1.0, 1.5))
    assert row["ours_s"] == 1.0 and row["timm_s"] == 1.5  # medians of each side's own samples


def test_inference_benchmark_skips_the_bf16_modes_without_native_bf16(capsys, monkeypatch):
    pytest.importorskip("timm")
    inference = load_script("inference")
    monkeypatch.setattr(inference, "pick_dtype", lambda device, model=None: torch.qint8)  # as on Zen 3
    args = ["--variants", "deit_tiny_patch16_224", "--batch-sizes", "1", "--modes", "bf16", "fast-bf16"]
    inference.main(args + ["--repeats", "1", "--sample-seconds", "0", "--no-agreement"])
    out = capsys.readouterr().out
    assert "# skipped: bf16 and fast-bf16 rows: no native bf16 on this CPU" in out
    assert not [line for line in out.splitlines() if line.startswith("deit_tiny_patch16_224")]


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
    picked = inference.dtype_name(inference.pick_dtype(torch.device("cpu"), dr.create_model(args[1])))
    assert row.split()[1:3] == ["fast", picked]
    assert "# CPU features: AVX2 " in out and "top-1 agreement with fp32" in out
    for dtype in ("qint8", "bfloat16"):  # both CPU trades are reported, whichever this CPU picks
        assert f"#   {dtype} " in out


def test_inference_benchmark_counts_the_fast_modes_executed_flops():
    """The fast copy skips the last block's patch-token work: its %mm must count what it runs, not more."""
    inference = load_script("inference")
    model = dr.create_model("deit_tiny_patch16_224")
    assert 0.92 < inference.executed_fraction(model) < 0.94  # about 1/12 of the blocks' FLOPs, less k and v
    assert all(type(b) is Block for b in model.blocks)  # measured on copies


@pytest.fixture(scope="module")
def digits_deit():
    """The agreement benchmark's quick setting, trained once for the tests below."""
    pytest.importorskip("sklearn", reason="scikit-learn (the test extra) ships the digits dataset")
    agreement = load_script("agreement")
    model, info = agreement.train_digits_deit(**agreement.QUICK, seed=0)
    return agreement, model, info


def test_digits_images_split_is_fixed_stratified_and_normalised():
    pytest.importorskip("sklearn", reason="scikit-learn (the test extra) ships the digits dataset")
    agreement = load_script("agreement")
    x_train, y_train, x_test, y_test = agreement.digits_images(size=16, seed=0)
    assert (
        x_train.shape[1:] == (3, 16, 16) and x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    )
    assert len(x_train) + len(x_test) == 1797 and abs(len(x_test) / 1797 - 0.25) < 0.01
    assert torch.bincount(y_test, minlength=10).min() >= 40  # stratified: every digit is in the test set
    assert torch.equal(agreement.digits_images(size=16, seed=0)[3], y_test)  # the same split each call
    assert not torch.equal(agreement.digits_images(size=16, seed=1)[3], y_test)
    # A blank pixel (0) becomes ImageNet's normalised black in each channel.
    black = torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225])
    assert torch.allclose(x_train[:, :, 0, 0].min(0).values, black, atol=1e-5)


def test_digits_deit_quick_setting_learns(digits_deit):
    agreement, model, info = digits_deit
    assert type(model) is dr.DeiT and not model.training
    assert info["epochs"] == agreement.QUICK["epochs"]
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert info["test_accuracy"] > 0.5  # chance is 0.1


def test_agreement_of_a_model_with_itself_and_with_a_damaged_copy(digits_deit):
    import copy

    agreement, model, info = digits_deit
    _, _, x_test, y_test = agreement.digits_images(size=agreement.QUICK["size"], seed=0)
    same = agreement.agreement(model, model, x_test, y_test, batch_size=100)
    assert same["n"] == len(y_test)
    assert same["top1_agreement"] == 1.0 and same["max_abs_logit_diff"] == 0.0
    assert same["accuracy"] == same["reference_accuracy"] == info["test_accuracy"]

    damaged = copy.deepcopy(model)
    with torch.no_grad():
        weight = damaged.blocks[0].mlp.fc1.weight
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * weight.std() * 3)
    result = agreement.agreement(model, damaged, x_test, y_test, batch_size=100)
    assert result["reference_accuracy"] == info["test_accuracy"]
    assert result["top1_agreement"] < 1.0 and result["max_abs_logit_diff"] > 0.0
    with torch.inference_mode():
        logits = torch.cat([damaged(xb) for xb in x_test.split(100)])
        reference = torch.cat([model(xb) for xb in x_test.split(100)])
    assert result["accuracy"] == int((logits.argmax(-1) == y_test).sum()) / len(y_test)
    assert result["top1_agreement"] == int((logits.argmax(-1) == reference.argmax(-1)).sum()) / len(y_test)
    assert result["accuracy"] != result["reference_accuracy"]  # the damage shows in the bookkeeping
    # The candidate is cast to float32 before comparing: a bf16 copy still gets judged against fp32.
    half = agreement.agreement(model, lambda x: model(x).bfloat16(), x_test, y_test)
    assert 0.0 < half["max_abs_logit_diff"] < 0.1 and half["top1_agreement"] > 0.95


def test_agreement_rejects_mismatched_inputs():
    agreement = load_script("agreement")
    with pytest.raises(ValueError, match="equal length"):
        agreement.agreement(torch.nn.Identity(), torch.nn.Identity(), torch.zeros(3, 10), torch.zeros(2))
