"""DeiT as a segmentation_models_pytorch encoder, used the way smp users use encoders: in_channels, local and
"imagenet" weights, save/load in a new process, DeepLabV3/V3+ at output stride 16. Forward and backward each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

smp = pytest.importorskip("segmentation_models_pytorch", reason="needs segmentation_models_pytorch")

import deit_registry  # noqa: E402
from deit_registry import DeiT  # noqa: E402
from deit_registry.errors import DeiTRegistryError  # noqa: E402
from deit_registry.variants import VARIANTS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "deit_tiny_patch16_224"
DECODER = dict(decoder_channels=(32, 16, 16, 8, 8))


@pytest.fixture(autouse=True)
def registered():
    deit_registry.register_smp_encoders()
    yield
    deit_registry.register_smp_encoders()  # the next test starts from the defaults


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A random deit_tiny checkpoint (timm/official layout), as model.safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    sd = {k: v.contiguous() for k, v in DeiT(**VARIANTS[NAME].model_kwargs()).state_dict().items()}
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file(sd, str(path))
    return path, sd


def _train_step(model: torch.nn.Module, x: torch.Tensor, classes: int) -> torch.Tensor:
    out = model(x)
    assert out.shape == (x.shape[0], classes, *x.shape[2:])
    F.cross_entropy(out, torch.randint(0, classes, (x.shape[0], *x.shape[2:]))).backward()
    grad = model.encoder.pyramid.backbone.patch_embed.proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    return out


def test_unet_defaults_and_unsupported_depth() -> None:
    assert NAME in deit_registry.register_smp_encoders()
    unet = smp.Unet(NAME, encoder_weights=None, classes=2, **DECODER)
    assert unet.encoder.out_channels == [3, 0, 48, 96, 192, 192]
    _train_step(unet, torch.randn(2, 3, 64, 96), 2)
    with pytest.raises(ValueError, match="encoder_depth=5"):
        smp.Unet(NAME, encoder_weights=None, encoder_depth=4, decoder_channels=(8, 8, 8, 8))


@pytest.mark.parametrize("in_channels", [1, 4])
def test_in_channels_random_init(in_channels: int) -> None:
    unet = smp.Unet(NAME, encoder_weights=None, in_channels=in_channels, classes=2, **DECODER)
    assert unet.encoder.out_channels[0] == in_channels
    assert unet.encoder.pyramid.backbone.patch_embed.proj.weight.shape[1] == in_channels
    _train_step(unet, torch.randn(2, in_channels, 32, 64), 2)
    with pytest.raises(ValueError, match="input channels"):
        unet(torch.randn(1, 3, 32, 32))  # the wrong channel count is named, not a conv shape error


def test_local_weights_with_in_channels(checkpoint) -> None:
    path, sd = checkpoint
    deit_registry.register_smp_encoders(pretrained=True, weights=str(path))
    rgb = smp.Unet(NAME, encoder_weights=None, classes=2, **DECODER)
    torch.testing.assert_close(
        rgb.encoder.pyramid.backbone.blocks[3].mlp.fc1.weight, sd["blocks.3.mlp.fc1.weight"]
    )
    grey = smp.Unet(NAME, encoder_weights=None, in_channels=1, classes=2, **DECODER)
    proj = grey.encoder.pyramid.backbone.patch_embed.proj
    # The loaded RGB filters summed: a grey image gives the response the RGB model gives to it repeated.
    torch.testing.assert_close(proj.weight, sd["patch_embed.proj.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(proj.bias, sd["patch_embed.proj.bias"])
    _train_step(grey, torch.randn(1, 1, 32, 32), 2)

    deit_registry.register_smp_encoders(pretrained=True, weights=str(path))
    with pytest.raises(
        DeiTRegistryError
    ):  # tiny weights cannot go into the small model: an error, not garbage
        smp.Unet("deit_small_patch16_224", encoder_weights=None, **DECODER)
    with pytest.raises(ValueError, match="pretrained=True"):
        deit_registry.register_smp_encoders(weights=str(path))
        smp.Unet(NAME, encoder_weights=None, **DECODER)


def test_backbone_checkpoint_into_encoder_drops_only_pruned_parts(checkpoint) -> None:
    _, sd = checkpoint
    enc = smp.encoders.get_encoder(NAME, weights=None, indices=None)
    enc.load_state_dict(sd)  # what smp does with encoder_weights="imagenet"
    torch.testing.assert_close(enc.pyramid.backbone.pos_embed, sd["pos_embed"])
    bad = dict(sd)
    bad["blocks.0.attn.qkv.weight"] = bad["blocks.0.attn.qkv.weight"][:10]
    before = enc.pyramid.backbone.blocks[1].attn.qkv.weight.clone()
    with pytest.raises(DeiTRegistryError):
        enc.load_state_dict(bad)
    torch.testing.assert_close(enc.pyramid.backbone.blocks[1].attn.qkv.weight, before)  # nothing half-loaded
    # The encoder's own state dict still round-trips as a plain module's does.
    enc2 = smp.encoders.get_encoder(NAME, weights=None)
    enc2.load_state_dict(enc.state_dict())
    torch.testing.assert_close(enc2.pyramid.backbone.pos_embed, sd["pos_embed"])


@pytest.mark.parametrize("arch", ["DeepLabV3", "DeepLabV3Plus"])
def test_deeplab_at_output_stride_16(arch: str) -> None:
    cls = getattr(smp, arch)
    model = cls(NAME, encoder_weights=None, encoder_output_stride=16, classes=3, decoder_channels=16)
    assert model.encoder.output_stride == 16
    x = torch.randn(2, 3, 64, 80)
    feats = model.encoder(x)
    assert [f.shape[-2:] for f in feats[2:]] == [(16, 20), (8, 10), (4, 5), (4, 5)]  # strides 4, 8, 16, 16
    _train_step(model, x, 3)
    with pytest.raises(ValueError, match="encoder_output_stride=16"):
        cls(NAME, encoder_weights=None, encoder_output_stride=8)


def _fake_hub_cache(root: Path, repo_id: str, files: dict[str, Path | str]) -> None:
    """A huggingface_hub cache holding ``repo_id`` at revision main, as a finished download leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, content in files.items():
        if isinstance(content, Path):
            (snap / name).write_bytes(content.read_bytes())
        else:
            (snap / name).write_text(content)


