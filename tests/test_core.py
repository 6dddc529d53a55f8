"""Core: the architecture against timm for all eight variants, the metadata table, heads, bad input."""

import copy
import re
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import deit_registry as dr
from deit_registry.architecture import DeiT
from deit_registry.variants import VARIANTS

NAMES = list(VARIANTS)
DISTILLED = [n for n in NAMES if VARIANTS[n].arch.distilled]
EXPECTED = {  # issue #2: (params, top-1, top-5, width, heads, size)
    "deit_tiny_patch16_224": (5_717_416, 72.2, 91.1, 192, 3, 224),
    "deit_small_patch16_224": (22_050_664, 79.9, 95.0, 384, 6, 224),
    "deit_base_patch16_224": (86_567_656, 81.8, 95.6, 768, 12, 224),
    "deit_base_patch16_384": (86_859_496, 82.9, 96.2, 768, 12, 384),
    "deit_tiny_distilled_patch16_224": (5_910_800, 74.5, 91.9, 192, 3, 224),
    "deit_small_distilled_patch16_224": (22_436_432, 81.2, 95.4, 384, 6, 224),
    "deit_base_distilled_patch16_224": (87_338_192, 83.4, 96.5, 768, 12, 224),
    "deit_base_distilled_patch16_384": (87_630_032, 85.2, 97.2, 768, 12, 384),
}
SHA8 = {
    "deit_tiny_patch16_224": "a1311bcf",
    "deit_small_patch16_224": "cd65a155",
    "deit_base_patch16_224": "b5f2ef4d",
    "deit_base_patch16_384": "8de9b5d1",
    "deit_tiny_distilled_patch16_224": "b40b3cf7",
    "deit_small_distilled_patch16_224": "649709d9",
    "deit_base_distilled_patch16_224": "df68dfff",
    "deit_base_distilled_patch16_384": "d0272ac0",
}


def timm_reference(name: str, **kwargs) -> torch.nn.Module:
    """timm's own implementation of ``name`` (its module function: the registry may point at ours)."""
    import timm.models.deit

    model = getattr(timm.models.deit, name)(pretrained=False, **kwargs)
    assert not isinstance(model, DeiT)
    return model


def _timm_and_ours(name: str, **kwargs) -> tuple[torch.nn.Module, DeiT]:
    torch.manual_seed(0)
    reference = timm_reference(name, **kwargs)
    ours = dr.create_model(name, **kwargs)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


# Every variant at reduced depth (same width, heads and tokens, built on both sides), plus one full-depth model
# per family: the suite stays quick and every shape is still compared.
PARITY = [(name, 2) for name in NAMES] + [
    ("deit_tiny_patch16_224", 12),
    ("deit_tiny_distilled_patch16_224", 12),
]


@pytest.mark.parametrize(("name", "depth"), PARITY, ids=[f"{n}-depth{d}" for n, d in PARITY])
def test_parity_with_timm(name: str, depth: int) -> None:
    """Same weights, same outputs (fp32, < 1e-5) in eval and train mode, the distilled pair, and the fast
    mode's fp32 copy with either attention path."""
    reference, ours = _timm_and_ours(name, depth=depth)
    size = VARIANTS[name].arch.img_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        for mode in (False, True):
            reference.train(mode)
            ours.train(mode)
            assert (ours(x) - reference(x)).abs().max().item() < 1e-5
        if name in DISTILLED:
            reference.set_distilled_training(True)
            ours.set_distilled_training(True)
            pair, ref_pair = ours(x), reference(x)
            assert isinstance(pair, tuple) and len(pair) == 2
            for a, b in zip(pair, ref_pair):
                assert (a - b).abs().max().item() < 1e-5
            ours.eval()
            assert isinstance(ours(x), torch.Tensor)  # eval returns the mean even in distilled training
        reference.eval()
        expected = reference(x)
        fast = dr.optimize_for_inference(ours, dtype=torch.float32, compile=False)
        for fused in (
            True,
            False,
        ):  # the fused kernel, and the explicit path the fast mode uses on CPU in bf16
            for block in fast.model.blocks:
                block.attn.fused_attn = fused
            assert (fast(x) - expected).abs().max().item() < 1e-5


