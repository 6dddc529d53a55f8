"""The per-model checks timm's own test-suite applies to every registered model, on our models through
``timm.create_model``. Structure checks run for all eight on the meta device; compute-heavy checks run where
timm runs them (fixed-size 384 models are skipped by timm's size limits) on the tiny plain and distilled models,
whose code path is that of every variant."""

from __future__ import annotations

import copy
import fnmatch
import io

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from timm.models._manipulate import group_parameters

from deit_registry import DeiT
from deit_registry.variants import VARIANTS

NAMES = sorted(VARIANTS)
TINY = ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"]


def _size(model) -> tuple[int, int, int]:
    return tuple(model.pretrained_cfg["input_size"])


@pytest.mark.parametrize("name", NAMES)
def test_cfg_and_head_contract_on_meta(name: str) -> None:
    model = timm.create_model(name, device="meta", dtype=torch.float32).eval()
    assert isinstance(model, DeiT)
    with pytest.raises(TypeError):
        timm.create_model(name, device="meta", not_a_model_arg=1)
    cfg, state = model.pretrained_cfg, model.state_dict()
    assert model.in_chans == cfg["input_size"][0] and model.num_features > 0 and model.head_hidden_size > 0
    classifiers = cfg["classifier"] if isinstance(cfg["classifier"], tuple) else (cfg["classifier"],)
    assert all(f"{c}.weight" in state for c in classifiers) and f"{cfg['first_conv']}.weight" in state
    groups = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    assert len(set(groups.values())) > 1
    names = [n for n, _ in model.named_parameters()]
    for pattern in model.no_weight_decay():
        assert any(fnmatch.fnmatch(n, pattern) for n in names) or getattr(model, pattern, None) is None

    x = torch.randn(1, *_size(model), device="meta")
    feats = model.forward_features(x)
    pre = model.forward_head(feats, pre_logits=True)
    assert feats.shape[-1] == model.num_features and pre.shape[1] == model.head_hidden_size
    model.to(torch.bfloat16)
    assert model(x.to(torch.bfloat16)).dtype == torch.bfloat16
    model.to(torch.float32)
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == pre.shape
    assert timm.create_model(name, num_classes=0, device="meta").eval()(x).shape == pre.shape

    # reset_classifier keeps device, dtype and mode; reset and resize keep frozen weights frozen
    model.to(device="meta", dtype=torch.float64)
    model.reset_classifier(0)
    model.reset_classifier(2)
    heads = model.get_classifier()
    heads = heads if isinstance(heads, tuple) else (heads,)
    assert all(p.dtype == torch.float64 and p.is_meta for h in heads for p in h.parameters())
    assert all(not m.training for m in model.modules())
    frozen = timm.create_model(name, device="meta").requires_grad_(False)
    frozen.reset_classifier(0)
    frozen.set_input_size(img_size=tuple(2 * s for s in _size(frozen)[-2:]))
    assert not [n for n, p in frozen.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("name", TINY)
def test_forward_backward_and_grad_checkpointing(name: str) -> None:
    model = timm.create_model(name).eval()
    x = torch.randn(1, *_size(model))
    with torch.no_grad():
        out = model(x)
        model.set_grad_checkpointing()
        assert torch.allclose(out, model(x), rtol=1e-4, atol=1e-5)
    model = timm.create_model(name, num_classes=42).train()
    out = model(torch.randn(2, *_size(model)))
    out.mean().backward()
    assert out.shape == (2, 42)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", TINY)
def test_forward_intermediates_and_pruning(name: str) -> None:
    model = timm.create_model(name).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    x = torch.randn(2, *_size(model))
    with torch.no_grad():
        final, taps = model.forward_intermediates(x)
        assert torch.allclose(final, model.forward_features(x), atol=1e-6)
        assert [t.shape[1] for t in taps] == info.channels() and set(info.reduction()) == {16}
        assert all(t.shape[-2:] == (14, 14) for t in taps)
        expected = model(x)
        pruned = copy.deepcopy(model)
        pruned.prune_intermediate_layers([11], prune_head=False)
        assert torch.allclose(pruned(x), expected, atol=1e-6)
        for i in (0, 5):
            early = model.forward_intermediates(x, indices=[i], stop_early=True, intermediates_only=True)
            assert torch.allclose(early[0], taps[i], atol=1e-6)
            cut = copy.deepcopy(model)
            take = cut.prune_intermediate_layers([i])
            assert torch.allclose(
                cut.forward_intermediates(x, indices=take, intermediates_only=True)[0], taps[i]
            )
    features = timm.create_model(name, features_only=True, feature_cls="getter").eval()
    outs = features(torch.randn(1, *_size(model)))
    assert [o.shape[1] for o in outs] == features.feature_info.channels()


@pytest.mark.parametrize("name", TINY)
def test_torchscript_and_fx(name: str) -> None:
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    with timm.set_scriptable(True):
        model = timm.create_model(name).eval()
    x = torch.randn(1, *_size(model))
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    traced = torch.jit.trace(model, x)  # grad enabled: its sanity check traces again under no_grad
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(scripted(x), expected, atol=1e-5)
        assert torch.allclose(traced(x), expected, atol=1e-5)
    tracer = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer)
    fx = create_feature_extractor(model, return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer)
    with torch.no_grad():
        assert torch.allclose(next(iter(fx(x).values())), expected, atol=1e-5)