def test_imagenet_weights_and_from_pretrained_in_a_new_process(checkpoint, tmp_path: Path) -> None:
    path, sd = checkpoint
    torch.manual_seed(0)
    unet = smp.Unet(NAME, encoder_weights=None, classes=2, **DECODER).eval()
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        torch.save({"x": x, "y": unet(x)}, tmp_path / "io.pt")
    unet.save_pretrained(tmp_path / "saved")

    hub = tmp_path / "hub"
    cfg = json.dumps({"architecture": NAME, "num_classes": 1000})
    _fake_hub_cache(hub, VARIANTS[NAME].weights.hf_hub_id, {"model.safetensors": path, "config.json": cfg})
    code = textwrap.dedent(
        f"""
        import torch, segmentation_models_pytorch as smp
        import deit_registry
        from safetensors.torch import load_file
        try:
            smp.from_pretrained({str(tmp_path / "saved")!r})
        except KeyError as e:
            print("unregistered:", "Wrong encoder name" in str(e))
        deit_registry.register_smp_encoders()
        model = smp.from_pretrained({str(tmp_path / "saved")!r}).eval()
        io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
        with torch.no_grad():
            torch.testing.assert_close(model(io["x"]), io["y"], rtol=0, atol=1e-6)
        print("round trip ok")
        net = smp.Unet({NAME!r}, encoder_weights="imagenet", classes=2, decoder_channels=(32, 16, 16, 8, 8))
        sd = load_file({str(path)!r})
        bb = net.encoder.pyramid.backbone
        assert torch.equal(bb.blocks[11].attn.qkv.weight, sd["blocks.11.attn.qkv.weight"])
        assert torch.equal(bb.cls_token, sd["cls_token"])
        net(torch.randn(1, 3, 32, 32)).sum().backward()
        grey = smp.Unet({NAME!r}, in_channels=1, classes=2, decoder_channels=(32, 16, 16, 8, 8))  # "imagenet"
        w = grey.encoder.pyramid.backbone.patch_embed.proj.weight
        torch.testing.assert_close(w, sd["patch_embed.proj.weight"].sum(1, keepdim=True))
        grey(torch.randn(1, 1, 32, 32)).sum().backward()
        print("imagenet ok")
        """
    )
    env = dict(os.environ, HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if not ln.startswith("Loading weights")]  # smp's own message
    assert lines == ["unregistered: True", "round trip ok", "imagenet ok"], r.stdout