def explicit_attention_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward with attention as explicit matmuls (FlopCounterMode's count of CPU
    scaled_dot_product_attention depends on the torch release: 0 in some)."""
    attention = [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    before = [m.fused_attn for m in attention]
    for m in attention:
        m.fused_attn = False
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    finally:
        for m, fused in zip(attention, before):
            m.fused_attn = fused
    return counter.get_total_flops()


def closed_form_macs(model: DeiT, size: tuple[int, int]) -> int:
    """Multiply-accumulates of a DeiT forward: patch embedding, blocks (qkv, QK^T, AV, proj, MLP), head."""
    d, p = model.embed_dim, model.num_prefix_tokens
    patches = (size[0] // 16) * (size[1] // 16)
    n, hidden = patches + p, model.blocks[0].mlp.fc1.out_features
    block = n * (3 * d * d + d * d + 2 * d * hidden) + 2 * n * n * d
    heads = (2 if model.head_dist is not None else 1) * d * model.num_classes
    return patches * 3 * 16 * 16 * d + len(model.blocks) * block + heads


@pytest.mark.parametrize(("depth", "fused"), [(1, True), (2, False)])
def test_flop_count_helper_matches_the_closed_form(depth: int, fused: bool) -> None:
    """Guards the helper itself: independent of the SDPA counter, and of the switch it starts from."""
    model = dr.create_model("deit_tiny_distilled_patch16_224", depth=depth).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused
    x = torch.randn(1, 3, 224, 224)
    assert explicit_attention_flops(model, x) == 2 * closed_form_macs(model, (224, 224))
    assert all(block.attn.fused_attn is fused for block in model.blocks)


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = dr.create_model("deit_tiny_distilled_patch16_224", depth=2).train()
    model.set_distilled_training(True)
    x = torch.randn(2, 3, 224, 224)
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        cls_logits, dist_logits = model(x)
        (cls_logits.square().sum() + dist_logits.sum()).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for key, grad in grads[0].items():  # equal up to fp32 rounding, relative to the gradient's scale
        assert (grads[1][key] - grad).abs().max() <= 1e-5 * grad.abs().max(), key


def _gelus(model: torch.nn.Module, x: torch.Tensor, grad: bool = False) -> tuple[int, int, torch.Tensor]:
    """(GELUs in place, GELUs out of place, output) of one forward."""
    from torch.profiler import profile

    with torch.set_grad_enabled(grad), profile() as prof:
        out = model(x)
    names = [e.name for e in prof.events()]
    return names.count("aten::gelu_"), names.count("aten::gelu"), out


class _KeepsOutput(torch.nn.Module):
    """An fc1 that keeps what it returns (a cache, say): GELU must not overwrite it."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.linear, self.kept = linear, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.kept = self.linear(x)
        return self.kept


