"""The fast inference mode: close to fp32, falls back cleanly, leaves the default model exact.

No timings here (they live in benchmarks/inference.py). Compiling on 2 CPU cores is slow, so only one test
compiles, on a two-block model.
"""

import copy
import importlib
import re
import sys
import warnings

import pytest
import torch
from torch import nn

import deit_registry as dr
from deit_registry import fast
from deit_registry.architecture import Attention, Block, DeiT
from deit_registry.layers import _forward_hook_tables

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


def assert_close_to_fp32(
    probe: Probe, fast_probe: nn.Module, x: torch.Tensor, min_cosine: float = 0.999
) -> None:
    with torch.inference_mode():
        ref_features, ref_logits = probe(x)
    features, logits = fast_probe(x)
    assert features.dtype == logits.dtype == torch.float32  # cast back to the input's dtype
    assert (ref_logits.argmax(1) == torch.arange(len(x))).all()  # the check below is meaningful
    cosine = nn.functional.cosine_similarity(features, ref_features, dim=1)
    assert cosine.min() >= min_cosine
    assert torch.equal(logits.argmax(1), ref_logits.argmax(1))
    if fast_probe.dtype != torch.float32:
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


NATIVE_BF16 = fast.pick_dtype(torch.device("cpu")) is torch.bfloat16  # the package's own probe


def inductor_cache_artifacts() -> int:
    """How many inductor graphs this process has saved to or loaded from inductor's on-disk cache (torch's
    public cache-artifact API)."""
    saved = torch.compiler.save_cache_artifacts()
    return 0 if saved is None else len(saved[1].inductor_artifacts)


@pytest.mark.slow  # compiles with inductor: about a minute on 2 CPU cores
@pytest.mark.parametrize("call", ["default-amx", "default-no-amx", "fp32"])
def test_compiled_calls_stay_close_to_fp32(call, monkeypatch):
    """The documented call compiles where it picks a float dtype (bf16 on CPUs with native bf16; int8 runs
    eagerly), and ``dtype=torch.float32`` always compiles: bf16 into pre-packed oneDNN linears where the CPU
    has AMX, everything else into a plain graph that inductor's on-disk cache keeps for the next process
    (frozen, pre-packed graphs it cannot). Both bf16 plans run on any CPU with native bf16."""
    if not fast.compiler_available(torch.device("cpu")):
        pytest.skip("needs a C++ compiler for torch.compile's CPU backend")
    if call != "fp32" and not NATIVE_BF16:
        pytest.skip(
            "this CPU has no native bf16: the default call runs int8 eagerly (tested without compiling)"
        )
    monkeypatch.setattr(fast, "_cpu_has_amx", lambda: call == "default-amx")
    expected_dtype = torch.float32 if call == "fp32" else torch.bfloat16
    model = small_deit()
    x = images()
    probe = Probe(model, x).eval()
    fast_probe = fast.optimize_for_inference(probe, **({"dtype": torch.float32} if call == "fp32" else {}))
    assert fast_probe.compiled and fast_probe.dtype == expected_dtype
    from torch._inductor.utils import run_and_get_code

    cached_before = inductor_cache_artifacts()
    # The first call compiles: keep the generated code to check what it calls.
    _, sources = run_and_get_code(assert_close_to_fp32, probe, fast_probe, x)
    assert fast_probe.compiled  # no silent fallback happened
    code = "\n".join(sources)
    assert "def call(" in code and "inductor_entry" not in code  # a Python wrapper, no C++ one
    if call == "fp32":
        # Compiled plainly: MKL's addmm with the weights as graph inputs (not frozen), and the graph went to
        # inductor's cache (saved or loaded: either way recorded) for the next process.
        assert "addmm" in code and not re.search(r"_linear_pointwise|_mkl_linear", code)
        assert inductor_cache_artifacts() > cached_before
    elif call == "default-no-amx":
        # Plain and cached as well; the biases are added after plain matmuls (8 linears in the blocks and the
        # patch embedding; inductor folds the bias of the probe's classifier, on 2-D features, back into one
        # addmm), and attention is two batched matmuls and a softmax instead of the fused kernel, on keys and
        # values the bias kernel made contiguous (aten's bmm would copy them: a clone in the profile).
        assert len(re.findall(r"extern_kernels\.mm\(", code)) == 9
        assert len(re.findall(r"extern_kernels\.addmm\(", code)) <= 1
        assert not re.search(r"_linear_pointwise|_mkl_linear|scaled_dot_product|convolution\(", code)
        assert len(re.findall(r"extern_kernels\.bmm\(", code)) == 4
        with torch.profiler.profile() as profile:
            fast_probe(x)
        assert not [e.key for e in profile.key_averages() if e.key in ("aten::clone", "aten::convolution")]
        assert inductor_cache_artifacts() > cached_before
    else:
        # Frozen: oneDNN kernels with pre-packed weights and bias and GELU fused, no addmm call at all (the
        # generated comments still name the aten ops they replace); attention stays the fused kernel.
        assert "_linear_pointwise" in code and re.search(r"""_linear_pointwise\S*\(.*'gelu'""", code)
        assert not re.search(r"(extern_kernels\.addmm|aten\.addmm\.default)\(", code)
        assert "scaled_dot_product" in code


