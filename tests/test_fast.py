"""The fast inference mode: close to fp32, falls back cleanly, leaves the default model exact.

No timings here (they live in benchmarks/inference.py). Compiling on 2 CPU cores is slow, so only one test
compiles, on a two-block model.
"""

import copy
import re
import warnings

import pytest
import torch
from torch import nn

import deit_registry as dr
from deit_registry import fast
from deit_registry.architecture import DeiT

N = 16


def small_deit(distilled: bool = True) -> DeiT:
    torch.manual_seed(0)
    return DeiT(img_size=64, embed_dim=96, depth=2, num_heads=3, num_classes=10, distilled=distilled).eval()


def images(n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return nn.functional.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=64, mode="bicubic")


class Probe(nn.Module):
    """The model with a nearest-prototype classifier: every input of ``images()`` is its own, clear class.

    The model's own classifier is removed, so its ``forward`` (the path the fast mode optimises) returns the
    pre-logit feature."""

    def __init__(self, model: DeiT, x: torch.Tensor) -> None:
        super().__init__()
        with torch.no_grad():
            f = model.forward_head(model.forward_features(x), pre_logits=True)
            self.classifier = nn.Linear(f.shape[1], f.shape[0])
            self.classifier.weight.copy_(nn.functional.normalize(f - f.mean(0), dim=1))
            self.classifier.bias.copy_(-self.classifier.weight @ f.mean(0))
        self.model = copy.deepcopy(model)
        self.model.reset_classifier(0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model(x)
        return features, self.classifier(features)


def assert_close_to_fp32(probe: Probe, fast_probe: nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode():
        ref_features, ref_logits = probe(x)
    features, logits = fast_probe(x)
    assert features.dtype == logits.dtype == torch.float32  # cast back to the input's dtype
    assert (ref_logits.argmax(1) == torch.arange(len(x))).all()  # the check below is meaningful
    cosine = nn.functional.cosine_similarity(features, ref_features, dim=1)
    assert cosine.min() >= 0.999
    assert torch.equal(logits.argmax(1), ref_logits.argmax(1))
    assert not torch.equal(features, ref_features)  # it really ran in reduced precision


def test_public_name_is_lazy_export():
    assert dr.optimize_for_inference is fast.optimize_for_inference


def test_original_model_untouched_and_default_stays_exact():
    model = small_deit().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast_model = fast.optimize_for_inference(model, dtype=torch.bfloat16, compile=False)
    assert model.training and all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert fast_model.model is not model and next(fast_model.model.parameters()).dtype == torch.bfloat16
    assert not fast_model.model.training


def test_bf16_eager_close_to_fp32():
    model = small_deit()
    x = images()
    probe = Probe(model, x).eval()
    fast_probe = fast.optimize_for_inference(probe, dtype=torch.bfloat16, compile=False)
    assert fast_probe.dtype == torch.bfloat16 and not fast_probe.compiled
    assert_close_to_fp32(probe, fast_probe, x)


def test_default_call_compiles_and_stays_close_to_fp32():
    model = small_deit()
    x = images()
    probe = Probe(model, x).eval()
    fast_probe = fast.optimize_for_inference(probe)  # the documented call: picks dtype and compiles
    # CI's CPU has a C++ compiler and native bf16 (AVX512-BF16), so the default is the full fast path.
    assert fast_probe.compiled and fast_probe.dtype == torch.bfloat16
    from torch._inductor.utils import run_and_get_code

    # The first call compiles: keep the generated code to check what it calls.
    _, sources = run_and_get_code(assert_close_to_fp32, probe, fast_probe, x)
    assert fast_probe.compiled  # no silent fallback happened
    code = "\n".join(sources)
    # The C++ wrapper (CPU) generated the calls, and weight freezing took effect: the linears run as
    # pre-packed oneDNN kernels with bias fused, not addmm + bias copies.
    assert 'extern "C"' in code
    assert "_linear_pointwise" in code and not re.search(r"addmm\w*\(", code)
    assert '"gelu"' in code  # GELU is the fc1 kernel's post-op (also when the eager model runs it in place)
    # bf16 on CPU: attention runs as two matmuls and a softmax (faster here than the fused CPU kernel).
    assert "scaled_dot_product" not in code and re.search(r"bmm\w*\(", code)


@pytest.mark.parametrize(
    "device, dtype, fused",
    [("cpu", torch.bfloat16, False), ("cpu", torch.float16, False), ("cpu", torch.float32, True)]
    + [("cuda", dt, True) for dt in (torch.bfloat16, torch.float16, torch.float32)],
)
def test_attention_implementation_follows_device_and_dtype(device, dtype, fused):
    model = small_deit()
    fast._choose_attention(model, torch.device(device), dtype)
    assert all(block.attn.fused_attn is fused for block in model.blocks)


def test_fast_mode_leaves_the_models_attention_switch_alone():
    model = small_deit()
    fast_model = fast.optimize_for_inference(model, dtype=torch.bfloat16, compile=False)
    assert all(b.attn.fused_attn for b in model.blocks)
    assert not any(b.attn.fused_attn for b in fast_model.model.blocks)


def test_fast_copy_runs_the_last_block_for_the_head_tokens_only():
    """The fast copy sets ``head_tokens_only`` (the original keeps it off) and so executes fewer FLOPs, with the
    same fp32 outputs."""
    from torch.utils.flop_counter import FlopCounterMode

    model = small_deit()
    fast_model = fast.optimize_for_inference(model, dtype=torch.float32, compile=False)
    assert fast_model.model.head_tokens_only and not model.head_tokens_only
    x = images(2)
    flops = []
    for fn in (model, fast_model):
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            out = fn(x)
        flops.append(counter.get_total_flops())
        with torch.inference_mode():
            torch.testing.assert_close(out, model(x), rtol=0, atol=1e-5)
    assert flops[1] < 0.8 * flops[0]  # two blocks: the last one's patch-token work is most of half the model


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no code generator here")

    monkeypatch.setattr(fast, "_compile", lambda model, device: torch.compile(model, backend=broken_backend))
    model = small_deit()
    fast_model = fast.optimize_for_inference(model, dtype=torch.float32, compile=True)
    assert fast_model.compiled
    x = images(2)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        out = fast_model(x)
    assert not fast_model.compiled
    with torch.inference_mode():
        assert torch.allclose(out, model(x), atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # later calls run eagerly without warning again
        fast_model(x)


def test_recompile_limit_falls_back_loudly(monkeypatch):
    # Every fast model adds a graph to the one cache Dynamo keeps for DeiT.forward; past the limit the next
    # model must warn and run eagerly, not silently lose its compiled speed.
    torch._dynamo.reset()
    monkeypatch.setattr(fast, "_compile", lambda model, device: torch.compile(model, backend="eager"))
    monkeypatch.setattr(fast, "_RECOMPILE_LIMIT", 1)
    with torch._dynamo.config.patch(recompile_limit=1):
        x = images(2)
        first = fast.optimize_for_inference(small_deit(), dtype=torch.float32, compile=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            first(x)
        assert first.compiled
        model = small_deit()
        second = fast.optimize_for_inference(model, dtype=torch.float32, compile=True)
        with pytest.warns(RuntimeWarning, match="already holds 1 compiled DeiT graphs"):
            out = second(x)
        assert not second.compiled and first.compiled
        with torch.inference_mode():
            torch.testing.assert_close(out, model(x))
    torch._dynamo.reset()


def test_compile_settings_only_for_new_shapes(monkeypatch):
    entered = []
    real = fast._compile_settings
    monkeypatch.setattr(fast, "_compile", lambda model, device: torch.compile(model, backend="eager"))
    monkeypatch.setattr(fast, "_compile_settings", lambda device: entered.append(device) or real(device))
    fast_model = fast.optimize_for_inference(small_deit(), dtype=torch.float32, compile=True)
    fast_model(images(2))
    fast_model(images(2))  # a compiled shape: no settings (they cost about 0.3 ms a call)
    assert len(entered) == 1
    fast_model(images(3))  # a new shape may compile: settings again
    assert len(entered) == 2 and fast_model.compiled


def test_compile_settings_are_scoped():
    from torch._dynamo import config as dynamo_config
    from torch._inductor import config as inductor_config

    before = (inductor_config.freezing, inductor_config.cpp_wrapper, dynamo_config.recompile_limit)
    with fast._compile_settings(torch.device("cpu")):
        assert inductor_config.freezing and inductor_config.cpp_wrapper
        assert (
            dynamo_config.recompile_limit >= fast._RECOMPILE_LIMIT
            and dynamo_config.fail_on_recompile_limit_hit
        )
    assert (inductor_config.freezing, inductor_config.cpp_wrapper, dynamo_config.recompile_limit) == before


def test_no_compiler_means_eager_with_warning(monkeypatch):
    monkeypatch.setattr(fast, "compiler_available", lambda device: False)
    with pytest.warns(RuntimeWarning, match="no torch.compile backend"):
        fast_model = fast.optimize_for_inference(small_deit(), dtype=torch.float32)
    assert not fast_model.compiled


def test_compiler_detection_needs_a_cxx(monkeypatch):
    assert not fast.compiler_available(torch.device("meta"))
    monkeypatch.setattr(fast.shutil, "which", lambda name: None)
    assert not fast.compiler_available(torch.device("cpu"))


def test_no_bf16_support_falls_back_to_fp32(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert fast.pick_dtype(torch.device("cpu")) == torch.float32
    model = small_deit()
    fast_model = fast.optimize_for_inference(model, compile=False)
    assert fast_model.dtype == torch.float32
    x = images(2)
    with torch.inference_mode():
        # fp32 up to rounding (the last block's matmuls run on fewer rows: head_tokens_only)
        torch.testing.assert_close(fast_model(x), model(x), rtol=0, atol=1e-5)
    with pytest.warns(RuntimeWarning, match="no native bf16"):
        fast.optimize_for_inference(model, dtype=torch.bfloat16, compile=False)


def test_input_errors_still_reach_the_user():
    fast_model = fast.optimize_for_inference(small_deit(), compile=False)
    with pytest.raises(ValueError, match="built for 64x64"):
        fast_model(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("kwargs", [{"dtype": torch.int8}, {"compile": "yes"}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        fast.optimize_for_inference(small_deit(), **kwargs)
