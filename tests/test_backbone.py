"""DeiT as a backbone: features at every depth, any input size, attention maps, the feature pyramid."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deit_registry as dr
from deit_registry import DeiT, resample_pos_embed
from deit_registry.inspection import (
    attention_maps,
    attention_probabilities,
    attention_to_heatmaps,
    class_token_heatmaps,
)
from deit_registry.pyramid import FeaturePyramid, default_pyramid_indices

DEPTH = 4
CFG = dict(img_size=32, patch_size=8, embed_dim=32, depth=DEPTH, num_heads=2, num_classes=5)


def tiny(distilled: bool = False, **kwargs) -> DeiT:
    torch.manual_seed(0)
    return DeiT(**{**CFG, "distilled": distilled, **kwargs}).eval()


def manual_tokens(model: DeiT, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output [B, prefix + patches, D], by running the pieces by hand."""
    b = x.shape[0]
    tokens = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    prefix = [model.cls_token.expand(b, -1, -1)]
    if model.dist_token is not None:
        prefix.append(model.dist_token.expand(b, -1, -1))
    h = torch.cat([*prefix, tokens], dim=1) + model.pos_embed
    outs = []
    for blk in model.blocks:
        h = blk(h)
        outs.append(h)
    return outs


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "distilled"])
def model(request):
    return tiny(request.param)


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------- features at every depth
@torch.no_grad()
def test_forward_features_and_head(model, x):
    npt = model.num_prefix_tokens
    ref = model.norm(manual_tokens(model, x)[-1])
    feats = model.forward_features(x)
    assert feats.shape == (2, npt + 16, 32)
    torch.testing.assert_close(feats, ref)
    pooled = model.forward_head(feats, pre_logits=True)
    expected = (feats[:, 0] + feats[:, 1]) / 2 if model.distilled else feats[:, 0]
    torch.testing.assert_close(pooled, expected)
    assert model.forward_head(feats).shape == (2, 5)
    torch.testing.assert_close(model.forward_head(feats), model(x))


@torch.no_grad()
def test_forward_intermediates_values_and_prefix_tokens(model, x):
    npt = model.num_prefix_tokens
    ref = manual_tokens(model, x)
    final, inter = model.forward_intermediates(x, indices=[0, -1], return_prefix_tokens=True)
    torch.testing.assert_close(final, model.norm(ref[-1]))
    assert len(inter) == 2
    for (spatial, prefix), blk_out in zip(inter, (ref[0], ref[-1]), strict=True):
        assert spatial.shape == (2, 32, 4, 4)  # NCHW, stride 8 here (patch 8)
        assert prefix.shape == (2, npt, 32)
        torch.testing.assert_close(prefix[:, 0], blk_out[:, 0])  # class token first
        if model.distilled:
            torch.testing.assert_close(prefix[:, 1], blk_out[:, 1])  # then the distillation token
        torch.testing.assert_close(spatial.flatten(2).transpose(1, 2), blk_out[:, npt:])


@torch.no_grad()
def test_forward_intermediates_options(model, x):
    npt = model.num_prefix_tokens
    ref = manual_tokens(model, x)
    everything = model.forward_intermediates(x, intermediates_only=True)
    assert len(everything) == DEPTH
    last2 = model.forward_intermediates(x, indices=2, output_fmt="NLC", norm=True, intermediates_only=True)
    assert [t.shape for t in last2] == [(2, 16, 32)] * 2
    torch.testing.assert_close(last2[0], model.norm(ref[2])[:, npt:])
    torch.testing.assert_close(last2[1], model.norm(ref[3])[:, npt:])
    early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(early[0], everything[1])
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[DEPTH])
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=DEPTH + 1)


@torch.no_grad()
def test_get_intermediate_layers_dino_style(model, x):
    npt = model.num_prefix_tokens
    ref = manual_tokens(model, x)
    out = model.get_intermediate_layers(x, n=2)
    assert isinstance(out, tuple) and len(out) == 2
    torch.testing.assert_close(out[1], ref[-1][:, npt:])
    maps = model.get_intermediate_layers(x, n=[1, 3], reshape=True, return_prefix_tokens=True, norm=True)
    (m1, p1), (m3, p3) = maps
    assert m1.shape == (2, 32, 4, 4) and p3.shape == (2, npt, 32)
    torch.testing.assert_close(p3, model.norm(ref[3])[:, :npt])
    torch.testing.assert_close(m1.flatten(2).transpose(1, 2), model.norm(ref[1])[:, npt:])
    # DINOv2's spelling: (patch tokens, class token [B, D])
    ((tokens, cls),) = model.get_intermediate_layers(x, n=1, return_class_token=True, norm=True)
    torch.testing.assert_close(cls, model.norm(ref[-1])[:, 0])
    torch.testing.assert_close(tokens, model.norm(ref[-1])[:, npt:])