@pytest.mark.parametrize("fused", [True, False])
def test_fast_copy_keeps_the_models_attention_switch(fused, monkeypatch):
    monkeypatch.setattr(fast, "_cpu_has_amx", lambda: True)
    model = small_deit()
    for block in model.blocks:
        block.attn.fused_attn = fused
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # emulated bf16 on CPUs without it
        fast_model = fast.optimize_for_inference(model, dtype=torch.bfloat16, compile=False)
    assert all(b.attn.fused_attn is fused for b in fast_model.model.blocks)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cpus_without_amx(dtype, monkeypatch):
    """There the copy's attention is two matmuls and a softmax (torch's fused CPU kernel is slow in bf16
    without AMX), and compiled copies add each bias after its matmul; fp32 and the original are untouched."""
    monkeypatch.setattr(fast, "_cpu_has_amx", lambda: False)
    monkeypatch.setattr(fast, "_compile", lambda model, device: torch.compile(model, backend="eager"))
    model = small_deit()
    x = images(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # emulated bf16 on CPUs without it
        eager, compiled, fp32 = (
            fast.optimize_for_inference(model, dtype=d, compile=c)
            for d, c in ((dtype, False), (dtype, True), (torch.float32, True))
        )
    linears = [type(m) for m in compiled.model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 10 and set(linears) == {fast._LinearThenBias}  # 4 per block, 2 heads
    assert type(compiled.model.patch_embed.proj) is fast._PatchesThenLinear
    assert {type(b.attn) for b in compiled.model.blocks} == {fast._AttentionOnContiguousHeads}
    swapped = (fast._LinearThenBias, fast._PatchesThenLinear, fast._AttentionOnContiguousHeads)
    assert not any(isinstance(m, swapped) for f in (eager, fp32, model) for m in f.modules())
    for fast_model, fused in ((eager, False), (compiled, False), (fp32, True)):
        assert [b.attn.fused_attn for b in fast_model.model.blocks] == [fused, fused]
    assert all(b.attn.fused_attn for b in model.blocks)
    assert compiled.model.state_dict().keys() == model.state_dict().keys()
    with torch.inference_mode():
        reference = model(x)
        for fast_model in (eager, compiled):
            cosine = nn.functional.cosine_similarity(fast_model(x), reference, dim=1)
            assert cosine.min() > 0.999
        # The same arithmetic as nn.Linear, up to rounding
        linear = small_deit().blocks[0].mlp.fc1
        split = fast._LinearThenBias(linear.in_features, linear.out_features, device="meta")
        split.weight, split.bias = linear.weight, linear.bias
        h = torch.randn(2, 5, linear.in_features)
        torch.testing.assert_close(split(h), linear(h), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_patch_embedding_as_a_matmul_computes_the_convolution(bias):
    """:class:`fast._PatchesThenLinear` gives the convolution's output, up to rounding, for any input size
    (rows and columns past the last whole patch dropped, as the convolution does) and unbatched inputs;
    only convolutions whose stride is their kernel become one."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, kernel_size=(4, 5), stride=(4, 5), bias=bias)
    twin = fast._bias_after_matmul(conv)
    assert type(twin) is fast._PatchesThenLinear and twin.weight is conv.weight and twin.bias is conv.bias
    with torch.inference_mode():
        for shape in ((2, 3, 16, 20), (2, 3, 18, 23), (3, 12, 10)):
            x = torch.randn(shape)
            torch.testing.assert_close(twin(x), conv(x), rtol=0, atol=1e-5)
    for other in (
        nn.Conv2d(3, 8, 3),
        nn.Conv2d(3, 8, 4, stride=4, padding=1),
        nn.Conv2d(4, 8, 4, stride=4, groups=2),
        nn.Conv2d(3, 8, 4, stride=4, dilation=2),
    ):
        assert fast._bias_after_matmul(other) is None


def test_amx_probe_reads_the_cpu_flags(tmp_path):
    flags = "flags\t\t: fpu avx2 avx512f avx512_bf16 {}\nbugs\t\t: none\n"
    for extra, expected in (("amx_bf16 amx_tile amx_int8", True), ("avx512_vnni", False)):
        cpuinfo = tmp_path / f"cpuinfo-{expected}"
        cpuinfo.write_text("processor\t: 0\n" + flags.format(extra))
        assert fast._cpu_has_amx(str(cpuinfo)) is expected
    assert fast._cpu_has_amx(str(tmp_path / "missing")) is False  # no /proc/cpuinfo: not Linux
    assert isinstance(fast._cpu_has_amx(), bool)


@pytest.mark.parametrize(
    "vendor, family, flags, halves",
    [
        ("AuthenticAMD", 25, "avx2 avx512f avx512_bf16", True),  # Zen 4
        ("AuthenticAMD", 25, "avx2", False),  # Zen 3: the same family, no AVX-512
        ("AuthenticAMD", 26, "avx2 avx512f avx512_bf16", False),  # Zen 5: full-width AVX-512
        ("GenuineIntel", 6, "avx2 avx512f avx512_bf16", False),  # Cooper Lake
    ],
)
def test_half_width_avx512_probe_reads_the_cpu_make(tmp_path, vendor, family, flags, halves):
    cpuinfo = tmp_path / "cpuinfo"
    fields = (
        f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: 17\nflags\t\t: {flags}\n"
    )
    cpuinfo.write_text(fields + "\nprocessor\t: 1\nvendor_id\t: other\n")  # the first processor's fields
    assert fast._cpu_halves_avx512(str(cpuinfo)) is halves
    assert fast._cpu_halves_avx512(str(tmp_path / "missing")) is False


def explicit_attention_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs with attention as explicit matmuls: FlopCounterMode counts CPU scaled_dot_product_attention as 0
    in some torch releases."""
    from torch.utils.flop_counter import FlopCounterMode

    for m in model.modules():
        if isinstance(getattr(m, "fused_attn", None), bool):
            m.fused_attn = False
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("distilled", [False, True], ids=["plain", "distilled"])
def test_fast_copy_runs_the_last_block_for_the_head_tokens_only(distilled):
    """The last block computes attention, projection and MLP for the prefix tokens only as queries; keys and
    values for all tokens. Everything else is unchanged, and so are the outputs (fp32, up to rounding)."""
    model = small_deit(distilled)
    fast_model = fast.optimize_for_inference(model, dtype=torch.float32, compile=False)
    assert all(type(b) is fast.InferenceBlock for b in fast_model.model.blocks)
    assert [b.num_queries for b in fast_model.model.blocks] == [None, model.num_prefix_tokens]
    assert all(type(b) is Block for b in model.blocks)  # the original keeps its own blocks
    assert fast_model.model.state_dict().keys() == model.state_dict().keys()
    x = images(2)
    with torch.inference_mode():
        torch.testing.assert_close(fast_model(x), model(x), rtol=0, atol=1e-5)
        assert fast_model.model.forward_features(x).shape[1] == model.num_prefix_tokens
    full = explicit_attention_flops(copy.deepcopy(model), x)
    skipped = full - explicit_attention_flops(fast_model, x)
    d, p, hidden = model.embed_dim, model.num_prefix_tokens, model.blocks[0].mlp.fc1.out_features
    n = model.patch_embed.num_patches + p
    macs = (n - p) * (d * d + 2 * d * hidden) + (n - p) * n * d * 2  # proj, MLP; QK^T, AV
    assert skipped == 2 * len(x) * macs


@pytest.mark.parametrize(
    ("dtype", "amx", "compile", "traced_once"),
    [
        (torch.float32, False, True, True),
        (torch.float32, True, True, True),  # fp32 is never frozen
        (torch.bfloat16, False, True, True),
        (torch.bfloat16, True, True, False),  # frozen: the weights are constants inside each block's code
        (torch.float32, False, False, False),  # eager
        (torch.qint8, False, None, False),  # int8 runs eagerly
    ],
)
def test_compiled_cpu_copies_trace_their_blocks_once(dtype, amx, compile, traced_once, monkeypatch):
    """Which copies make their blocks nested compile regions: compiled CPU graphs, weights as inputs."""
    monkeypatch.setattr(fast, "_cpu_has_amx", lambda: amx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # emulated bf16 on CPUs without it
        fast_model = fast.optimize_for_inference(small_deit(), dtype=dtype, compile=compile)
    expected = fast._InferenceBlockTracedOnce if traced_once else fast.InferenceBlock
    assert all(type(b) is expected for b in fast_model.model.blocks)
    assert [b.num_queries for b in fast_model.model.blocks] == [None, 2]


def test_blocks_traced_once_share_one_region_and_keep_the_short_last_block(monkeypatch):
    """Dynamo traces the first block as a nested compile region and stamps it out for the two like it; the
    last block, which computes the prefix tokens only, is traced apart. Outputs as the original model's."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(fast, "_compile", lambda model, cuda_graphs: torch.compile(model, backend=backend))
    torch.manual_seed(0)
    model = DeiT(img_size=64, embed_dim=96, depth=4, num_heads=3, num_classes=10, distilled=True).eval()
    fast_model = fast.optimize_for_inference(model, dtype=torch.float32, compile=True)
    x = images(2)
    with torch.inference_mode():
        torch.testing.assert_close(fast_model(x), model(x), rtol=0, atol=1e-5)
    (graph,) = graphs
    regions = [n for n in graph.graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
    assert len(regions) >= 3 and len({n.args[1] for n in regions[:3]}) == 1  # one trace, three blocks
    # The final norm (the graph's last LayerNorm) gets the last block's output: the two prefix tokens only.
    final_norm = [n for n in graph.graph.nodes if n.target is nn.functional.layer_norm][-1]
    assert final_norm.meta["example_value"].shape == (2, 2, 96)
    torch.compiler.reset()


@pytest.mark.parametrize("kwargs", [dict(global_pool="avg"), dict(head="mim")], ids=["avg", "mim"])
def test_heads_that_read_patch_tokens_keep_every_token(kwargs):
    """Average pooling and spatial heads read the patch tokens: the fast copy computes all of them."""
    torch.manual_seed(0)
    model = DeiT(img_size=64, embed_dim=96, depth=2, num_heads=3, num_classes=10, **kwargs).eval()
    fast_model = fast.optimize_for_inference(model, dtype=torch.float32, compile=False)
    assert [b.num_queries for b in fast_model.model.blocks] == [None, None]
    x = images(2)
    with torch.inference_mode():
        torch.testing.assert_close(fast_model(x), model(x), rtol=0, atol=1e-5)
    assert explicit_attention_flops(fast_model, x) == explicit_attention_flops(copy.deepcopy(model), x)


def _ops_called(fn) -> set[str]:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.qint8])
def test_gelu_runs_in_place_in_the_fast_copy_unless_a_hook_can_see_it(dtype):
    """The fast copy's eager blocks, int8 ones included, overwrite fc1's output with GELU (the model's own
    ``Mlp`` rule, tests/test_core.py); a forward hook on the copy's fc1 keeps that block's output as it was."""
    fast_model = fast.optimize_for_inference(small_deit(), dtype=dtype, compile=False)
    x = images(2)
    assert _ops_called(lambda: fast_model(x)) >= {"aten::gelu_"}
    saved = []
    handle = fast_model.model.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, out: saved.append(out))
    ops = _ops_called(lambda: fast_model(x))
    handle.remove()
    assert {"aten::gelu_", "aten::gelu"} <= ops  # block 0 out of place, block 1 in place
    assert saved[0].min() < -0.5  # fc1's output as it was, not GELU'd (GELU >= -0.17)


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
        x3 = images(3)  # a new shape needs a graph of its own (the same shape would reuse the first's)
        with pytest.warns(RuntimeWarning, match="already holds 1 compiled DeiT graphs"):
            out = second(x3)
        assert not second.compiled and first.compiled
        with torch.inference_mode():
            torch.testing.assert_close(out, model(x3))
    torch._dynamo.reset()


def test_unfrozen_fast_models_share_their_graph(monkeypatch):
    # fp32 on CPU compiles without freezing: the weights are graph inputs, so a second fast model of the same
    # architecture runs the first one's graph instead of compiling again; frozen dtypes compile per model.
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(fast, "_compile", lambda model, device: torch.compile(model, backend=backend))
    x = images(2)
    for dtype, amx, expected in (
        (torch.float32, True, 1),
        (torch.bfloat16, True, 2),
        (torch.bfloat16, False, 1),
    ):
        monkeypatch.setattr(fast, "_cpu_has_amx", lambda amx=amx: amx)  # frozen (pre-packed) with AMX only
        graphs.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # emulated bf16 on CPUs without it
            models = [small_deit(), small_deit()]
            with torch.no_grad():
                models[1].head.weight.neg_()  # different weights, the same architecture
            fast_models = [fast.optimize_for_inference(m, dtype=dtype, compile=True) for m in models]
        for model, fast_model in zip(models, fast_models):  # each runs with its own weights
            with torch.inference_mode():
                cosine = nn.functional.cosine_similarity(fast_model(x), model(x), dim=1)
            assert cosine.min() > 0.99
        assert len(graphs) == expected and all(f.compiled for f in fast_models)
    torch._dynamo.reset()


def test_compile_settings_only_for_new_shapes(monkeypatch):
    entered = []
    real = fast._compile_settings
    monkeypatch.setattr(fast, "_compile", lambda model, device: torch.compile(model, backend="eager"))
    monkeypatch.setattr(
        fast, "_compile_settings", lambda device, dtype: entered.append(device) or real(device, dtype)
    )
    fast_model = fast.optimize_for_inference(small_deit(), dtype=torch.float32, compile=True)
    fast_model(images(2))
    fast_model(images(2))  # a compiled shape: no settings (they cost about 0.3 ms a call)
    assert len(entered) == 1
    fast_model(images(3))  # a new shape may compile: settings again
    assert len(entered) == 2 and fast_model.compiled


def test_compile_settings_are_scoped(monkeypatch):
    from torch._dynamo import config as dynamo_config
    from torch._inductor import config as inductor_config

    def state():
        return inductor_config.freezing, inductor_config.cpp_wrapper, dynamo_config.recompile_limit

    before = state()
    # (device, dtype, AMX) -> freezing: only half precision on a CPU with AMX freezes; the rest compiles
    # plainly, so inductor can cache its graph; the C++ wrapper stays as the user has it (off by default)
    expected = {
        ("cpu", torch.bfloat16, True): True,
        ("cpu", torch.float16, True): True,
        ("cpu", torch.bfloat16, False): False,
        ("cpu", torch.float32, True): False,
        ("cuda", torch.bfloat16, True): False,
        ("cuda", torch.float32, False): False,
    }
    for (device, dtype, amx), freezing in expected.items():
        monkeypatch.setattr(fast, "_cpu_has_amx", lambda amx=amx: amx)
        with fast._compile_settings(torch.device(device), dtype):
            assert (inductor_config.freezing, inductor_config.cpp_wrapper) == (freezing, before[1])
            assert (
                dynamo_config.recompile_limit >= fast._RECOMPILE_LIMIT
                and dynamo_config.fail_on_recompile_limit_hit
            )
        assert state() == before


def test_no_compiler_means_eager_with_warning(monkeypatch):
    monkeypatch.setattr(fast, "compiler_available", lambda device: False)
    with pytest.warns(RuntimeWarning, match="no torch.compile backend"):
        fast_model = fast.optimize_for_inference(small_deit(), dtype=torch.float32)
    assert not fast_model.compiled


def test_compiler_detection_needs_a_cxx(monkeypatch):
    assert not fast.compiler_available(torch.device("meta"))
    monkeypatch.setattr(fast.shutil, "which", lambda name: None)
    assert not fast.compiler_available(torch.device("cpu"))


def test_without_native_bf16_the_default_is_int8_or_fp32(monkeypatch):
    """A CPU without native bf16 runs dynamic int8 linears where torch has x86 int8 kernels, else fp32."""
    monkeypatch.setattr(fast, "_cpu_has_native_bf16", lambda: False)  # the package's own probe
    monkeypatch.setattr(torch.backends.quantized, "engine", "x86")
    assert fast.pick_dtype(torch.device("cpu")) == torch.qint8
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the documented call: no compile, nothing to warn about
        default = fast.optimize_for_inference(small_deit())
    assert default.dtype == torch.qint8 and not default.compiled and quantized_linears(default)
    if "qnnpack" in torch.backends.quantized.supported_engines:
        monkeypatch.setattr(torch.backends.quantized, "engine", "qnnpack")  # Arm's engine: no int8 default
        assert fast.pick_dtype(torch.device("cpu")) == torch.float32
        model = small_deit()
        fast_model = fast.optimize_for_inference(model, compile=False)
        assert fast_model.dtype == torch.float32
        x = images(2)
        with torch.inference_mode():
            # fp32 up to rounding (the last block's matmuls run on fewer rows)
            torch.testing.assert_close(fast_model(x), model(x), rtol=0, atol=1e-5)
    with pytest.warns(RuntimeWarning, match="no native bf16"):
        fast.optimize_for_inference(small_deit(), dtype=torch.bfloat16, compile=False)


def test_cuda_dtype_choice(monkeypatch):
    """The CUDA branch of the dtype choice, without a GPU: bf16 where the GPU has it, else fp16."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert fast.pick_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert fast.pick_dtype(torch.device("cuda")) == torch.float16


def test_cuda_models_compile_with_cuda_graphs(monkeypatch):
    """The CUDA branch of the compile choice, without a GPU: a model on CUDA compiles with
    ``mode="reduce-overhead"`` unless the caller says ``cuda_graphs=False``; CPU models never do."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: calls.append(kwargs) or model)
    monkeypatch.setattr(fast, "compiler_available", lambda device: True)
    cpu_model = fast.optimize_for_inference(small_deit(), dtype=torch.float32)
    assert calls.pop() == {"dynamic": False, "mode": None} and not cpu_model.cuda_graphs
    with pytest.raises(ValueError, match="needs a model on a CUDA device"):
        fast.optimize_for_inference(small_deit(), dtype=torch.float32, cuda_graphs=True)
    monkeypatch.setattr(fast, "_model_device", lambda model: torch.device("cuda"))
    on_gpu = fast.optimize_for_inference(small_deit(), dtype=torch.float32)
    assert calls.pop() == {"dynamic": False, "mode": "reduce-overhead"}
    assert on_gpu.cuda_graphs and "cuda_graphs=True" in repr(on_gpu)
    plain = fast.optimize_for_inference(small_deit(), dtype=torch.float32, cuda_graphs=False)
    assert calls.pop() == {"dynamic": False, "mode": None} and not plain.cuda_graphs
    eager = fast.optimize_for_inference(small_deit(), dtype=torch.float32, compile=False)
    assert not calls and not eager.cuda_graphs
    with pytest.raises(ValueError, match="needs compile=True or None"):
        fast.optimize_for_inference(small_deit(), dtype=torch.float32, compile=False, cuda_graphs=True)


def test_cuda_graph_outputs_are_handed_out_as_copies():
    """A CUDA graph writes every call's outputs into the same memory, so the wrapper hands out copies, also
    where no cast would copy (input in the compute dtype, integer outputs). A stand-in for the compiled
    function returns its static buffers, on the CPU."""
    for dtype in (torch.float32, torch.bfloat16):
        static = (torch.zeros(2, 3, dtype=dtype), torch.zeros(2, dtype=torch.long))

        def replay(x, static=static):
            static[0].copy_(x.flatten(1)[:, :3])
            static[1].copy_(x.flatten(1)[:, 0].long())
            return static

        for cuda_graphs in (True, False):
            model = fast.FastInferenceModel(nn.Identity(), dtype, replay, cuda_graphs=cuda_graphs)
            first = model(torch.full((2, 3, 2, 2), 1.0, dtype=dtype))
            model(torch.full((2, 3, 2, 2), 2.0, dtype=dtype))
            assert first[0].dtype == dtype and first[1].dtype == torch.long
            # without CUDA graphs the stand-in's buffers come back as they are: overwritten (the check bites)
            assert first[0].eq(1).all() == first[1].eq(1).all() == cuda_graphs


def quantized_linears(model: nn.Module) -> list[nn.Module]:
    # imported here: a torch that drops its deprecated int8 flow still collects this file (see the fallback)
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return [m for m in model.modules() if isinstance(m, DynamicLinear)]


@pytest.mark.parametrize("distilled", [False, True], ids=["plain", "distilled"])
def test_int8_linears_close_to_fp32(distilled):
    """dtype=torch.qint8: every linear layer runs dynamic int8, eagerly; the rest stays
    fp32, the original model is untouched, and no deprecation warning of torch's reaches the user."""
    model = small_deit(distilled)
    x = images()
    probe = Probe(model, x).eval()
    before = {k: v.clone() for k, v in probe.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast_probe = fast.optimize_for_inference(probe, dtype=torch.qint8)
    assert fast_probe.dtype == torch.qint8 and not fast_probe.compiled
    linears = [m for m in probe.modules() if isinstance(m, nn.Linear)]
    assert len(quantized_linears(fast_probe)) == len(linears) == 4 * 2 + 1  # blocks, the probe's classifier
    assert not any(isinstance(m, nn.Linear) for m in fast_probe.modules())
    assert all(torch.equal(before[k], v) for k, v in probe.state_dict().items())
    assert fast_probe.model.model.blocks[-1].num_queries == model.num_prefix_tokens
    assert_close_to_fp32(probe, fast_probe, x, min_cosine=0.998)  # int8 activations: coarser than bf16
    features, _ = fast_probe(x)
    with torch.inference_mode():
        assert not torch.equal(features, probe(x)[0])  # it really ran in int8


def int8_pair(model: nn.Module) -> tuple[fast.FastInferenceModel, fast.FastInferenceModel]:
    """The default int8 copy (traced) and the same copy run as modules (``compile=False``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fast.optimize_for_inference(model, dtype=torch.qint8), fast.optimize_for_inference(
            model, dtype=torch.qint8, compile=False
        )


def test_int8_deit_runs_a_trace_per_input_shape(monkeypatch):
    """An int8 DeiT's plain calls run a TorchScript trace of its copy, one per input shape, made on the first
    call: the same operators as the eager copy, so the same numbers bit for bit, and none of torch.jit's
    deprecation or tracer warnings reach the user."""
    traced = []
    monkeypatch.setattr(
        fast, "_trace", lambda model, x, trace=fast._trace: traced.append(len(x)) or trace(model, x)
    )
    model = small_deit()
    fast_model, eager = int8_pair(model)
    assert fast_model.traced and not fast_model.compiled and not eager.traced
    assert "traced=True" in repr(fast_model)
    x = images(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for n in (1, 5, 1, 5, 3):
            assert torch.equal(fast_model(x[:n]), eager(x[:n]))
        extra = fast_model(x[:2], None)  # an extra argument: the copy itself runs
    assert traced == [1, 5, 3]
    assert all(isinstance(t, torch.jit.ScriptModule) for t in fast_model._traces.values())
    with torch.inference_mode():
        assert torch.equal(extra, eager.model(x[:2], None))


def test_int8_copies_that_are_no_deit_or_compile_false_run_their_modules():
    probe = Probe(small_deit(), images()).eval()
    assert not fast.optimize_for_inference(probe, dtype=torch.qint8).traced  # its output could be anything
    assert not fast.optimize_for_inference(small_deit(), dtype=torch.qint8, compile=False).traced
    assert not fast.optimize_for_inference(small_deit(), dtype=torch.float32, compile=False).traced


def test_traced_calls_run_eagerly_while_a_forward_hook_is_registered():
    """A trace would call a hook only while tracing: while one is registered on the copy (before or after its
    first call) or globally, calls run the copy's modules, and the hook sees every call."""
    fast_model, eager = int8_pair(small_deit())
    x = images(2)
    seen = []
    hook = fast_model.model.blocks[0].register_forward_hook(lambda m, args, out: seen.append(len(out)))
    fast_model(x)
    assert seen == [2] and not fast_model._traces  # hooked from the start: nothing traced
    hook.remove()
    assert torch.equal(fast_model(x), eager(x)) and len(fast_model._traces) == 1
    for register in (
        lambda h: fast_model.model.norm.register_forward_pre_hook(lambda m, args: h(args[0])),
        lambda h: fast_model.model.blocks[-1].register_forward_hook(lambda m, args, out: h(out)),
        lambda h: nn.modules.module.register_module_forward_hook(lambda m, args, out: h(out)),
    ):
        seen.clear()
        hook = register(lambda t: seen.append(tuple(t.shape)))
        fast_model(x)
        fast_model(x)
        hook.remove()
        assert len(seen) >= 2  # each call (the global hook: once per module)
        seen.clear()
        assert torch.equal(fast_model(x), eager(x)) and not seen  # the trace again
    assert len(fast_model._traces) == 1


def test_copies_and_pickles_of_a_traced_model_trace_again_and_see_global_hooks(tmp_path):
    """A copy made after the first call must not keep a private copy of torch's global hook table (it would
    never see a hook registered later) nor the traces; torch.save of it works too."""
    fast_model, eager = int8_pair(small_deit())
    x = images(2)
    fast_model(x)
    clone = copy.deepcopy(fast_model)
    assert clone.traced and not clone._traces and torch.equal(clone(x), eager(x))
    seen = []
    hook = nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
    try:
        clone(x)
        torch.save(fast_model, tmp_path / "fast.pt")  # torch's global hook table (a lambda in it) stays out
    finally:
        hook.remove()
    assert "InferenceBlock" in seen and "Linear" in seen  # the modules ran, not the trace
    loaded = torch.load(tmp_path / "fast.pt", weights_only=False)  # our own file
    assert torch.equal(loaded(x), eager(x))


def test_an_integer_input_after_a_float_trace_is_the_models_error():
    fast_model, _ = int8_pair(small_deit())
    fast_model(images(1))
    with pytest.raises(ValueError, match="expects a float image tensor"):
        fast_model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.qint8])  # eager fp32, traced int8
def test_hooks_on_the_last_blocks_attention_run_and_see_every_token(dtype):
    """The last block computes its attention for the prefix tokens only, by calling the layer's parts: while a
    hook is on that attention layer, the layer runs as a whole, so the hook (and attention_maps) sees it."""
    from deit_registry.inspection import attention_maps

    model = small_deit()
    fast_model = fast.optimize_for_inference(
        model, dtype=dtype, compile=None if dtype is torch.qint8 else False
    )
    x = images(2)
    plain = fast_model(x)
    seen = []
    attn = fast_model.model.blocks[-1].attn
    hook = attn.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    try:
        hooked = fast_model(x)
    finally:
        hook.remove()
    assert seen == [(2, 16 + 2, 96)]
    torch.testing.assert_close(hooked, plain, atol=0.05 if dtype is torch.qint8 else 1e-5, rtol=0)
    with attention_maps(fast_model.model) as rec:
        fast_model(x)
        maps = rec.maps
    with attention_maps(model) as rec, torch.no_grad():
        model(x)
        want = rec.maps
    assert [m.shape for m in maps] == [m.shape for m in want] == [(2, 3, 18, 18)] * 2
    torch.testing.assert_close(maps[0], want[0], atol=0.02 if dtype is torch.qint8 else 1e-5, rtol=0)


@pytest.mark.parametrize("traced", [True, False], ids=["traced", "eager"])
def test_int8_refuses_batches_with_non_finite_images_and_names_them(traced):
    """One NaN or infinity would set a whole batch's int8 scale (and give its own image finite logits): the
    int8 copy raises a ValueError naming the images, also once a trace for the shape exists; finite inputs
    whose sum overflows pass, and the fp32 copy returns NaN for the bad image like the model."""
    model = small_deit()
    fast_model = fast.optimize_for_inference(model, dtype=torch.qint8, compile=None if traced else False)
    assert fast_model.traced is traced
    x = images(4)
    fast_model(x)  # a trace of this shape is made first
    bad = x.clone()
    bad[1, 0, 3, 5] = float("nan")
    bad[3, 2, 0, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"batch indices 1, 3 hold NaN or infinite.*one scale.*drop or fix"):
        fast_model(bad)
    with pytest.raises(ValueError, match=r"the image at batch index 0 holds"):
        fast_model(bad[3:].double())  # checked as the copy sees it, after the cast
    huge = torch.full((1, 3, 64, 64), 3e38)  # finite, but its sum is not
    assert fast_model(huge).shape == (1, 10)
    with torch.inference_mode():
        exact = model(bad)
    assert exact[[1, 3]].isnan().all() and not exact[[0, 2]].isnan().any()
    fp32 = fast.optimize_for_inference(model, dtype=torch.float32, compile=False)
    torch.testing.assert_close(fp32(bad), exact, equal_nan=True, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dtype": torch.qint8},
        {"dtype": torch.qint8, "compile": False},
        {"dtype": torch.float32, "compile": False},
    ],
    ids=["int8-traced", "int8-eager", "fp32-eager"],
)
def test_hooks_registered_before_optimizing_run_in_the_copy(kwargs):
    """The copy replaces blocks and linear layers; no public API carries a module's hooks (with their options)
    over, so a module with hooks of its own stays as it is: every kind of hook runs on every call, a hooked
    block sees every token, and while a hook is on the copy no trace runs."""
    model = small_deit()
    x = images(2)
    calls: list[tuple[str, tuple[int, ...]]] = []
    block, last, head, qkv = model.blocks[0], model.blocks[-1], model.head, model.blocks[1].attn.qkv
    block.register_forward_pre_hook(
        lambda m, args, kw: calls.append(("pre", args[0].shape)), with_kwargs=True
    )
    block.register_forward_hook(lambda m, args, out: calls.append(("block", out.shape)), always_call=True)
    last.register_forward_hook(lambda m, args, kw, out: calls.append(("last", out.shape)), with_kwargs=True)
    head.register_forward_hook(lambda m, args, out: calls.append(("head", out.shape)))
    qkv.register_forward_pre_hook(lambda m, args: calls.append(("qkv", args[0].shape)))
    with torch.inference_mode():
        want = model(x)
    expected = list(calls)
    assert len(expected) == 5
    fast_model = fast.optimize_for_inference(model, **kwargs)
    for _ in range(2):
        calls.clear()
        out = fast_model(x)
        assert sorted(calls) == sorted(expected)
    assert type(fast_model.model.blocks[0]) is type(fast_model.model.blocks[-1]) is Block
    assert type(fast_model.model.head) is type(fast_model.model.blocks[1].attn.qkv) is nn.Linear
    assert not fast_model._traces  # the hooks are seen: the modules ran
    if kwargs["dtype"] is torch.qint8:
        assert len(quantized_linears(fast_model)) == 4 * 2 + 2 - 2  # blocks, two heads: all but the hooked
        assert type(fast_model.model.blocks[1].mlp.fc1) is not nn.Linear
    torch.testing.assert_close(out, want, atol=0.05 if kwargs["dtype"] is torch.qint8 else 1e-5, rtol=0)
    # Compiled half precision on CPUs without AMX swaps linears and the patch embedding for twins: not hooked ones
    tuned = copy.deepcopy(fast_model.model)
    fast._tune_for_cpus_without_amx(tuned, compiled=True)
    assert type(tuned.head) is nn.Linear and type(tuned.blocks[0].mlp.fc1) is not nn.Linear


@pytest.mark.parametrize(
    "kwargs",
    [{"dtype": torch.qint8, "compile": False}, {"dtype": torch.float32, "compile": False}],
    ids=["int8-eager", "fp32-eager"],
)
def test_train_leaves_the_inference_only_copy_in_eval_mode(kwargs):
    """A parent's ``.train()`` reaches the wrapper: the copy stays in eval mode, so dropout and drop-path stay
    off and outputs stay the same."""
    torch.manual_seed(0)
    model = DeiT(
        img_size=64,
        embed_dim=96,
        depth=2,
        num_heads=3,
        num_classes=10,
        drop_rate=0.5,
        drop_path_rate=0.5,
        attn_drop_rate=0.5,
    ).eval()
    fast_model = fast.optimize_for_inference(model, **kwargs)
    x = images(2)
    before = fast_model(x)
    parent = nn.Sequential(fast_model)
    assert parent.train() is parent and fast_model.train() is fast_model
    assert fast_model.training and not any(m.training for m in fast_model.model.modules())
    assert torch.equal(fast_model(x), before) and torch.equal(fast_model(x), before)
    fast_model.eval()
    assert not fast_model.training and torch.equal(fast_model(x), before)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("compile", [None, False], ids=["traced", "eager"])
def test_int8_copy_of_a_model_cast_to_half_precision_computes_in_fp32(half, compile):
    """A model the user cast with ``.half()`` / ``.bfloat16()``: the int8 copy's other layers and its int8
    layers' biases are fp32, and outputs follow the input's floating dtype."""
    model = small_deit()
    x = images(2)
    reference = fast.optimize_for_inference(model, dtype=torch.qint8, compile=False)(x)
    halved = copy.deepcopy(model).to(half)
    fast_model = fast.optimize_for_inference(halved, dtype=torch.qint8, compile=compile)
    assert all(p.dtype == half for p in halved.parameters())  # the original keeps its dtype
    assert all(t.dtype == torch.float32 for t in [*fast_model.parameters(), *fast_model.buffers()])
    assert all(layer.bias().dtype == torch.float32 for layer in quantized_linears(fast_model))
    out = fast_model(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, atol=0.1, rtol=0)  # the half weights' rounding, then int8
    assert fast_model(x.to(half)).dtype == half


def _failing_trace(*args, **kwargs):
    raise RuntimeError("Tracer cannot infer type of output\nmore")


@pytest.mark.parametrize(
    "module, name, value, message",
    [
        (torch.jit, "trace", _failing_trace, r"torch.jit.trace failed \(RuntimeError: Tracer cannot infer"),
        (fast, "sys", type("Sys", (), {"version_info": (3, 14, 0)}), "does not support Python 3.14"),
        # torch keeping its global hooks in a table of another kind (it reads them only for truth)
        (
            nn.modules.module,
            "_global_forward_hooks",
            [],
            "keeps forward hooks where deit_registry cannot",
        ),
    ],
    ids=["trace-fails", "python-3.14", "hook-tables-moved"],
)
def test_int8_copy_runs_eagerly_where_it_cannot_be_traced(monkeypatch, module, name, value, message):
    """A trace that fails, a Python that torch.jit does not support, or hook tables torch has moved: a
    warning naming the cause, then the copy runs as modules, with the same results."""
    x = images(2)
    fast_model, eager = int8_pair(small_deit())
    monkeypatch.setattr(module, name, value)
    with pytest.warns(RuntimeWarning, match=message):
        out = fast_model(x)
    assert not fast_model.traced
    assert torch.equal(out, eager(x)) and torch.equal(fast_model(x), out)


def test_hook_tables_are_nn_modules_own_and_their_loss_is_loud():
    """The one reader of nn.Module's hook tables: the tables themselves (a hook registered later shows in
    them), and a warning with None where a module lacks them."""
    model = small_deit()
    tables = _forward_hook_tables(model.modules())
    assert len(tables) == 2 + 2 * len(list(model.modules())) and not any(tables)
    handle = model.blocks[1].mlp.register_forward_hook(lambda *args: None)
    assert any(tables)
    handle.remove()

    class Moved(nn.Module):
        def modules(self):
            yield object()

    with pytest.warns(RuntimeWarning, match="cannot see them"):
        assert _forward_hook_tables(Moved().modules()) is None


def test_an_input_error_while_tracing_is_the_users_and_keeps_tracing_on():
    fast_model, _ = int8_pair(small_deit())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="built for 64x64"):
            fast_model(torch.randn(1, 3, 32, 32))
        fast_model(images(1))
    assert fast_model.traced and len(fast_model._traces) == 1


def test_traces_are_capped_like_compiled_graphs(monkeypatch):
    monkeypatch.setattr(fast, "_RECOMPILE_LIMIT", 1)
    fast_model, eager = int8_pair(small_deit())
    x = images(3)
    fast_model(x[:1])
    with pytest.warns(RuntimeWarning, match="already holds 1 traces"):
        assert torch.equal(fast_model(x), eager(x))
    assert len(fast_model._traces) == 1 and fast_model.traced


def test_traced_runs_take_large_batches_in_pieces_of_one_size(monkeypatch):
    """Traced like compiled: pieces of one power-of-two size under the eager bound, so that common batch sizes
    trace once (the eager copy takes as many images as fit)."""
    fast_model, eager = int8_pair(small_deit())
    hidden, patch_pixels, prefix = fast_model._chunk_shape
    per_image = (64 * 64 // patch_pixels + prefix) * hidden * 4
    monkeypatch.setattr(fast, "_CHUNK_BYTES", 3 * per_image)
    x = images(6)
    assert (fast_model._chunk_size(x), eager._chunk_size(x)) == (2, 3)
    fast_model(x)
    assert list(fast_model._traces) == [fast._input_key(x[:2], (), {})]


def test_int8_needs_the_cpu():
    model = small_deit().to("meta")
    with pytest.raises(ValueError, match="CPU only"):
        fast.optimize_for_inference(model, dtype=torch.qint8)


def wide_deit() -> DeiT:
    """As wide as deit_small (``fast._INT8_MIN_WIDTH``), otherwise tiny."""
    torch.manual_seed(0)
    return DeiT(img_size=32, embed_dim=384, depth=2, num_heads=6, num_classes=10, distilled=True).eval()


def test_default_on_cpus_with_bf16_and_no_amx_is_int8_for_wide_models(monkeypatch):
    """Without AMX, a DeiT as wide as deit_small or wider runs dynamic int8 linears (VNNI) with its attention
    in bf16 by default, and on a CPU that halves AVX-512 (Zen 4) a DeiT of any width does; narrower ones
    elsewhere, a narrow DeiT inside another model (not traced), models that hold no DeiT and CPUs with AMX
    keep compiled bf16."""
    monkeypatch.setattr(fast, "_cpu_has_native_bf16", lambda: True)  # emulated where the CPU lacks it
    monkeypatch.setattr(torch.backends.quantized, "engine", "x86")
    cpu = torch.device("cpu")
    int8, bf16 = torch.qint8, torch.bfloat16
    for amx, halves, wide_pick, narrow_pick in (
        (False, False, int8, bf16),
        (False, True, int8, int8),
        (True, False, bf16, bf16),
        (True, True, bf16, bf16),
    ):
        monkeypatch.setattr(fast, "_cpu_has_amx", lambda amx=amx: amx)
        monkeypatch.setattr(fast, "_cpu_halves_avx512", lambda halves=halves: halves)
        assert (
            fast.pick_dtype(cpu, wide_deit()) == fast.pick_dtype(cpu, nn.Sequential(wide_deit())) == wide_pick
        )
        assert fast.pick_dtype(cpu, small_deit()) == narrow_pick
        for other in (None, nn.Sequential(small_deit()), nn.Linear(512, 512)):
            assert fast.pick_dtype(cpu, other) == torch.bfloat16
    if "qnnpack" in torch.backends.quantized.supported_engines:
        monkeypatch.setattr(torch.backends.quantized, "engine", "qnnpack")  # no x86 int8 kernels: bf16
        assert fast.pick_dtype(cpu, wide_deit()) == torch.bfloat16
        monkeypatch.setattr(torch.backends.quantized, "engine", "x86")

    model = wide_deit()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the documented call: no compile, nothing to warn about
        monkeypatch.setattr(fast, "_cpu_has_amx", lambda: False)
        default = fast.optimize_for_inference(model)
        monkeypatch.setattr(fast, "_cpu_has_amx", lambda: True)
        amx = fast.optimize_for_inference(model, dtype=torch.qint8)
    for fast_model, fused in ((default, False), (amx, True)):
        assert fast_model.dtype == torch.qint8 and not fast_model.compiled and fast_model.traced
        assert len(quantized_linears(fast_model)) == 4 * 2 + 2
        assert {type(b.attn) for b in fast_model.model.blocks} == {fast._AttentionInBf16}
        assert {b.attn.fused_attn for b in fast_model.model.blocks} == {fused}  # explicit without AMX
    assert all(type(b.attn) is Attention and b.attn.fused_attn for b in model.blocks)
    with torch.inference_mode():
        reference = model(x)
        for fast_model in (default, amx):  # int8 activations; torch 2.9's int8 kernels reach 0.997 here
            assert nn.functional.cosine_similarity(fast_model(x), reference, dim=1).min() > 0.995
    monkeypatch.setattr(fast, "_cpu_has_native_bf16", lambda: False)  # int8 with fp32 attention
    assert {type(b.attn) for b in fast.optimize_for_inference(model, dtype=torch.qint8).model.blocks} == {
        Attention
    }


@pytest.mark.parametrize("fused", [True, False])
def test_int8_copys_attention_computes_in_bf16(fused):
    """:class:`fast._AttentionInBf16` is its attention computed on bf16 copies of the heads, returned in the
    input's dtype: the same numbers as the bf16 computation, not the fp32 one."""
    attn = Attention(64, 4).eval()
    attn.fused_attn = fused
    twin = copy.deepcopy(attn)
    twin.__class__ = fast._AttentionInBf16
    g = torch.Generator().manual_seed(0)
    # [B, heads, N, d] views of [B, N, heads, d], as the model's heads are
    q, k, v = torch.randn(3, 2, 9, 4, 16, generator=g).transpose(2, 3).unbind(0)
    with torch.inference_mode():
        out = twin.attend(q, k, v)
        in_bf16 = attn.attend(*(t.bfloat16().contiguous() for t in (q, k, v)))
        assert out.dtype == torch.float32 and out.shape == (2, 4, 9, 16)
        torch.testing.assert_close(out, in_bf16.float(), rtol=0, atol=0)
        assert not torch.equal(out, attn.attend(q, k, v))


def test_int8_copy_takes_the_weights_it_quantizes_and_leaves_the_original_alone(monkeypatch):
    """The int8 copy quantizes the original's linear weights without copying them first; the original keeps
    its layers, values, mode and gradients, and shares no parameter with the copy, even one tied elsewhere."""
    copied = []
    deepcopy = nn.Parameter.__deepcopy__
    monkeypatch.setattr(
        nn.Parameter, "__deepcopy__", lambda p, memo: copied.append(id(p)) or deepcopy(p, memo)
    )
    linear = nn.Linear(10, 10)
    tied = nn.Module()
    tied.weight = linear.weight  # the same parameter on a module int8 leaves as it is
    for model in (small_deit().train(), nn.Sequential(small_deit(), linear, tied).train()):
        before = copy.deepcopy(model.state_dict())
        copied.clear()
        fast_model = fast.optimize_for_inference(model, dtype=torch.qint8)
        if isinstance(model, DeiT):  # only the parameters that stay float were copied
            kept = [m for m in model.modules() if type(m) is not nn.Linear]
            assert set(copied) == {id(p) for m in kept for p in m.parameters(recurse=False)}
        assert fast_model.dtype == torch.qint8 and quantized_linears(fast_model)
        assert model.training and all(p.requires_grad for p in model.parameters())
        assert not quantized_linears(model)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert not {id(p) for p in model.parameters()} & {id(p) for p in fast_model.parameters()}


def test_int8_layers_are_those_of_torchs_flow_bit_for_bit():
    """``fast._quantize_linears`` takes ``quantize_dynamic``'s steps itself (to skip a zero weight packed per
    layer): the same layers swapped, the same int8 weights, scales and biases, the same outputs."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    class Subclass(nn.Linear):  # the flow swaps nn.Linear only, not its subclasses
        pass

    model = nn.Sequential(small_deit(), nn.Linear(10, 7, bias=False), Subclass(7, 5))
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    assert fast._quantize_linears(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        quantize_dynamic(theirs, {nn.Linear: per_channel_dynamic_qconfig}, torch.qint8, inplace=True)
    layers = dict(ours.named_modules())
    assert {k: type(m) for k, m in layers.items()} == {k: type(m) for k, m in theirs.named_modules()}
    assert type(ours[2]) is Subclass and len(quantized_linears(ours)) == 2 * 4 + 2 + 1
    for name, their in theirs.named_modules():
        if isinstance(their, DynamicLinear):
            our = layers[name]
            assert (our.in_features, our.out_features) == (their.in_features, their.out_features)
            assert str(our) == str(their)
            w, b, their_w, their_b = our.weight(), our.bias(), their.weight(), their.bias()
            assert torch.equal(w.int_repr(), their_w.int_repr())
            assert torch.equal(w.q_per_channel_scales(), their_w.q_per_channel_scales())
            assert torch.equal(w.q_per_channel_zero_points(), their_w.q_per_channel_zero_points())
            assert (b is None and their_b is None) or torch.equal(b, their_b)
    x = images(2)
    with torch.inference_mode():
        assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize(
    "module, name",
    [("torch.ao.quantization", "per_channel_dynamic_qconfig"), ("torch.ao.nn.quantized.dynamic", "Linear")],
)
def test_int8_falls_back_to_fp32_when_torch_drops_its_flow(monkeypatch, module, name):
    """torch has deprecated ``torch.ao.quantization``: the one function that uses it warns and the copy
    stays fp32 once a release removes what it takes."""
    monkeypatch.delattr(importlib.import_module(module), name)
    model = small_deit()
    with pytest.warns(RuntimeWarning, match="cannot quantize linear layers to int8") as record:
        fast_model = fast.optimize_for_inference(model, dtype=torch.qint8, compile=False)
    assert record[0].filename == __file__  # names the caller's line
    plain_linears = [sum(type(layer) is nn.Linear for layer in net.modules()) for net in (model, fast_model)]
    assert fast_model.dtype == torch.float32 and plain_linears[0] == plain_linears[1] > 0  # none quantized
    assert not {id(p) for p in model.parameters()} & {id(p) for p in fast_model.parameters()}
    x = images(2)
    with torch.inference_mode():
        torch.testing.assert_close(fast_model(x), model(x), rtol=0, atol=1e-5)


def test_bf16_probe_follows_onednn(monkeypatch):
    """Without oneDNN there is no native bf16, whatever the CPU; with it, the probe's answer decides."""
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert not fast._cpu_has_native_bf16()
    monkeypatch.undo()
    monkeypatch.setattr(fast, "_cpu_has_native_bf16", lambda: True)
    assert fast.pick_dtype(torch.device("cpu")) == torch.bfloat16
    assert fast.pick_dtype(torch.device("meta")) == torch.float32


def test_bf16_probe_gone_is_loud(monkeypatch):
    """The probe is oneDNN's non-public op: on this torch it answers; if a release drops it, the fast mode
    assumes emulated bf16 and says so."""
    assert isinstance(torch.ops.mkldnn._is_mkldnn_bf16_supported(), bool)
    if torch.backends.mkldnn.is_available():
        monkeypatch.setattr(torch.ops, "mkldnn", object())  # no such op any more
        with pytest.warns(RuntimeWarning, match="no oneDNN bf16 probe"):
            assert not fast._cpu_has_native_bf16()


def test_compiler_internals_are_found_and_their_loss_is_loud():
    """The one function that reads torch's non-public compiler modules finds them on this torch; if a release
    moves them, it warns, and the settings still raise the recompile limit through torch.compiler.config."""
    internals = fast._compiler_internals()
    assert internals.inductor_config is not None and internals.recompile_limit_error is not None
    assert len(internals.compile_errors) == 3
    fast._compiler_internals.cache_clear()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(sys.modules, "torch._inductor.config", None)  # import of it now fails
            with pytest.warns(RuntimeWarning, match="compiler internals are not where"):
                moved = fast._compiler_internals()
            assert moved.inductor_config is None and moved.compile_errors == ()
            public = getattr(torch.compiler, "config", None)
            if public is None or not hasattr(public, "recompile_limit"):  # older torch: Dynamo's own config
                assert moved.limit_config is None
                return
            assert moved.limit_config is public
            before = public.recompile_limit
            with fast._compile_settings(torch.device("cpu"), torch.float32):
                assert public.recompile_limit >= fast._RECOMPILE_LIMIT
                assert public.fail_on_recompile_limit_hit
            assert public.recompile_limit == before
    finally:
        fast._compiler_internals.cache_clear()
    assert fast._compiler_internals().inductor_config is not None


def test_input_errors_still_reach_the_user():
    fast_model = fast.optimize_for_inference(small_deit(), compile=False)
    with pytest.raises(ValueError, match="built for 64x64"):
        fast_model(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("kwargs", [{"dtype": torch.int8}, {"compile": "yes"}, {"cuda_graphs": 1}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        fast.optimize_for_inference(small_deit(), **kwargs)


def test_eager_cpu_runs_take_large_batches_in_chunks(monkeypatch):
    """Eager CPU runs split the batch so that no activation reaches glibc's mmap sizes; the joined outputs
    (tensors and tuples of them) are the whole batch's, in order."""
    model = small_deit()
    x = images(5)
    probe = Probe(model, x).eval()
    fast_probe = fast.optimize_for_inference(probe, dtype=torch.float32, compile=False)
    hidden, patch_pixels, prefix = fast_probe._chunk_shape
    assert (hidden, patch_pixels, prefix) == (4 * 96, 16 * 16, 2)
    per_image = (64 * 64 // patch_pixels + prefix) * hidden * 4
    monkeypatch.setattr(fast, "_CHUNK_BYTES", 2 * per_image)  # chunks of 2, 2 and 1 images
    assert fast_probe._chunk_size(x) == 2
    calls = []
    handle = fast_probe.model.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    features, logits = fast_probe(x)
    handle.remove()
    assert calls == [2, 2, 1]
    with torch.inference_mode():
        ref_features, ref_logits = probe(x)
    torch.testing.assert_close(features, ref_features, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    joined = fast._concat([{"a": torch.ones(1), "n": None}, {"a": torch.zeros(2), "n": None}], [1, 2])
    assert joined["a"].tolist() == [1, 0, 0] and joined["n"] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_cpu_runs_split_only_batches_that_reach_mmap_sizes(monkeypatch, dtype):
    """A compiled graph sees the whole batch unless its MLP activation would reach glibc's highest mmap
    threshold; then pieces of one power-of-two size (one graph) and the remainder, joined in order. A stand-in
    for the compiled function records the batch sizes it is given."""
    model = small_deit().to(dtype)
    seen = []

    def compiled(x, *args):
        seen.append(len(x))
        return model(x)

    fast_model = fast.FastInferenceModel(model, dtype, compiled)
    hidden, patch_pixels, prefix = fast_model._chunk_shape
    per_image = (64 * 64 // patch_pixels + prefix) * hidden * dtype.itemsize  # bf16 halves it
    monkeypatch.setattr(fast, "_MMAP_MAX_BYTES", 5 * per_image)
    monkeypatch.setattr(fast, "_CHUNK_BYTES", 3 * per_image)  # at most 3 images: pieces of 2
    x = images(7).to(dtype)
    for n, pieces in ((4, [4]), (5, [2, 2, 1]), (7, [2, 2, 2, 1]), (1, [1])):
        seen.clear()
        out = fast_model(x[:n])
        assert seen == pieces
        with torch.inference_mode():
            torch.testing.assert_close(
                out, model(x[:n]), rtol=0, atol=1e-5 if dtype is torch.float32 else 2e-2
            )
    seen.clear()
    fast_model(x[:5], "an extra argument")  # not known to be per image: the batch goes through whole
    assert seen == [5]
    monkeypatch.setattr(fast, "_CHUNK_BYTES", 1)  # under one image: pieces of one
    seen.clear()
    fast_model(x[:5])
    assert seen == [1] * 5


class _NotBatchFirst(nn.Module):
    """A wrapper whose output puts the batch second: chunking it must not join along the wrong axis."""

    def __init__(self, model: DeiT) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).t()


def test_outputs_not_split_along_the_batch_run_in_one_piece(monkeypatch):
    model = _NotBatchFirst(small_deit()).eval()
    fast_model = fast.optimize_for_inference(model, dtype=torch.float32, compile=False)
    monkeypatch.setattr(fast, "_CHUNK_BYTES", 1)  # one image per chunk
    x = images(3)
    with torch.inference_mode():
        torch.testing.assert_close(fast_model(x), model(x), rtol=0, atol=1e-5)
    with pytest.raises(fast._NotBatched):
        fast._concat([1, 2], [1, 1])
