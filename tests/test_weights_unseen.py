"""Faults the shapes cannot show: a checkpoint that would load without error and give other outputs, or break
later. A flipped bit, overlapping byte ranges, a self-overlapping tensor, a config that names another head count
or grid, a single-head distilled checkpoint, wrapped models and transformers 5's in-memory names.

Small models throughout (the tiny variant at depth 2)."""

from __future__ import annotations

import json
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

import deit_registry as dr
from deit_registry import resample_pos_embed, weights
from deit_registry.errors import CheckpointMismatchError, CorruptCheckpointError
from deit_registry.weights import formats

TINY, TINY_D = "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"
SMALL = {"depth": 2}


def _model(name: str = TINY, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return dr.create_model(name, **{**SMALL, **kwargs}).eval()


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    return _model()


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def _rewrite_safetensors_header(file: Path, edit) -> None:
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    file.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n :])


# ---------------------------------------------------------------------------------------------- damaged bytes
def test_a_flipped_bit_in_a_pth_is_corrupt_and_changes_nothing(tmp_path, reference):
    """torch.load never checks the zip members' CRC-32: without our check one tensor would load changed."""
    file = tmp_path / "w.pth"
    torch.save({"model": reference.state_dict()}, file)
    with zipfile.ZipFile(file) as z:
        member = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(file.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26 : member.header_offset + 30])
    data[member.header_offset + 30 + name_len + extra_len + member.file_size // 2] ^= 0x01
    file.write_bytes(bytes(data))
    model = _model(seed=1)
    before = _snapshot(model)
    with pytest.raises(CorruptCheckpointError, match="CRC-32"):
        weights.load_checkpoint(model, file)
    assert _unchanged(model, before)
    with pytest.raises(CorruptCheckpointError, match="CRC-32"):
        dr.create_model(TINY, pretrained=True, weights=file, **SMALL)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated
def test_a_torchscript_archive_is_named_as_such(tmp_path):
    file = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(file))
    with pytest.raises(CorruptCheckpointError, match=r"TorchScript archive .*state_dict\(\)"):
        formats.read_checkpoint(file)


def test_overlapping_safetensors_entries_are_refused(tmp_path, reference):
    """Two tensors over the same bytes would load as one; safetensors itself refuses such a file too."""
    weights.save_pretrained(reference, tmp_path, name=TINY)
    file = tmp_path / "model.safetensors"

    def overlap(header):
        start = header["head.weight"]["data_offsets"][0]
        header["head.bias"]["data_offsets"] = [start, start + 4 * 1000]

    _rewrite_safetensors_header(file, overlap)
    with pytest.raises(CorruptCheckpointError, match="'head.bias' and 'head.weight' overlap|overlap"):
        formats.read_checkpoint(file)


def test_an_expanded_tensor_becomes_a_parameter_of_its_own(tmp_path, reference):
    """``expand`` saves one row for all; as a parameter every in-place update (an optimizer step) would fail."""
    sd = dict(reference.state_dict())
    sd["head.weight"] = torch.randn(1, 192).expand(1000, 192)
    torch.save(sd, tmp_path / "expanded.pth")
    model = dr.create_model(TINY, pretrained=True, weights=tmp_path / "expanded.pth", **SMALL)
    assert model.head.weight.is_contiguous()
    torch.testing.assert_close(model.head.weight, sd["head.weight"], rtol=0, atol=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(1, 3, 224, 224)).sum().backward()
    optimizer.step()  # RuntimeError on a tensor whose elements share memory