@torch.no_grad()
def test_prune_intermediate_layers(x):
    for distilled in (False, True):
        model = tiny(distilled)
        before = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        assert model.prune_intermediate_layers([0, 2], prune_norm=True) == [0, 2]
        assert len(model.blocks) == 3 and isinstance(model.norm, nn.Identity)
        assert model.num_classes == 0 and not any(n.startswith("head") for n, _ in model.named_parameters())
        after = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        for a, b in zip(before, after, strict=True):
            torch.testing.assert_close(a, b)
        assert model.global_pool == "" and model(x).shape == model.forward_features(x).shape  # timm: tokens


def test_feature_info_lists_every_block():
    model = dr.create_model("deit_tiny_distilled_patch16_224")
    assert model.feature_info == [dict(module=f"blocks.{i}", num_chs=192, reduction=16) for i in range(12)]
    assert model.get_submodule("blocks.11") is model.blocks[11]


# ------------------------------------------------------------------------------------------- any resolution
def test_non_square_img_size_at_creation():
    model = DeiT(
        img_size=(512, 1024), patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=3
    ).eval()
    assert model.patch_embed.grid_size == (32, 64) and model.pos_embed.shape == (1, 1 + 32 * 64, 32)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 512, 1024)).shape == (1, 3)
        maps = model.forward_intermediates(torch.randn(1, 3, 512, 1024), intermediates_only=True)
    assert maps[0].shape == (1, 32, 32, 64)
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        model(torch.randn(1, 3, 1024, 512))


