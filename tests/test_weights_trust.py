"""Issue 12, items 5-9 (file side): the model owns its memory, loads are all or nothing, damaged files raise the
documented errors, options are checked before any byte moves, and timm's EMA checkpoints load.

Small models throughout (the tiny variant at depth 2) so every test takes seconds."""

from __future__ import annotations

import builtins
import copy
import json
import math
import os
import pickle
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from weights_server import Route, WeightsServer

import deit_registry as dr
from deit_registry import weights
from deit_registry.errors import (
    CheckpointMismatchError,
    CheckpointNotReadableError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    WeightsError,
)
from deit_registry.weights import conversion, formats

TINY = "deit_tiny_patch16_224"
SMALL = {"depth": 2}  # every model here: the tiny variant with two blocks


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return dr.create_model(TINY, **SMALL).eval()


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    return _model(0)


@pytest.fixture(scope="module")
def other() -> torch.nn.Module:
    return _model(1)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return set(now) == set(before) and all(torch.equal(now[k], v) for k, v in before.items())


# ------------------------------------------------------------------------------ item 5: the model owns its memory
@pytest.mark.parametrize("fmt", ["safetensors", "pth", "legacy.pth"])
def test_loaded_model_survives_rewrite_and_truncation_of_its_file(tmp_path, reference, other, x, fmt):
    from safetensors.torch import save_file

    path = tmp_path / f"w.{fmt}"

    def write(model: torch.nn.Module) -> None:
        sd = model.state_dict()
        if fmt == "safetensors":
            save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        else:
            torch.save({"model": sd}, path, _use_new_zipfile_serialization=fmt == "pth")

    write(reference)
    # in a child process: a memory-mapped model would die of SIGBUS once the file is truncated
    code = f"""
import os, torch, deit_registry as dr
from deit_registry import weights
from safetensors.torch import save_file
path = {str(path)!r}
x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
m = dr.create_model({TINY!r}, pretrained=True, weights=path, depth=2).eval()
m2 = weights.load_checkpoint(dr.create_model({TINY!r}, depth=2).eval(), path)
with torch.no_grad():
    a, a2 = m(x), m2(x)
torch.manual_seed(99)
junk = {{k: torch.randn_like(v) for k, v in m.state_dict().items()}}
if path.endswith(".safetensors"):
    save_file(junk, path)               # rewritten in place, same size and layout
else:
    torch.save({{"model": junk}}, path)
with open(path, "r+b") as f:
    f.truncate(64)                      # then truncated
with torch.no_grad():
    b, b2 = m(x), m2(x)
assert torch.equal(a, b) and torch.equal(a2, b2), "the loaded model changed with its file"
print("OK")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != -signal.SIGBUS, "SIGBUS: the model still maps its file"
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr[-2000:]


def test_safetensors_reader_matches_the_library_and_rejects_bad_ranges(tmp_path, reference):
    from safetensors.torch import load_file, save_file

    sd = {k: v.contiguous() for k, v in reference.state_dict().items()}
    sd["half"] = torch.randn(3, 5).half()
    sd["bf16"] = torch.randn(4).bfloat16()
    sd["empty"] = torch.zeros(0, 4)
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    ours, lib = formats._read_safetensors(path), load_file(str(path))
    assert set(ours) == set(lib)
    for k in lib:
        assert ours[k].dtype == lib[k].dtype and torch.equal(ours[k], lib[k]), k
    data = path.read_bytes()
    for cut in (len(data) - 1, 8 + 40, 20):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(CorruptCheckpointError, match="damaged or truncated"):
            formats.read_checkpoint(bad)
    # a header claiming petabytes (or more than int64 can count) is refused before anything is allocated
    for shape in ([1 << 40, 1 << 40], [1 << 62, 1 << 62, 4]):
        header = json.dumps({"cls_token": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}).encode()
        huge = tmp_path / "huge.safetensors"
        huge.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
        with pytest.raises(CorruptCheckpointError, match="needs .* bytes, offsets say 4"):
            formats.read_checkpoint(huge)


def test_new_model_never_shares_memory_with_the_callers_tensors_or_between_keys(tmp_path, reference):
    """A state dict passed in is often another model's parameters, and a checkpoint may tie two keys to one
    tensor: the new model copies those (as load_state_dict does), so training it changes nothing else."""
    teacher = copy.deepcopy(reference)
    student = dr.create_model(TINY, pretrained=True, weights=teacher.state_dict(), **SMALL).eval()
    ptrs = {p.untyped_storage().data_ptr() for p in teacher.parameters()}
    assert not any(p.untyped_storage().data_ptr() in ptrs for p in student.parameters())
    before = _snapshot(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    assert _unchanged(teacher, before)

    torch.manual_seed(2)
    distilled = dr.create_model("deit_tiny_distilled_patch16_224", **SMALL)
    sd = distilled.state_dict()
    sd["head_dist.weight"], sd["head_dist.bias"] = sd["head.weight"], sd["head.bias"]  # tied, saved once
    torch.save(sd, tmp_path / "tied.pth")
    model = dr.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=True, weights=tmp_path / "tied.pth", **SMALL
    )
    assert torch.equal(model.head_dist.weight, model.head.weight)
    assert model.head_dist.weight.data_ptr() != model.head.weight.data_ptr()
    with torch.no_grad():
        model.head.weight.add_(1.0)
    assert torch.equal(model.head_dist.weight, sd["head.weight"])


def test_values_beyond_float16_are_refused_not_loaded_as_infinities(reference):
    model = copy.deepcopy(reference).half()
    sd = dict(reference.state_dict())
    sd["head.bias"] = sd["head.bias"].clone()
    sd["head.bias"][0] = 1e6  # finite in fp32, infinite in fp16
    before = _snapshot(model)
    with pytest.raises(CheckpointMismatchError, match="head.bias hold values beyond .* torch.float16"):
        weights.load_checkpoint(model, sd)
    assert _unchanged(model, before)


def test_a_checkpoint_without_a_classifier_says_the_head_is_not_loaded(reference, other):
    headless = {k: v for k, v in reference.state_dict().items() if not k.startswith("head.")}
    with pytest.warns(UserWarning, match=r"has no classifier, so the model's \(head: 1000 classes\) keeps"):
        dr.create_model(TINY, pretrained=True, weights=headless, **SMALL)
    model = copy.deepcopy(other)
    with pytest.warns(UserWarning, match="has no classifier"):
        weights.load_checkpoint(model, headless)
    assert torch.equal(model.head.weight, other.head.weight)
    assert torch.equal(model.blocks[0].attn.qkv.weight, reference.blocks[0].attn.qkv.weight)
    features = dr.create_model(TINY, pretrained=True, weights=headless, num_classes=0, **SMALL)  # no warning
    assert features.num_classes == 0


# ------------------------------------------------------------------------------ item 6: all or nothing
def _bad_cases(sd: dict[str, torch.Tensor]) -> dict[str, object]:
    def with_(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        out = dict(sd)
        out[key] = value
        return out

    last = sorted(sd)[-1]  # a key loaded late: a partial load would already have changed the earlier ones
    nan = sd[last].clone()
    nan.view(-1)[0] = math.nan
    inf = sd[last].clone()
    inf.view(-1)[-1] = math.inf
    return {
        "meta": with_(last, torch.empty(sd[last].shape, device="meta")),
        "sparse": with_("blocks.1.mlp.fc2.weight", sd["blocks.1.mlp.fc2.weight"].to_sparse()),
        "int": with_(last, sd[last].round().to(torch.int32)),
        "complex": with_(last, sd[last].to(torch.complex64)),
        "nan": with_(last, nan),
        "inf": with_(last, inf),
        "shape": with_(last, sd[last][..., :1]),
        "missing": {k: v for k, v in sd.items() if k != last},
        "unexpected": with_("blocks.9.attn.qkv.weight", sd["blocks.0.attn.qkv.weight"]),
    }


@pytest.mark.parametrize(
    "case", ["meta", "sparse", "int", "complex", "nan", "inf", "shape", "missing", "unexpected"]
)
def test_bad_state_dict_leaves_model_bit_identical(reference, other, case):
    bad = _bad_cases(reference.state_dict())[case]
    model = copy.deepcopy(other)
    before = _snapshot(model)
    with pytest.raises(WeightsError):
        weights.load_checkpoint(model, bad)
    assert _unchanged(model, before)
    # create_model refuses the same data instead of returning a model whose forward fails
    with pytest.raises(WeightsError):
        dr.create_model(TINY, pretrained=True, weights=bad, **SMALL)


@pytest.mark.parametrize("eps", ["1e-6", -1e-6, 0, float("nan"), float("inf"), True, None, [1e-6], 2.0])
def test_bad_layer_norm_eps_is_refused_before_anything_changes(tmp_path, reference, other, eps):

    from safetensors.torch import save_file

    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file(
        {k: v.contiguous() for k, v in reference.state_dict().items()}, str(folder / "model.safetensors")
    )
    (folder / "config.json").write_text(json.dumps({"layer_norm_eps": eps}))
    model = copy.deepcopy(other)
    before = _snapshot(model)
    eps_before = [m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    with pytest.raises(CorruptCheckpointError, match="layer_norm_eps") as info:
        weights.load_checkpoint(model, folder)
    assert "config.json" in str(info.value)
    assert _unchanged(model, before)
    assert [m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)] == eps_before
    with pytest.raises(CorruptCheckpointError, match="layer_norm_eps"):
        dr.create_model(TINY, pretrained=True, weights=str(folder), **SMALL)


def test_good_layer_norm_eps_and_fp16_weights_still_load(tmp_path, reference, x):

    from safetensors.torch import save_file

    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file(
        {k: v.half().contiguous() for k, v in reference.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    (folder / "config.json").write_text(json.dumps({"layer_norm_eps": 1e-12}))
    model = dr.create_model(TINY, pretrained=True, weights=str(folder), **SMALL).eval()
    assert model.norm_eps == 1e-12 and all(p.dtype == torch.float32 for p in model.parameters())
    want = {k: v.half().float() for k, v in reference.state_dict().items()}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in want.items())


# ------------------------------------------------------------------------------ item 7: documented errors
def test_legacy_pth_truncated_to_100_bytes_is_corrupt(tmp_path, reference):
    path = tmp_path / "legacy.pth"
    torch.save({"model": reference.state_dict()}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match="damaged or truncated") as info:
        formats.read_checkpoint(path)
    assert str(path) in str(info.value) and "download it again" in str(info.value)


@pytest.mark.parametrize("layout", ["legacy", "zip"])
def test_pickle_cut_inside_a_class_name_is_corrupt_not_unsafe(tmp_path, reference, layout):
    import zipfile

    sd = {"cls_token": reference.state_dict()["cls_token"]}
    path = tmp_path / f"{layout}.pth"
    torch.save({"model": sd}, path, _use_new_zipfile_serialization=layout == "zip")
    data = path.read_bytes()
    if layout == "legacy":
        cut = data.index(b"_rebuild_tensor") + 5  # inside "torch._utils\n_rebuild_tensor_v2"
        path.write_bytes(data[:cut])
    else:  # a zip whose data.pkl stops inside the class name (the archive itself intact)
        with zipfile.ZipFile(path) as z:
            members = {n: z.read(n) for n in z.namelist()}
        pkl = next(n for n in members if n.endswith("data.pkl"))
        members[pkl] = members[pkl][: members[pkl].index(b"_rebuild_tensor") + 5]
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            for n, b in members.items():
                z.writestr(n, b)
    with pytest.raises(CorruptCheckpointError, match="damaged or truncated"):
        formats.read_checkpoint(path)


def test_complete_pickle_that_needs_code_stays_unsafe(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"model": Evil()}, protocol=2))
    with pytest.raises(UnsafeCheckpointError):
        formats.read_checkpoint(path)


def _deny(monkeypatch: pytest.MonkeyPatch, denied: Path) -> None:
    """Simulate an unreadable path for root, whom chmod does not stop (the real case is tested below)."""
    real_open, real_listdir = builtins.open, os.listdir

    def guarded_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).resolve().is_relative_to(denied):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    def guarded_listdir(path="."):
        if Path(path).resolve().is_relative_to(denied):
            raise PermissionError(13, "Permission denied", str(path))
        return real_listdir(path)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "listdir", guarded_listdir)


@pytest.mark.parametrize("target", ["file", "folder"])
def test_permission_denied_is_a_documented_error(tmp_path, reference, monkeypatch, target):
    from safetensors.torch import save_file

    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file(
        {k: v.contiguous() for k, v in reference.state_dict().items()}, str(folder / "model.safetensors")
    )
    source = folder / "model.safetensors" if target == "file" else folder
    _deny(monkeypatch, source)
    with pytest.raises(CheckpointNotReadableError, match="permission denied") as info:
        weights.load_checkpoint(_model(2), source)
    assert "chmod" in str(info.value)


@pytest.mark.skipif(
    os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user: root ignores chmod"
)
def test_permission_denied_real_chmod(tmp_path, reference):
    from safetensors.torch import save_file

    folder = tmp_path / "ckpt"
    folder.mkdir()
    file = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(file))
    try:
        file.chmod(0)
        with pytest.raises(CheckpointNotReadableError, match="permission denied"):
            formats.read_checkpoint(file)
        file.chmod(0o600)
        folder.chmod(0)
        with pytest.raises(CheckpointNotReadableError, match="permission denied"):
            formats.read_checkpoint(folder)
    finally:
        folder.chmod(0o700)
        file.chmod(0o600)


# ------------------------------------------------------------------------------ item 8: options before bytes
@pytest.mark.parametrize(
    "options", [{"no_such_option": 1}, {"depht": 2}, {"global_pool": "bogus"}, {"drop_rate": 2.0}]
)
def test_bad_options_fail_before_any_request(tmp_path, reference, options, monkeypatch):
    server = WeightsServer()
    try:
        body = (tmp_path / "w.pth").as_posix()
        torch.save({"model": reference.state_dict()}, body)
        url = server.add("/w.pth", Route(Path(body).read_bytes()))
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
        monkeypatch.setenv("DEIT_REGISTRY_URL_ROOT", server.root + "/")
        monkeypatch.setenv("HF_ENDPOINT", server.root)  # a Hub-first order asks the stand-in too
        for source in (url, None):  # an explicit URL, and the official file (served by the stand-in root)
            with pytest.raises((TypeError, ValueError)):
                dr.create_model(TINY, pretrained=True, weights=source, **options)
        monkeypatch.setenv("DEIT_REGISTRY_OFFLINE", "1")  # offline: the option error, not OfflineError
        with pytest.raises((TypeError, ValueError)) as info:
            dr.create_model(TINY, pretrained=True, **options)
        assert "offline" not in str(info.value).lower()
        assert sum(server.gets.values()) == 0, dict(server.gets)
    finally:
        server.close()


# ------------------------------------------------------------------------------ item 9: timm's EMA checkpoints
def test_timm_train_checkpoint_state_dict_and_state_dict_ema(tmp_path, x):
    torch.manual_seed(5)  # full depth here: convert builds the variant as published
    reference, other = dr.create_model(TINY).eval(), dr.create_model(TINY).eval()
    path = tmp_path / "checkpoint-3.pth.tar"
    # timm's train.py (CheckpointSaver): epoch, arch, state_dict, optimizer, version, args, state_dict_ema
    torch.save(
        {
            "epoch": 3,
            "arch": TINY,
            "state_dict": other.state_dict(),
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
            "version": 2,
            "state_dict_ema": reference.state_dict(),
        },
        path,
    )
    raw = dr.create_model(TINY, pretrained=True, weights=str(path)).eval()
    ema = dr.create_model(TINY, pretrained=True, weights=str(path), ema=True).eval()
    with torch.no_grad():
        assert torch.equal(raw(x), other(x)) and torch.equal(ema(x), reference(x))
    # the command line's convert --ema too
    dst = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "deit_registry", "convert", str(path), str(dst), "--ema", "--name", TINY],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    converted = dr.create_model(TINY, pretrained=True, weights=str(dst)).eval()
    with torch.no_grad():
        assert torch.equal(converted(x), reference(x))


def test_ema_requested_but_absent_lists_the_keys(tmp_path, other):
    path = tmp_path / "no_ema.pth"
    torch.save({"state_dict": other.state_dict(), "epoch": 1, "optimizer": {}}, path)
    with pytest.raises(CorruptCheckpointError) as info:
        dr.create_model(TINY, pretrained=True, weights=str(path), ema=True, **SMALL)
    msg = str(info.value)
    for word in ("model_ema", "state_dict_ema", "epoch", "optimizer", "state_dict", "ema=True"):
        assert word in msg, (word, msg)


def test_ema_and_wrapped_weights_beside_metadata_load(tmp_path, reference, other, x):
    """A step count or version kept inside the EMA (or model) dict is metadata, not a reason to refuse it."""
    path = tmp_path / "ema_meta.pth"
    ema = {**reference.state_dict(), "num_updates": 1200}
    torch.save({"model": {**other.state_dict(), "version": 2}, "model_ema": ema}, path)
    for use_ema, want in ((True, reference), (False, other)):
        model = dr.create_model(TINY, pretrained=True, weights=str(path), ema=use_ema, **SMALL).eval()
        assert torch.equal(model(x), want(x))


# ------------------------------------------------------------------------------ one of each
def test_one_variant_guesser_and_one_list_of_weight_files():
    from deit_registry.variants import VARIANTS
    from deit_registry.weights import saving

    assert formats.WEIGHT_FILE_NAMES[0] == "model.safetensors"
    assert not hasattr(saving, "_guess_by_width") and not hasattr(saving, "variant_of")
    for name in VARIANTS:
        with torch.device("meta"):
            sd = dr.create_model(name).state_dict()
        assert conversion.guess_variant(sd) == name
    with torch.device("meta"):  # another resolution of a 224 variant: the 224 one
        sd = dr.create_model(TINY, img_size=256).state_dict()
    assert conversion.guess_variant(sd) == TINY
    assert conversion.guess_variant({"cls_token": torch.zeros(1, 1, 100)}) is None


def test_check_tensors_accepts_other_float_dtypes(reference):
    sd = {k: v.to(torch.bfloat16) for k, v in reference.state_dict().items()}
    conversion.check_tensors(sd, "x")  # no error
    with pytest.raises(CorruptCheckpointError, match="int64"):
        conversion.check_tensors({"a": torch.tensor([1, 2])}, "x")
