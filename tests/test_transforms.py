"""The evaluation transform (PIL + torch only) equals torchvision's official DeiT pipeline, bit for bit."""

from __future__ import annotations

import sys

import pytest
import torch
from PIL import Image

import deit_registry as dr
from deit_registry.transforms import EvalTransform, ImageReadError, eval_transform, load_image


def _image(size: tuple[int, int]) -> Image.Image:
    g = torch.Generator().manual_seed(size[0] * 1000 + size[1])
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.frombytes("RGB", size, bytes(pixels.flatten().tolist()))


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_base_distilled_patch16_384"])
@pytest.mark.parametrize("size", [(333, 517), (517, 333), (256, 256), (100, 90), (640, 480)])
def test_equals_torchvision(name: str, size: tuple[int, int]) -> None:
    import torchvision.transforms as T

    t = eval_transform(name)
    v = dr.VARIANTS[name].weights
    reference = T.Compose(
        [
            T.Resize(int(v.input_size[-1] / v.crop_pct), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(v.input_size[-1]),
            T.ToTensor(),
            T.Normalize(v.mean, v.std),
        ]
    )
    img = _image(size)
    assert torch.equal(t(img), reference(img))
    assert t(img).shape == (3, v.input_size[1], v.input_size[2])


def test_fields_denormalize_and_lazy_export() -> None:
    t = dr.eval_transform("deit_base_patch16_384.fb_in1k")
    assert (t.resize, t.crop, t.interpolation) == (438, (384, 384), "bicubic")
    assert t.steps()[0] == "resize the shorter side to 438 (bicubic, aspect ratio kept)"
    img = _image((400, 300))
    cropped = t.crop_image(img)
    back = (t.denormalize(t(img)) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    assert bytes(back.flatten().tolist()) == cropped.tobytes()
    with pytest.raises(ValueError, match="interpolation"):
        EvalTransform(256, (224, 224), (0.5,) * 3, (0.5,) * 3, interpolation="cubic")
    with pytest.raises(dr.UnknownModelError, match="Did you mean"):
        eval_transform("deit_tiny_patch16")


def test_load_image_errors(tmp_path) -> None:
    with pytest.raises(ImageReadError, match="not found"):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG but not really")
    with pytest.raises(ImageReadError, match="cannot read"):
        load_image(bad)
    gray = tmp_path / "gray.png"
    Image.new("L", (20, 10), 7).save(gray)
    assert load_image(gray).mode == "RGB"


def test_importing_transforms_needs_no_torch() -> None:
    import subprocess

    code = "import sys, deit_registry.transforms as t; t.eval_transform('deit_tiny_patch16_224'); sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