@pytest.mark.parametrize("distilled", [False, True])
def test_set_input_size_resamples_bicubic_antialias_and_keeps_prefix(distilled):
    model = DeiT(img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2, distilled=distilled).eval()
    npt = model.num_prefix_tokens
    old = model.pos_embed.detach().clone()
    dynamic = DeiT(img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2, distilled=distilled)
    dynamic = dynamic.eval()
    dynamic.load_state_dict(model.state_dict())
    dynamic.dynamic_img_size = True  # same weights, resampling on the fly
    dynamic.patch_embed.strict_img_size = False
    model.set_input_size((512, 1024))
    assert model.patch_embed.grid_size == (32, 64)
    new = model.pos_embed.detach()
    assert torch.equal(new[:, :npt], old[:, :npt])  # class/distillation embeddings are never resampled
    grid = old[:, npt:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(32, 64), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(new[:, npt:], expected.permute(0, 2, 3, 1).reshape(1, 32 * 64, 32))
    x = torch.randn(1, 3, 512, 1024)
    with torch.no_grad():
        assert torch.equal(model(x), dynamic(x))


@pytest.mark.parametrize("distilled", [False, True])
def test_dynamic_img_size_native_bit_identical_and_any_size(distilled, x):
    fixed = tiny(distilled)
    dynamic = tiny(distilled, dynamic_img_size=True)
    dynamic.load_state_dict(fixed.state_dict())
    with torch.no_grad():
        assert torch.equal(dynamic(x), fixed(x))
        assert torch.equal(dynamic.forward_features(x), fixed.forward_features(x))
        for a, b in zip(
            dynamic.forward_intermediates(x, intermediates_only=True),
            fixed.forward_intermediates(x, intermediates_only=True),
            strict=True,
        ):
            assert torch.equal(a, b)
        other = torch.randn(2, 3, 48, 80)
        assert dynamic(other).shape == (2, 5)
        maps = dynamic.forward_intermediates(other, indices=1, intermediates_only=True)
        assert maps[0].shape == (2, 32, 6, 10)
        # the same as a fixed model rebuilt for that size
        fixed.set_input_size((48, 80))
        torch.testing.assert_close(dynamic(other), fixed(other), rtol=0, atol=0)


def test_resample_pos_embed_prefix_untouched_and_identity_at_native():
    pos = torch.randn(1, 2 + 16, 8)
    assert resample_pos_embed(pos, (4, 4), (4, 4), 2) is pos
    out = resample_pos_embed(pos, (6, 2), (4, 4), 2)
    assert out.shape == (1, 2 + 12, 8) and torch.equal(out[:, :2], pos[:, :2])


def test_dynamic_img_pad_pads_to_a_patch_multiple(x):
    model = tiny(dynamic_img_size=True, dynamic_img_pad=True)
    odd = torch.randn(1, 3, 50, 70)
    padded = F.pad(odd, (0, 72 - 70, 0, 56 - 50))  # patch 8
    with torch.no_grad():
        assert torch.equal(model(odd), model(padded))
        assert model.forward_intermediates(odd, intermediates_only=True)[0].shape == (1, 32, 7, 9)
    strict = tiny(dynamic_img_size=True)
    with pytest.raises(ValueError, match="dynamic_img_pad=True"):
        strict(odd)


# ----------------------------------------------------------------------------------------- attention maps
def hand_attention(block, tokens: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) from the block's own qkv weights."""
    attn = block.attn
    h = block.norm1(tokens)
    d = h.shape[-1]
    w, b = attn.qkv.weight, attn.qkv.bias
    q, k = h @ w[:d].T + b[:d], h @ w[d : 2 * d].T + b[d : 2 * d]
    split = lambda t: t.reshape(t.shape[0], t.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)  # noqa: E731
    q, k = split(q), split(k)
    return torch.softmax(q @ k.transpose(-2, -1) / attn.head_dim**0.5, dim=-1)


@torch.no_grad()
def test_attention_maps_equal_hand_softmax(model, x):
    fused = model(x)
    with attention_maps(model) as rec:
        recorded = model(x)
        maps = rec.maps
    assert torch.equal(recorded, fused)  # recording leaves the forward as it is
    n = model.num_prefix_tokens + 16
    assert [m.shape for m in maps] == [(2, 2, n, n)] * DEPTH
    inputs = [model._embed(x), *manual_tokens(model, x)[:-1]]
    for blk, tokens, m in zip(model.blocks, inputs, maps, strict=True):
        torch.testing.assert_close(m, hand_attention(blk, tokens))
        torch.testing.assert_close(m.sum(-1), torch.ones(2, 2, n))
    # the hooks are gone and the maps released: a later forward records nothing
    assert rec.layers == [b.attn for b in model.blocks]
    model(x)
    with pytest.raises(RuntimeError, match="forward pass"):
        _ = rec.maps
    with attention_maps(model) as rec, pytest.raises(RuntimeError, match="forward pass"):
        _ = rec.maps


def test_attention_maps_never_mix_two_passes(model, x):
    """A pass that stops early records the first layers only: the deeper maps of an older pass are dropped."""
    with attention_maps(model) as rec:
        model(x)
        model.forward_intermediates(torch.flip(x, dims=[0]), indices=[0], stop_early=True)
        with pytest.raises(RuntimeError, match=r"stopped before attention layer\(s\) \[1"):
            _ = rec.maps
        model(x)
        assert len(rec.maps) == len(model.blocks)


def test_attention_maps_are_detached(model, x):
    """With autograd on, the maps keep no graph alive and the model's gradients are those without recording."""
    model(x).sum().backward()
    expected = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    with attention_maps(model) as rec:
        model(x).sum().backward()
        maps = rec.maps
    for k, p in model.named_parameters():
        assert torch.equal(p.grad, expected[k]), k
    model.zero_grad()
    assert not any(m.requires_grad or m.grad_fn is not None for m in maps)
    with torch.no_grad():
        inputs = [model._embed(x), *manual_tokens(model, x)[:-1]]
    for blk, tokens, m in zip(model.blocks, inputs, maps, strict=True):
        torch.testing.assert_close(m, attention_probabilities(blk.attn, blk.norm1(tokens)))


@torch.no_grad()
def test_class_token_heatmaps(model, x):
    heat = class_token_heatmaps(model, x)
    assert heat.shape == (2, 2, 32, 32)
    with attention_maps(model) as rec:
        model(x)
        last = rec.maps[-1]
    npt = model.num_prefix_tokens
    cls_to_patches = last[:, :, 0, npt:].reshape(2, 2, 4, 4)
    torch.testing.assert_close(heat[..., ::8, ::8], cls_to_patches)
    torch.testing.assert_close(heat[..., 7::8, 7::8], cls_to_patches)  # each patch fills its 8x8 square
    if model.distilled:
        dist_heat = class_token_heatmaps(model, x, token_index=1)
        torch.testing.assert_close(dist_heat[..., ::8, ::8], last[:, :, 1, npt:].reshape(2, 2, 4, 4))
    with pytest.raises(ValueError, match="prefix token"):
        attention_to_heatmaps(last, (4, 4), npt, 8, token_index=npt)
    # Attention rows of the prefix tokens alone (what a prefix-only last block would compute) give the same maps.
    prefix_rows = last[:, :, :npt]
    torch.testing.assert_close(attention_to_heatmaps(prefix_rows, (4, 4), npt, 8), heat)


def test_heatmaps_crop_padding():
    model = tiny(dynamic_img_size=True, dynamic_img_pad=True)
    assert class_token_heatmaps(model, torch.randn(1, 3, 50, 70)).shape == (1, 2, 50, 70)


# ------------------------------------------------------------------------------------------ feature pyramid
def test_pyramid_shapes_feature_info_and_errors():
    backbone = DeiT(img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2, dynamic_img_size=True)
    pyramid = FeaturePyramid(backbone, out_chans=16)
    assert pyramid.indices == default_pyramid_indices(4) == [0, 1, 2, 3]
    assert pyramid.feature_info.reduction() == [4, 8, 16, 32]
    assert pyramid.feature_info.channels() == [16] * 4
    with torch.no_grad():
        outs = pyramid(torch.randn(1, 3, 64, 128))
    assert [tuple(o.shape) for o in outs] == [(1, 16, 16, 32), (1, 16, 8, 16), (1, 16, 4, 8), (1, 16, 2, 4)]
    assert default_pyramid_indices(12) == [2, 5, 8, 11]
    plain = FeaturePyramid(DeiT(img_size=64, embed_dim=32, depth=12, num_heads=2), prune=False)
    assert plain.feature_info.channels() == [8, 16, 32, 32]
    with pytest.raises(ValueError, match="4 blocks"):
        FeaturePyramid(DeiT(img_size=64, embed_dim=32, depth=4, num_heads=2), indices=[1, 2, 3])


def test_pyramid_levels_resample_the_block_maps():
    backbone = tiny(dynamic_img_size=True)
    reference = tiny()
    pyramid = FeaturePyramid(backbone, indices=[0, 1, 2, 3]).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        levels = pyramid(x)
        reference.set_input_size(64)
        maps = reference.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True)
        torch.testing.assert_close(levels[0], pyramid.stages[0](maps[0]))  # two 2x transposed convs
        torch.testing.assert_close(levels[1], pyramid.stages[1](maps[1]))  # one 2x transposed conv
    assert levels[0].shape[-2:] == (32, 32) and levels[1].shape[-2:] == (16, 16)
    torch.testing.assert_close(levels[2], maps[2])  # the block map itself
    torch.testing.assert_close(levels[3], F.max_pool2d(maps[3], 2))