class _Identity(torch.nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w


class _LinearKeepsOutput(torch.nn.Linear):
    """The same, as a subclass of nn.Linear with a forward of its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.kept = super().forward(x)
        return self.kept


def test_gelu_overwrites_fc1_output_only_where_nothing_can_see_it() -> None:
    """Without autograd, GELU overwrites fc1's output in place (one [B, N, 4D] buffer fewer per block, the same
    values); never where something else could see or keep that output."""
    torch.manual_seed(0)
    model = DeiT(img_size=64, embed_dim=32, depth=3, num_heads=2).eval()
    x = torch.randn(2, 3, 64, 64)
    in_place, plain, out = _gelus(model, x)
    assert (in_place, plain) == (3, 0)
    assert _gelus(model, x, grad=True)[:2] == (0, 3)  # autograd needs GELU's input
    assert torch.equal(_gelus(model, x, grad=True)[2], out)

    def check(blocks_in_place: int, setup, teardown=None) -> None:
        undo = setup()
        try:
            in_place, plain, got = _gelus(model, x)
        finally:
            (teardown or undo.remove)()
        assert (in_place, plain) == (blocks_in_place, 3 - blocks_in_place) and torch.equal(got, out)

    saved, seen = [], []
    check(2, lambda: model.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: saved.append(o)))
    assert saved[0].min() < -0.2  # fc1's output as it was (GELU >= -0.17)
    check(2, lambda: model.blocks[1].mlp.act.register_forward_pre_hook(lambda m, i: seen.append(i[0].min())))
    assert seen[0] < -0.2  # GELU's input, and the hook ran
    check(0, lambda: torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None))
    mlp = model.blocks[2].mlp
    fc1, act = mlp.fc1, mlp.act
    check(2, lambda: setattr(mlp, "fc1", _KeepsOutput(fc1)), lambda: setattr(mlp, "fc1", fc1))
    check(
        2,
        lambda: setattr(mlp, "act", type("MyGELU", (torch.nn.GELU,), {})()),
        lambda: setattr(mlp, "act", act),
    )

    subclass = _LinearKeepsOutput(fc1.in_features, fc1.out_features)
    subclass.load_state_dict(fc1.state_dict())
    check(2, lambda: setattr(mlp, "fc1", subclass), lambda: setattr(mlp, "fc1", fc1))
    torch.nn.utils.parametrize.register_parametrization(subclass, "weight", _Identity())
    check(2, lambda: setattr(mlp, "fc1", subclass), lambda: setattr(mlp, "fc1", fc1))
    parametrized = copy.deepcopy(fc1)  # parametrize makes a subclass with nn.Linear's forward: still in place
    torch.nn.utils.parametrize.register_parametrization(parametrized, "weight", _Identity())
    check(3, lambda: setattr(mlp, "fc1", parametrized), lambda: setattr(mlp, "fc1", fc1))

    for keeps in (_KeepsOutput(fc1), subclass):
        mlp.fc1 = keeps
        _gelus(model, x)
        assert keeps.kept.min() < -0.2
    mlp.fc1 = fc1


class _KeptLinear(torch.Tensor):
    """A tensor subclass that keeps every linear layer's output (an activation recorder)."""

    kept: list[tuple[torch.Tensor, torch.Tensor]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        if func is torch.nn.functional.linear:
            cls.kept.append((out, out.clone()))
        return out


def _recorders() -> dict[str, tuple[object, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """A TorchFunctionMode and a TorchDispatchMode that keep every linear layer's output (and a copy)."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode  # where torch documents it

    kept: dict[str, list] = {"function": [], "dispatch": []}

    class Function(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.nn.functional.linear:
                kept["function"].append((out, out.clone()))
            return out

    class Dispatch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default):
                kept["dispatch"].append((out, out.clone()))
            return out

    return {"function": (Function(), kept["function"]), "dispatch": (Dispatch(), kept["dispatch"])}


@pytest.mark.parametrize("observer", ["subclass", "function", "dispatch"])
def test_gelu_never_overwrites_what_a_mode_or_subclass_keeps(observer: str) -> None:
    """A tensor subclass, TorchFunctionMode or TorchDispatchMode sees every op and may keep fc1's output (an
    activation recorder): GELU then runs out of place, and what it kept is fc1's output as it was."""
    torch.manual_seed(0)
    model = DeiT(img_size=64, embed_dim=32, depth=3, num_heads=2).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        if observer == "subclass":
            _KeptLinear.kept = kept = []
            out = model(x.as_subclass(_KeptLinear)).as_subclass(torch.Tensor)
        else:
            mode, kept = _recorders()[observer]
            with mode:
                out = model(x)
    assert len(kept) >= 6 and all(torch.equal(a, b) for a, b in kept)  # qkv, proj, fc1, fc2 of 3 blocks
    assert torch.equal(out, expected)
    assert _gelus(model, x)[:2] == (3, 0)  # and in place again once it is gone


@pytest.mark.parametrize("name", NAMES)
def test_metadata_and_sizes(name: str) -> None:
    params, top1, top5, width, heads, size = EXPECTED[name]
    v = dr.get_pretrained_cfg(name)
    assert (v.arch.embed_dim, v.arch.num_heads, v.arch.depth, v.arch.patch_size) == (width, heads, 12, 16)
    assert (v.num_params, v.weights.top1, v.weights.top5) == (params, top1, top5)
    w = v.weights
    assert w.input_size == (3, size, size)
    assert (w.mean, w.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (w.interpolation, w.crop_pct, w.num_classes, w.license) == ("bicubic", 0.875, 1000, "apache-2.0")
    assert w.eval_resize == {224: 256, 384: 438}[size]
    assert w.url == f"https://dl.fbaipublicfiles.com/deit/{name}-{SHA8[name]}.pth"
    assert w.sha256_prefix == SHA8[name]
    assert w.hf_hub_id == f"timm/{name}.fb_in1k"
    kind = "distilled-" if "distilled" in name else ""
    size_name = name.split("_")[1]
    assert w.transformers_id == f"facebook/deit-{size_name}-{kind}patch16-{size}"
    assert (
        len(w.class_names) == 1000 and w.class_names[0] == "tench" and w.class_names[999] == "toilet tissue"
    )
    with pytest.raises(AttributeError):
        v.num_params = 0  # frozen: one source of truth

    model = dr.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.num_prefix_tokens == (2 if "distilled" in name else 1)
    assert (model.embed_dim, model.num_features, model.has_class_token) == (width, width, True)
    assert model.patch_embed.num_patches == (size // 16) ** 2
    assert model.patch_embed.grid_size == (size // 16, size // 16)
    assert model.patch_embed.patch_size == (16, 16)
    assert isinstance(model.blocks, torch.nn.Sequential) and len(model.blocks) == 12
    flops = explicit_attention_flops(model, torch.randn(1, 3, size, size))
    assert flops == 2 * closed_form_macs(model, (size, size))
    assert abs(flops / 2e9 - v.gmacs) < 0.01


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_official_key_layout(name: str) -> None:
    keys = list(dr.create_model(name).state_dict())
    distilled = "distilled" in name
    assert len(keys) == (155 if distilled else 152)
    for key in (
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "blocks.11.attn.qkv.weight",
        "norm.bias",
    ):
        assert key in keys
    assert ("dist_token" in keys) == distilled and ("head_dist.weight" in keys) == distilled
    assert dr.create_model(name).state_dict()["blocks.0.attn.qkv.weight"].shape == (576, 192)


def test_readme_model_table_matches_variants() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for v in VARIANTS.values():
        w = v.weights
        row = f"| `{v.name}` | {v.num_params:,} | {v.gmacs:.2f} | {w.input_size[1]}x{w.input_size[2]} | {w.top1} | {w.top5} |"
        assert row in readme, f"README row for {v.name} is out of date"


# ----------------------------------------------------------------------------------------------- heads
def _tiny(**kwargs) -> DeiT:
    return DeiT(embed_dim=32, depth=2, num_heads=2, **kwargs)


def _backward_all(model: torch.nn.Module, out) -> None:
    loss = sum(o.float().pow(2).mean() for o in (out if isinstance(out, tuple) else (out,)))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("distilled", [False, True])
def test_classifier_and_distilled_heads(distilled: bool) -> None:
    model = _tiny(num_classes=7, distilled=distilled)
    x = torch.randn(2, 3, 224, 224)
    assert model.head_kind == ("distilled" if distilled else "classifier")
    out = model.train()(x)
    assert out.shape == (2, 7)  # the mean in training by default, so plain cross-entropy works
    _backward_all(model, out)
    if distilled:
        model.zero_grad()
        model.set_distilled_training(True)
        cls_logits, dist_logits = model(x)
        _backward_all(model, (cls_logits, dist_logits))
        feats = model.forward_features(x)
        assert torch.allclose((cls_logits + dist_logits) / 2, model.eval()(x), atol=1e-6)
        assert torch.allclose(cls_logits, model.head(feats[:, 0]), atol=1e-6)
        assert torch.allclose(dist_logits, model.head_dist(feats[:, 1]), atol=1e-6)


@pytest.mark.parametrize("distilled", [False, True])
def test_feature_head(distilled: bool) -> None:
    for model in (_tiny(num_classes=0, distilled=distilled), _tiny(head="none", distilled=distilled)):
        x = torch.randn(2, 3, 224, 224)
        out = model.eval()(x)
        tokens = model.forward_features(x)
        expected = (tokens[:, 0] + tokens[:, 1]) / 2 if distilled else tokens[:, 0]
        assert out.shape == (2, 32) and torch.allclose(out, expected, atol=1e-6)
        assert torch.allclose(model.forward_head(tokens, pre_logits=True), expected, atol=1e-6)
        _backward_all(model, model.train()(x))


def test_pre_logits_is_what_the_classifier_reads() -> None:
    model = _tiny(num_classes=5, distilled=True).eval()
    x = torch.randn(1, 3, 224, 224)
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    reference = _tiny(num_classes=0, distilled=True)
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head")})
    assert torch.allclose(pooled, reference.eval()(x), atol=1e-6)


def test_module_and_registered_heads() -> None:
    model = _tiny(head=torch.nn.Sequential(torch.nn.Linear(32, 4), torch.nn.Tanh()))
    out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 4) and out.abs().max() <= 1
    _backward_all(model, out)

    def factory(spec: dr.HeadSpec) -> dr.HeadModules:
        return dr.HeadModules(torch.nn.Linear(spec.embed_dim, spec.num_classes * 2))

    dr.register_head("double", factory, overwrite=True)
    assert "double" in dr.list_heads()
    model = dr.create_model("deit_tiny_patch16_224", head="double", num_classes=3)
    assert model.head_kind == "double" and model(torch.randn(1, 3, 224, 224)).shape == (1, 6)
    with pytest.raises(ValueError, match="already registered"):
        dr.register_head("double", factory)
    with pytest.raises(ValueError, match="unknown head 'nope'"):
        _tiny(head="nope")
    with pytest.raises(ValueError, match="distillation token"):
        _tiny(head="distilled")


@pytest.mark.parametrize("distilled", [False, True])
def test_masked_image_modeling_head(distilled: bool) -> None:
    model = _tiny(head="mim", distilled=distilled)
    x = torch.randn(2, 3, 224, 224)
    mask = torch.zeros(2, 196, dtype=torch.bool)
    mask[:, ::3] = True
    recon = model(x, bool_masked_pos=mask)
    assert recon.shape == x.shape
    loss = model.head.loss(x, recon, mask)
    _backward_all(model, loss)
    assert model.mask_token.grad.abs().sum() > 0

    # The loss counts masked patches only: changing the reconstruction elsewhere leaves it unchanged.
    pixel_mask = mask.reshape(2, 14, 14).repeat_interleave(16, 1).repeat_interleave(16, 2).unsqueeze(1)
    edited = torch.where(pixel_mask, recon, recon + 100.0).detach()
    assert torch.allclose(model.head.loss(x, edited, mask), loss, atol=1e-6)
    by_hand = ((x - recon).abs() * pixel_mask).sum() / pixel_mask.sum() / 3
    assert torch.allclose(loss, by_hand, atol=1e-4)
    # The mask token replaces the masked patches: a masked forward differs from an unmasked one.
    assert not torch.allclose(model(x, bool_masked_pos=mask), model(x))
    with pytest.raises(ValueError, match="head='mim'"):
        _tiny()(x, bool_masked_pos=mask)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(head="mim", dynamic_img_size=True),
        dict(head="mim", distilled=True, dynamic_img_size=True, dynamic_img_pad=True),
        dict(num_classes=3, distilled=True, dynamic_img_size=True),
        dict(num_classes=3, global_pool="avg", dynamic_img_size=True),
        dict(num_classes=0, dynamic_img_size=True),
        dict(head=torch.nn.Linear(32, 2), dynamic_img_size=True),
    ],
    ids=["mim", "mim-distilled-pad", "distilled", "avg", "features", "module"],
)
def test_forward_is_forward_head_of_forward_features(kwargs) -> None:
    """For every head, at the built size and at another (non-square, and not a patch multiple with padding)."""
    torch.manual_seed(0)
    model = _tiny(**kwargs).eval()
    sizes = [(224, 224), (32, 48), (40, 72)] if kwargs.get("dynamic_img_pad") else [(224, 224), (32, 48)]
    with torch.no_grad():
        for h, w in sizes:
            x = torch.randn(2, 3, h, w)
            out = model(x)
            assert torch.equal(model.forward_head(model.forward_features(x)), out)
            if model.head_kind == "mim":
                assert out.shape == (2, 3, -(-h // 16) * 16, -(-w // 16) * 16)
    if model.head_kind == "mim":  # tokens from another input than the last forward_features call
        tokens = model.forward_features(torch.randn(1, 3, 32, 48))
        with pytest.raises(ValueError, match="forward_features on the same input"):
            model.forward_head(tokens[:, :-1])


def test_integer_images_raise_value_error_with_the_fix() -> None:
    model = _tiny()
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with pytest.raises(
        ValueError, match=r"float image tensor.*torch.uint8.*x.float\(\) / 255.*eval_transform"
    ):
        model(images)
    with pytest.raises(ValueError, match="float image tensor"):
        model.forward_intermediates(images.long())
    model(images.float() / 255)  # the fix works


@pytest.mark.parametrize("shape", [(4, 98), (2, 195), (1, 196), (2, 14, 15), (2, 196, 1), (2,)])
def test_mask_of_the_wrong_shape_raises_value_error(shape) -> None:
    model = _tiny(head="mim")
    x = torch.randn(2, 3, 224, 224)
    message = (
        re.escape("[B, num_patches] = [2, 196] or [B, h, w] = [2, 14, 14]")
        + ".*"
        + re.escape(str(list(shape)))
    )
    with pytest.raises(ValueError, match=message):
        model(x, bool_masked_pos=torch.zeros(shape, dtype=torch.bool))
    flat = torch.rand(2, 196) < 0.5
    with torch.no_grad():  # both documented shapes give the same result
        assert torch.equal(model(x, bool_masked_pos=flat), model(x, bool_masked_pos=flat.reshape(2, 14, 14)))


def test_reset_classifier_same_semantics_plain_and_distilled() -> None:
    for distilled in (False, True):
        model = _tiny(num_classes=10, distilled=distilled)
        model.reset_classifier(4)
        assert model.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 4)
        assert (model.head_dist is not None) == distilled
        model.reset_classifier(0)
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 32)
        model.reset_classifier(6, global_pool="avg")
        assert model.head_dist is None and model(torch.randn(1, 3, 224, 224)).shape == (1, 6)
        model.reset_classifier(7, global_pool="avg")
        model.reset_classifier(7, global_pool="token")  # back to the class token: the distilled pair again
        assert (model.head_dist is not None) == distilled and model(torch.randn(1, 3, 224, 224)).shape == (
            1,
            7,
        )


# ----------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((3, 224, 224), r"\[B, 3, H, W\].*3-D tensor of shape \[3, 224, 224\].*unsqueeze"),
        ((2, 1, 224, 224), r"built for 3 input channels; got 1.*in_chans=1"),
        ((2, 3, 160, 224), r"built for 224x224 inputs; got 160x224.*img_size=\(160, 224\).*dynamic_img_size"),
    ],
)
def test_bad_input_raises_value_error(shape: tuple[int, ...], message: str) -> None:
    model = dr.create_model("deit_tiny_patch16_224")
    with pytest.raises(ValueError, match=message):
        model(torch.randn(*shape))


def test_non_multiple_of_patch_size_needs_padding() -> None:
    model = _tiny(dynamic_img_size=True)
    with pytest.raises(ValueError, match=re.escape("not a multiple of the patch size 16x16")):
        model(torch.randn(1, 3, 200, 224))
    padded = _tiny(dynamic_img_size=True, dynamic_img_pad=True)
    assert padded(torch.randn(1, 3, 200, 224)).shape == (1, 1000)


def test_construction_options() -> None:
    model = dr.create_model(
        "deit_small_patch16_224",
        num_classes=10,
        img_size=(160, 320),
        in_chans=1,
        drop_rate=0.1,
        drop_path_rate=0.2,
    )
    assert model.patch_embed.grid_size == (10, 20) and model.pos_embed.shape == (1, 201, 384)
    assert model.patch_embed.proj.in_channels == 1
    assert model(torch.randn(2, 1, 160, 320)).shape == (2, 10)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert model.head_drop.p == 0.1
    with pytest.raises(ValueError, match="pretrained=True"):
        dr.create_model("deit_tiny_patch16_224", weights="x.pth")