def test_dynamic_img_pad_alone_keeps_the_input_size_fixed() -> None:
    """As in timm: padding to a patch multiple does not resample the position grid, so the size stays fixed."""
    import deit_registry as dr

    ours = dr.create_model("deit_tiny_patch16_224", dynamic_img_pad=True, depth=1).eval()
    theirs = timm.models.vision_transformer.VisionTransformer(
        embed_dim=192, depth=1, num_heads=3, dynamic_img_pad=True
    ).eval()
    assert ours.patch_embed.strict_img_size and theirs.patch_embed.strict_img_size
    with pytest.raises(ValueError, match="built for 224x224 inputs; got 210x210"):
        ours(torch.randn(1, 3, 210, 210))
    with pytest.raises(AssertionError):
        theirs(torch.randn(1, 3, 210, 210))


def test_timm_save_for_hf_reads_a_model_of_every_door(tmp_path) -> None:
    """``pretrained_cfg`` carries what timm's own factories give (``architecture``, ``tag``...), so timm's
    ``save_for_hf`` works on a model from ``deit_registry.create_model`` and timm reads the folder back."""
    import deit_registry as dr

    torch.manual_seed(0)
    ours = dr.create_model("deit_tiny_patch16_224", num_classes=7).eval()
    theirs = timm.create_model("deit_tiny_patch16_224", num_classes=7)
    assert {k: v for k, v in ours.pretrained_cfg.items() if k != "num_classes"} == {
        k: v for k, v in theirs.pretrained_cfg.items() if k != "num_classes"
    }
    timm.models.save_for_hf(ours, str(tmp_path))
    back = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(back(x), ours(x))


@pytest.mark.skipif(
    not hasattr(timm.data, "resolve_input_data_config"),
    reason="this timm has no model input config (1.0.31 on)",
)
def test_timm_reads_the_current_input_size_after_any_resize() -> None:
    """timm's scripts check ``--img-size`` against ``resolve_input_data_config(model)``: after
    ``set_input_size``, for ``img_size=`` given to our own ``create_model``, and for a dynamic size, timm is
    told what the model takes now, exactly as for its own ViT."""
    from timm.data import resolve_input_data_config
    from timm.models import get_model_input_config

    import deit_registry as dr

    name = "deit_tiny_patch16_224"
    vit = timm.models.vision_transformer.vit_tiny_patch16_224
    resized = [timm.create_model(name, device="meta"), dr.create_model(name, device="meta")]
    reference = vit(device="meta")
    for model in (*resized, reference):
        model.set_input_size((384, 384))
    cases = [
        *((m, reference) for m in resized),
        (dr.create_model(name, img_size=320, device="meta"), vit(img_size=320, device="meta")),
        (
            dr.create_model(name, dynamic_img_size=True, device="meta"),
            vit(dynamic_img_size=True, device="meta"),
        ),
        (timm.create_model(name, img_size=320, device="meta"), vit(img_size=320, device="meta")),
        (
            dr.create_model(name, dynamic_img_pad=True, device="meta"),
            vit(dynamic_img_pad=True, device="meta"),
        ),
    ]
    for ours, theirs in cases:
        assert get_model_input_config(ours) == get_model_input_config(theirs)
        size = get_model_input_config(ours)["input_size"][-2:]
        assert resolve_input_data_config(ours, {"img_size": size})["input_size"][-2:] == size
    assert get_model_input_config(resized[0])["input_size"] == (3, 384, 384)
    with pytest.raises(ValueError, match="requires"):  # a fixed size still refuses another
        resolve_input_data_config(resized[1], {"img_size": 224})