@pytest.mark.parametrize("indices", [[3, 3, 3, 3], [1, 1, 2, 3], [3, 2, 1, 0]])
def test_pyramid_levels_follow_their_indices_repeated_or_in_any_order(indices):
    """Each level reads the block it names (ViTDet's simple pyramid reads the last block four times), though
    forward_intermediates returns each block once, in block order."""
    pyramid = FeaturePyramid(tiny(dynamic_img_size=True), indices=indices).eval()
    reference = tiny()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        levels = pyramid(x)
        reference.set_input_size(64)
        maps = reference.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True)
        assert len(levels) == 4
        for level, i, stage in zip(levels, indices, pyramid.stages):
            torch.testing.assert_close(level, stage(maps[i]))


class TinyUNet(nn.Module):
    """A UNet-style decoder over the pyramid: upsample the deepest map, concatenate the next skip, conv."""

    def __init__(self, pyramid: FeaturePyramid, classes: int) -> None:
        super().__init__()
        self.pyramid = pyramid
        chs = pyramid.feature_info.channels()
        self.ups = nn.ModuleList(
            [nn.Conv2d(chs[i + 1] + chs[i], chs[i], 3, padding=1) for i in reversed(range(len(chs) - 1))]
        )
        self.head = nn.Conv2d(chs[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.pyramid(x)
        y = feats[-1]
        for conv, skip in zip(self.ups, reversed(feats[:-1]), strict=True):
            y = F.interpolate(y, size=skip.shape[-2:], mode="nearest")
            y = F.relu(conv(torch.cat([y, skip], dim=1)))
        return F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)


def test_pyramid_unet_decoder_trains_end_to_end():
    torch.manual_seed(0)
    backbone = DeiT(img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2, dynamic_img_size=True)
    net = TinyUNet(FeaturePyramid(backbone), classes=3)
    x = torch.randn(2, 3, 64, 96)
    target = torch.randint(0, 3, (2, 64, 96))
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    patch_before = backbone.patch_embed.proj.weight.detach().clone()
    losses = []
    for _ in range(5):
        out = net(x)
        assert out.shape == (2, 3, 64, 96)
        loss = F.cross_entropy(out, target)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in net.parameters())  # no unused parameter (DDP-safe)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(backbone.patch_embed.proj.weight, patch_before)


@torch.no_grad()
def test_forward_intermediates_equal_timms_own(model, x):
    """Same weights in timm's VisionTransformer / VisionTransformerDistilled: same intermediates API results."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    cls = VisionTransformerDistilled if model.distilled else VisionTransformer
    theirs = cls(**CFG).eval()
    theirs.load_state_dict(model.state_dict())
    for kwargs in (
        dict(indices=[0, 2], return_prefix_tokens=True, norm=True),
        dict(indices=2, output_fmt="NLC"),
        dict(indices=None, stop_early=True, intermediates_only=True),
    ):
        ours, ref = model.forward_intermediates(x, **kwargs), theirs.forward_intermediates(x, **kwargs)
        torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(
        model.get_intermediate_layers(x, n=2, reshape=True, return_prefix_tokens=True, norm=True),
        theirs.get_intermediate_layers(x, n=2, reshape=True, return_prefix_tokens=True, norm=True),
    )
