"""Adapting weights on load and saving them (issue 4, points 5, 6, 7): num_classes, img_size (also
non-square), in_chans, distilled <-> plain; save_pretrained in timm's layout and the conversion command."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import deit_registry as dr
from deit_registry import resample_pos_embed, weights
from deit_registry.deit import build_deit
from deit_registry.errors import DistillationMismatchError

TINY, TINY_D = "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"


@pytest.fixture(scope="module")
def plain():
    torch.manual_seed(0)
    return build_deit(TINY).eval()


@pytest.fixture(scope="module")
def distilled():
    torch.manual_seed(1)
    return build_deit(TINY_D).eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory, plain, distilled) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("adapt")
    torch.save({"model": plain.state_dict()}, d / "plain.pth")
    torch.save({"model": distilled.state_dict()}, d / "distilled.pth")
    return {"plain": d / "plain.pth", "distilled": d / "distilled.pth"}


def _backbone_equal(model: torch.nn.Module, ref: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    sd = model.state_dict()
    for k, v in ref.state_dict().items():
        if k.startswith(("head.", "head_dist.", *skip)):
            continue
        assert torch.equal(sd[k], v), k


@pytest.mark.parametrize("num_classes", [10, 0])
def test_other_num_classes_drops_heads_with_a_message(ckpts, distilled, num_classes):
    model_heads = "head: 10 classes, head_dist: 10 classes" if num_classes else "none"
    message = rf"dropped the checkpoint's classifier \(head: 1000 classes, head_dist: 1000 classes\) .*\({model_heads}\)"
    with pytest.warns(UserWarning, match=message):
        model = dr.create_model(TINY_D, pretrained=True, weights=ckpts["distilled"], num_classes=num_classes)
    _backbone_equal(model, distilled)
    out = model.eval()(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, num_classes or 192)
    if num_classes:
        assert model.head.weight.shape == (10, 192) and not model.head.weight.is_meta


def test_matching_heads_load_without_warning(ckpts, plain):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = dr.create_model(TINY, pretrained=True, weights=ckpts["plain"])
    assert torch.equal(model.head.weight, plain.head.weight)


@pytest.mark.parametrize("name", [TINY, TINY_D])
def test_img_size_non_square_resamples_pos_embed(ckpts, plain, distilled, name):
    ref = distilled if name == TINY_D else plain
    prefix = 2 if name == TINY_D else 1
    model = dr.create_model(
        name, pretrained=True, weights=ckpts["distilled" if name == TINY_D else "plain"], img_size=(160, 240)
    )
    expected = resample_pos_embed(ref.pos_embed.detach(), (10, 15), (14, 14), prefix)
    assert model.pos_embed.shape == (1, prefix + 150, 192)
    assert torch.equal(model.pos_embed.detach(), expected)
    assert torch.equal(model.pos_embed[:, :prefix], ref.pos_embed[:, :prefix])  # prefix tokens kept
    _backbone_equal(model, ref, skip=("pos_embed",))
    assert model.eval()(torch.randn(1, 3, 160, 240)).shape == (1, 1000)


def test_in_chans_one_sums_and_more_repeat(ckpts, plain):
    grey = dr.create_model(TINY, pretrained=True, weights=ckpts["plain"], in_chans=1).eval()
    w = plain.patch_embed.proj.weight
    assert torch.equal(grey.patch_embed.proj.weight, w.sum(dim=1, keepdim=True))
    x = torch.rand(1, 1, 224, 224)
    with torch.no_grad():  # a grey image gives what the RGB model gives for the same image in 3 channels
        torch.testing.assert_close(grey(x), plain(x.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-5)
    five = dr.create_model(TINY, pretrained=True, weights=ckpts["plain"], in_chans=5)
    expected = torch.cat([w, w[:, :2]], dim=1) * (3 / 5)
    torch.testing.assert_close(five.patch_embed.proj.weight, expected)
    _backbone_equal(five, plain, skip=("patch_embed.proj.weight",))


def test_distilled_into_plain_refused_unless_asked(ckpts, distilled):
    with pytest.raises(DistillationMismatchError) as e:
        dr.create_model(TINY, pretrained=True, weights=ckpts["distilled"])
    msg = str(e.value)
    assert str(ckpts["distilled"]) in msg and "convert_distillation=True" in msg and "_distilled_" in msg
    model = dr.create_model(
        TINY, pretrained=True, weights=ckpts["distilled"], convert_distillation=True
    ).eval()
    assert torch.equal(model.head.weight, distilled.head.weight)  # the class head
    assert torch.equal(
        model.pos_embed, torch.cat([distilled.pos_embed[:, :1], distilled.pos_embed[:, 2:]], dim=1)
    )
    assert model.dist_token is None
    _backbone_equal(model, distilled, skip=("pos_embed", "dist_token"))


def test_plain_into_distilled_refused_unless_asked(ckpts, plain):
    with pytest.raises(DistillationMismatchError, match="convert_distillation=True"):
        dr.create_model(TINY_D, pretrained=True, weights=ckpts["plain"])
    model = dr.create_model(TINY_D, pretrained=True, weights=ckpts["plain"], convert_distillation=True).eval()
    assert torch.equal(model.dist_token, plain.cls_token)
    assert torch.equal(model.head_dist.weight, plain.head.weight)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():  # dist token = cls token with the same position embedding: identical token outputs
        tokens = model.forward_features(x)
    torch.testing.assert_close(tokens[:, 0], tokens[:, 1], atol=1e-6, rtol=1e-6)
    # load_checkpoint refuses too and leaves the model as it was
    target = dr.create_model(TINY_D)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(DistillationMismatchError):
        weights.load_checkpoint(target, ckpts["plain"])
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


# ---------------------------------------------------------------------------------------- saving, convert
def test_save_pretrained_is_read_by_timm_and_by_us(tmp_path, distilled):
    import timm

    out = weights.save_pretrained(distilled, tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == TINY_D and config["num_classes"] == 1000
    assert config["pretrained_cfg"]["classifier"] == ["head", "head_dist"]
    assert config["pretrained_cfg"]["input_size"] == [3, 224, 224] and "layer_norm_eps" not in config
    x = torch.randn(1, 3, 224, 224)
    ours = dr.create_model(TINY_D, pretrained=True, weights=out).eval()
    from_timm = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        ref = distilled(x)
        assert torch.equal(ours(x), ref)
        torch.testing.assert_close(from_timm(x), ref, atol=1e-5, rtol=1e-5)


def test_save_pretrained_records_size_and_eps(tmp_path, plain):
    model = dr.create_model(TINY, img_size=(160, 240), num_classes=5, norm_eps=1e-12)
    config = json.loads((weights.save_pretrained(model, tmp_path / "s") / "config.json").read_text())
    assert config["model_args"] == {"img_size": [160, 240]} and config["num_classes"] == 5
    assert config["layer_norm_eps"] == 1e-12
    again = dr.create_model(TINY, pretrained=True, weights=tmp_path / "s", img_size=(160, 240), num_classes=5)
    assert again.norm.eps == 1e-12
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


def test_convert_api_and_command(tmp_path, ckpts, distilled):
    out = weights.convert(ckpts["distilled"], tmp_path / "api")
    assert json.loads((out / "config.json").read_text())["architecture"] == TINY_D
    model = dr.create_model(TINY_D, pretrained=True, weights=out)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in distilled.state_dict().items())
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deit_registry.weights",
            "convert",
            str(ckpts["distilled"]),
            str(tmp_path / "cli"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cli" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "deit_registry.weights",
            "convert",
            str(tmp_path / "missing.pth"),
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and "missing.pth" in bad.stderr and "does not exist" in bad.stderr