@pytest.mark.parametrize(
    "config, match",
    [
        ({"patch_size": 0}, "patch_size must be a positive integer"),
        ({"image_size": "224"}, "image_size must be"),
        ({"image_size": [224]}, "image_size must be"),
        ({"pretrained_cfg": "x"}, "pretrained_cfg must be an object"),
        ("deep", "not valid JSON"),
    ],
)
def test_bad_config_values_are_corrupt_checkpoints(tmp_path, reference, config, match):
    weights.save_pretrained(reference, tmp_path, name=TINY)
    text = "[" * 100_000 + "]" * 100_000 if config == "deep" else json.dumps(config)
    (tmp_path / "config.json").write_text(text)
    model = _model(seed=1, img_size=256)
    before = _snapshot(model)
    with pytest.raises(CorruptCheckpointError, match=match):
        weights.load_checkpoint(model, tmp_path)
    assert _unchanged(model, before)


def test_a_safetensors_header_nested_too_deep_is_corrupt(tmp_path):
    header = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    (tmp_path / "deep.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CorruptCheckpointError, match="damaged or truncated safetensors"):
        formats.read_checkpoint(tmp_path / "deep.safetensors")


# ----------------------------------------------------------------------------- what the config says, not shapes
@pytest.mark.parametrize(
    "entry, match",
    [
        ({"num_attention_heads": 12}, "num_attention_heads=12 but the model has 3 heads"),
        ({"hidden_act": "gelu_new"}, "hidden_act='gelu_new'"),
    ],
)
def test_a_transformers_config_naming_another_architecture_is_refused(tmp_path, reference, entry, match):
    """A ViT of width 192 with 12 heads has deit_tiny's shapes, but not its outputs."""
    weights.save_pretrained(reference, tmp_path, name=TINY)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **entry}))
    with pytest.raises(CheckpointMismatchError, match=match):
        dr.create_model(TINY, pretrained=True, weights=tmp_path, **SMALL)
    with pytest.raises(CheckpointMismatchError, match=match):
        weights.convert(tmp_path, tmp_path / "out", TINY)


def test_a_grid_the_config_states_is_resampled_even_with_the_same_count(tmp_path):
    """16x20 and 20x16 grids have the same number of positions: the config tells them apart."""
    source = _model(img_size=(256, 320))
    weights.save_pretrained(source, tmp_path, name=TINY)
    model = dr.create_model(TINY, pretrained=True, weights=tmp_path, img_size=(320, 256), **SMALL)
    expected = resample_pos_embed(source.pos_embed.detach(), (20, 16), (16, 20), 1)
    torch.testing.assert_close(model.pos_embed.detach(), expected, rtol=0, atol=0)
    # Without a config the same count is taken as the model's grid (a checkpoint saved at that size).
    torch.save(source.state_dict(), tmp_path / "no_config.pth")
    same = dr.create_model(
        TINY, pretrained=True, weights=tmp_path / "no_config.pth", img_size=(256, 320), **SMALL
    )
    assert torch.equal(same.pos_embed, source.pos_embed)


def test_the_published_weights_are_resampled_to_a_grid_of_as_many_positions(tmp_path, reference, monkeypatch):
    """The official file has no config, but its size is the variant's: 14x14 into 7x28 is resampled."""
    torch.save({"model": reference.state_dict()}, tmp_path / "official.pth")
    monkeypatch.setattr(weights.sources, "resolve", lambda *args, **kwargs: tmp_path / "official.pth")
    model = dr.create_model(TINY, pretrained=True, img_size=(112, 448), **SMALL)
    expected = resample_pos_embed(reference.pos_embed.detach(), (7, 28), (14, 14), 1)
    torch.testing.assert_close(model.pos_embed.detach(), expected, rtol=0, atol=0)


def test_a_non_square_checkpoint_without_a_config_names_img_size(tmp_path):
    torch.save(_model(img_size=(160, 240)).state_dict(), tmp_path / "ns.pth")
    with pytest.raises(CheckpointMismatchError, match=r"img_size=\(height, width\)"):
        dr.create_model(TINY, pretrained=True, weights=tmp_path / "ns.pth", **SMALL)
    dr.create_model(TINY, pretrained=True, weights=tmp_path / "ns.pth", img_size=(160, 240), **SMALL)


