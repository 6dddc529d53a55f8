"""Proof of fidelity: random-init reference models saved in each published format load into ours with outputs
equal to the reference's (fp32, max abs diff < 1e-5).

* timm's own classes (constructed directly: ``timm.create_model("deit_*")`` resolves to ours once
  deit_registry is imported) -> the official ``.pth`` layout ``{"model": state_dict}``;
* transformers ``DeiTForImageClassificationWithTeacher`` (distilled) and ``ViTForImageClassification`` (plain)
  -> ``save_pretrained`` folder (safetensors + config.json with layer_norm_eps 1e-12).

All eight variants at depth 2 (every width, head count, token layout and resolution, kept quick), plus one
full-depth model per family (plain and distilled).
"""

from __future__ import annotations

import pytest
import torch

import deit_registry as dr
from deit_registry.variants import VARIANTS

# (variant, depth): the eight at depth 2, and a plain and a distilled model at full depth.
CASES = [pytest.param(n, 2, id=f"{n}-depth2") for n in VARIANTS] + [
    pytest.param(n, 12, id=f"{n}-full") for n in ("deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224")
]


def _input(name: str) -> torch.Tensor:
    size = VARIANTS[name].arch.img_size
    g = torch.Generator().manual_seed(123)
    return torch.randn(1 if size > 224 else 2, 3, size, size, generator=g)


@pytest.mark.parametrize("name, depth", CASES)
def test_timm_model_as_official_pth(tmp_path, name, depth):
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    a = VARIANTS[name].arch
    cls = VisionTransformerDistilled if a.distilled else VisionTransformer
    torch.manual_seed(0)
    ref = cls(
        img_size=a.img_size, patch_size=16, embed_dim=a.embed_dim, depth=depth, num_heads=a.num_heads
    ).eval()
    path = tmp_path / f"{name}-random.pth"
    torch.save({"model": ref.state_dict()}, path)
    ours = dr.create_model(name, pretrained=True, weights=path, depth=depth).eval()
    x = _input(name)
    with torch.no_grad():
        diff = (ours(x) - ref(x)).abs().max().item()
    assert diff < 1e-5, diff


def _transformers_model(name: str, depth: int):
    from transformers import (
        DeiTConfig,
        DeiTForImageClassificationWithTeacher,
        ViTConfig,
        ViTForImageClassification,
    )

    a = VARIANTS[name].arch
    shape = dict(
        hidden_size=a.embed_dim,
        num_hidden_layers=depth,
        num_attention_heads=a.num_heads,
        intermediate_size=int(a.embed_dim * a.mlp_ratio),
        image_size=a.img_size,
        patch_size=a.patch_size,
        num_labels=1000,
    )
    torch.manual_seed(0)
    if a.distilled:
        return DeiTForImageClassificationWithTeacher(DeiTConfig(**shape)).eval()
    return ViTForImageClassification(ViTConfig(**shape)).eval()


@pytest.mark.parametrize("name, depth", CASES)
def test_transformers_save_pretrained_folder(tmp_path, name, depth):
    ref = _transformers_model(name, depth)
    assert ref.config.layer_norm_eps == 1e-12
    ref.save_pretrained(tmp_path)
    ours = dr.create_model(name, pretrained=True, weights=tmp_path, depth=depth).eval()
    assert ours.norm.eps == 1e-12  # the eps the checkpoint was saved with (see loading.py)
    x = _input(name)
    with torch.no_grad():
        diff = (ours(x) - ref(pixel_values=x).logits).abs().max().item()
    assert diff < 1e-5, diff
