"""Checkpoint formats and safety (issue 4, points 4, 8, 9, 12): every file format and wrapper loads; a pickle
that would run code is refused unexecuted; corrupt files and mismatched weights raise documented errors that
name the file and the fix, and leave the model untouched."""

from __future__ import annotations

import argparse
import copy
import pickle
from pathlib import Path

import pytest
import torch

import deit_registry as dr
from deit_registry import weights
from deit_registry.deit import build_deit
from deit_registry.errors import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    WeightsError,
)
from deit_registry.weights import formats

TINY = "deit_tiny_patch16_224"


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return build_deit(TINY).eval()


@pytest.fixture(scope="module")
def ema():
    torch.manual_seed(7)
    return build_deit(TINY).eval()


@pytest.fixture(scope="module")
def other():
    torch.manual_seed(1)
    return build_deit(TINY).eval()


def _fresh(other) -> torch.nn.Module:
    """A model with other weights than the files' (a deep copy is much cheaper than a random init)."""
    return copy.deepcopy(other)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, reference, ema) -> dict[str, Path]:
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("formats")
    sd = reference.state_dict()
    out = {
        "official.pth": {"model": sd},
        "plain_state_dict.pth": sd,
        "pytorch_model.bin": sd,
        "ddp.pth": {"state_dict": {"module." + k: v for k, v in sd.items()}},
        "training_checkpoint.pth": {
            "model": sd,
            "model_ema": ema.state_dict(),
            "optimizer": {
                "state": {0: {"exp_avg": torch.zeros(3)}},
                "param_groups": [{"lr": 1e-3, "params": [0]}],
            },
            "lr_scheduler": {"last_epoch": 3},
            "epoch": 299,
            "scaler": {"scale": 65536.0},
            "args": argparse.Namespace(model=TINY, lr=5e-4),
        },
    }
    paths = {}
    for name, obj in out.items():
        torch.save(obj, d / name)
        paths[name] = d / name
    torch.save({"model": sd}, d / "legacy.pth", _use_new_zipfile_serialization=False)
    paths["legacy.pth"] = d / "legacy.pth"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "weights.safetensors"))
    paths["weights.safetensors"] = d / "weights.safetensors"
    (d / "folder").mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "folder" / "model.safetensors"))
    paths["folder"] = d / "folder"
    # a file whose extension lies: safetensors bytes named .pth (formats are sniffed, not guessed from names)
    (d / "actually_safetensors.pth").write_bytes((d / "weights.safetensors").read_bytes())
    paths["actually_safetensors.pth"] = d / "actually_safetensors.pth"
    return paths


def _same(model: torch.nn.Module, ref: torch.nn.Module) -> bool:
    a, b = model.state_dict(), ref.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "name",
    [
        "official.pth",
        "plain_state_dict.pth",
        "pytorch_model.bin",
        "ddp.pth",
        "training_checkpoint.pth",
        "legacy.pth",
        "weights.safetensors",
        "folder",
        "actually_safetensors.pth",
    ],
)
def test_every_format_loads(files, reference, name):
    model = dr.create_model(TINY, pretrained=True, weights=files[name])
    assert _same(model, reference)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference(x))


def test_training_checkpoint_ema(files, ema):
    assert _same(
        dr.create_model(TINY, pretrained=True, weights=files["training_checkpoint.pth"], ema=True), ema
    )
    with pytest.raises(CorruptCheckpointError, match="model_ema"):
        dr.create_model(TINY, pretrained=True, weights=files["official.pth"], ema=True)


def test_load_checkpoint_in_place(files, reference, other):
    model = _fresh(other)
    assert weights.load_checkpoint(model, files["weights.safetensors"]) is model
    assert _same(model, reference)
    target = _fresh(other)
    weights.load_checkpoint(target, reference.state_dict())  # a state dict is a source too
    assert _same(target, reference)