def test_a_single_head_distilled_checkpoint_needs_head_classifier(tmp_path):
    """transformers' DeiTForImageClassification: a distillation token, one classifier on the class token."""
    source = _model(TINY_D, head="classifier")
    sd = source.state_dict()
    assert "dist_token" in sd and "head_dist.weight" not in sd
    torch.save(sd, tmp_path / "one_head.pth")
    with pytest.raises(CheckpointMismatchError, match="head='classifier'"):
        dr.create_model(TINY_D, pretrained=True, weights=tmp_path / "one_head.pth", **SMALL)
    model = dr.create_model(
        TINY_D, pretrained=True, weights=tmp_path / "one_head.pth", head="classifier", **SMALL
    )
    x = torch.randn(2, 3, 224, 224)
    assert torch.equal(model.eval()(x), source(x))
    with pytest.raises(CheckpointMismatchError, match="head='classifier'"):
        weights.convert(tmp_path / "one_head.pth", tmp_path / "out")


# ------------------------------------------------------------------------------------ wrapped models and names
def test_load_checkpoint_into_wrapped_models(tmp_path, reference):
    torch.save({"model": reference.state_dict()}, tmp_path / "w.pth")
    wrapped = torch.nn.DataParallel(_model(seed=1))  # DistributedDataParallel has the same public .module
    weights.load_checkpoint(wrapped, tmp_path / "w.pth")
    assert _unchanged(wrapped.module, _snapshot(reference))
    compiled = torch.compile(_model(seed=1))
    with pytest.raises(CheckpointMismatchError, match="before torch.compile"):
        weights.load_checkpoint(compiled, tmp_path / "w.pth")


def test_a_checkpoint_saved_from_a_compiled_model_loads(tmp_path, reference):
    torch.save({f"_orig_mod.{k}": v for k, v in reference.state_dict().items()}, tmp_path / "compiled.pth")
    model = dr.create_model(TINY, pretrained=True, weights=tmp_path / "compiled.pth", **SMALL)
    assert _unchanged(model, _snapshot(reference))


def test_transformers_in_memory_state_dict_matches_its_outputs():
    """transformers 5 renames its modules in memory (``layers.N.attention.q_proj``...; its files keep the old
    names); either generation's ``state_dict()`` loads with its outputs."""
    transformers = pytest.importorskip("transformers")
    config = transformers.DeiTConfig(
        hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768, num_labels=10
    )
    torch.manual_seed(0)
    hf = transformers.DeiTForImageClassificationWithTeacher(config).eval()
    model = dr.create_model(TINY_D, num_classes=10, norm_eps=config.layer_norm_eps, **SMALL).eval()
    weights.load_checkpoint(model, hf.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(pixel_values=x).logits, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------- saving
def test_save_pretrained_with_average_pooling_reads_back_in_timm(tmp_path):
    """timm normalises after an average pool unless ``fc_norm=False``; ours pools the normalised tokens."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = dr.create_model(TINY, global_pool="avg").eval()
    weights.save_pretrained(model, tmp_path, name=TINY)
    theirs = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), rtol=0, atol=1e-5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        weights.save_pretrained(_model(TINY_D, global_pool="avg"), tmp_path / "distilled", name=TINY_D)
    assert any("timm cannot build this model" in str(w.message) for w in caught)


def test_a_fine_tuned_checkpoint_keeps_its_classes_unless_told_otherwise(tmp_path):
    """Without ``num_classes=`` the checkpoint's classifier is the model's (not a random 1000-class head);
    with another ``num_classes=`` the heads are dropped with a warning, as documented."""
    source = _model(num_classes=3)
    torch.save({"model": source.state_dict()}, tmp_path / "ft3.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = dr.create_model(TINY, pretrained=True, weights=tmp_path / "ft3.pth", **SMALL).eval()
    assert model.num_classes == 3
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(model(x), source(x))
    with pytest.warns(UserWarning, match="dropped the checkpoint's classifier"):
        dr.create_model(TINY, pretrained=True, weights=tmp_path / "ft3.pth", num_classes=1000, **SMALL)