def test_new_model_takes_the_loaded_tensors_without_copying(files, monkeypatch):
    """Built on the meta device, the model's parameters are the (memory-mapped) tensors read from the file."""
    seen = {}
    real = formats.read_checkpoint

    def spy(*args, **kwargs):
        seen["ckpt"] = real(*args, **kwargs)
        return seen["ckpt"]

    monkeypatch.setattr(formats, "read_checkpoint", spy)
    for name in ("official.pth", "weights.safetensors"):
        model = dr.create_model(TINY, pretrained=True, weights=files[name])
        sd = seen["ckpt"].state_dict
        for key in ("blocks.0.mlp.fc1.weight", "pos_embed", "head.weight"):
            assert model.state_dict()[key].data_ptr() == sd[key].data_ptr(), (name, key)
        assert not any(p.is_meta for p in model.parameters())
        # the mapping is private: training the model (in-place updates) never writes to the cached file
        data = files[name].read_bytes()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        assert files[name].read_bytes() == data


# ------------------------------------------------------------------------------------------------ safety
class _Evil:
    """Unpickling this would run code that writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("kind", ["torch-zip", "raw-pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, reference, other, kind):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    if kind == "torch-zip":
        torch.save({"model": reference.state_dict(), "payload": _Evil(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"model": _Evil(marker)}, protocol=2))
    assert not marker.exists()
    model = _fresh(other)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsafeCheckpointError) as e:
        weights.load_checkpoint(model, path)
    msg = str(e.value)
    assert str(path) in msg and "nothing in it was executed" in msg and ".safetensors" in msg
    assert not marker.exists()
    assert _same_tensors(model, before)
    with pytest.raises(UnsafeCheckpointError):
        dr.create_model(TINY, pretrained=True, weights=path)
    assert not marker.exists()


def _same_tensors(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------- corrupt files
def _truncate(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


@pytest.mark.parametrize(
    "case", ["truncated.pth", "truncated.safetensors", "garbage.pth", "html_error_page.bin"]
)
def test_corrupt_files(tmp_path, files, other, case):
    if case == "truncated.pth":
        path = _truncate(files["official.pth"], tmp_path / case)
    elif case == "truncated.safetensors":
        path = _truncate(files["weights.safetensors"], tmp_path / case, 0.7)
    elif case == "garbage.pth":
        path = tmp_path / case
        path.write_bytes(bytes(range(256)) * 100)
    else:
        path = tmp_path / case
        path.write_bytes(b"<!DOCTYPE html><html><body>503 Service Unavailable</body></html>")
    model = _fresh(other)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CorruptCheckpointError) as e:
        weights.load_checkpoint(model, path)
    msg = str(e.value)
    assert str(path) in msg and ("download it again" in msg or "Delete it" in msg)
    assert _same_tensors(model, before)


# ----------------------------------------------------------------------------------------------- mismatches
def test_wrong_variant_names_the_right_one(tmp_path, other):
    with torch.device("meta"):  # the small variant's shapes; zeros are enough to fail on
        small = build_deit("deit_small_patch16_224")
    path = tmp_path / "small.pth"
    torch.save({"model": {k: torch.zeros(v.shape) for k, v in small.state_dict().items()}}, path)
    model = _fresh(other)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as e:
        weights.load_checkpoint(model, path)
    msg = str(e.value)
    assert (
        str(path) in msg
        and "shape mismatch" in msg
        and "deit_small_patch16_224" in msg
        and "Nothing was loaded" in msg
    )
    assert _same_tensors(model, before)
    with pytest.raises(CheckpointMismatchError, match="create that model instead"):
        dr.create_model(TINY, pretrained=True, weights=path)


@pytest.mark.parametrize("case", ["missing", "unexpected"])
def test_missing_or_unexpected_keys(tmp_path, reference, other, case):
    sd = dict(reference.state_dict())
    if case == "missing":
        del sd["blocks.3.mlp.fc1.weight"]
    else:
        sd["blocks.12.mlp.fc1.weight"] = torch.zeros(768, 192)
    path = tmp_path / f"{case}.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = _fresh(other)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as e:
        weights.load_checkpoint(model, path)
    msg = str(e.value)
    key = "blocks.3.mlp.fc1.weight" if case == "missing" else "blocks.12.mlp.fc1.weight"
    assert str(path) in msg and f"{case} key" in msg and key in msg and "complete DeiT checkpoint" in msg
    assert _same_tensors(model, before)
    assert isinstance(e.value, WeightsError)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "numbers.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CorruptCheckpointError, match="no tensors"):
        dr.create_model(TINY, pretrained=True, weights=path)
