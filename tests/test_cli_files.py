"""Issue 12, item 10: the command line's file handling - 16-bit images, decompression bombs, convert's
destination, and a corrupt image under ``validate --workers``: one clear line and a non-zero exit each."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from deit_registry import cli
from deit_registry.transforms import ImageReadError, eval_transform, load_image, to_rgb

TINY = "deit_tiny_patch16_224"


def _cli(*args: str, ok: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "deit_registry", *args], capture_output=True, text=True, timeout=180
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deit-registry: error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import deit_registry as dr

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save({"model": dr.create_model(TINY).state_dict()}, path)
    return path


def _gradient16(w: int = 64, h: int = 48) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return ((xs * 1000 + ys * 37) % 65536).to(torch.int32)


# ------------------------------------------------------------------------------------------ 16-bit images
@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16bit_grey_is_scaled_not_clipped(mode):
    values = _gradient16()
    h, w = values.shape
    if mode == "I":
        img = Image.frombytes("I", (w, h), values.numpy().astype("<i4").tobytes())
    else:
        fmt = ">u2" if mode == "I;16B" else "<u2"
        img = Image.frombytes(mode, (w, h), values.numpy().astype(fmt).tobytes())
    rgb = to_rgb(img)
    got = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(h, w, 3)
    want = (values.double() / 257).round().clamp(0, 255).to(torch.uint8)
    assert (got[..., 0].int() - want.int()).abs().max() <= 1  # PIL rounds to nearest, within one step
    assert torch.equal(got[..., 0], got[..., 1]) and torch.equal(got[..., 1], got[..., 2])
    assert 0 < int(got.float().mean()) < 250, "clipped to white"
    # the eval transform scales the same way when handed the 16-bit image itself
    assert torch.equal(eval_transform(TINY)(img), eval_transform(TINY)(rgb))


def test_8bit_range_in_mode_I_is_kept():
    img = Image.frombytes("I", (4, 1), torch.tensor([0, 10, 200, 255], dtype=torch.int32).numpy().tobytes())
    assert list(to_rgb(img).convert("L").getdata()) == [0, 10, 200, 255]


def test_predict_16bit_png_equals_its_8bit_version(tmp_path, checkpoint):
    values = _gradient16(256, 240)
    h, w = values.shape
    p16, p8 = tmp_path / "g16.png", tmp_path / "g8.png"
    Image.frombytes("I;16", (w, h), values.numpy().astype("<u2").tobytes()).save(p16)
    assert Image.open(p16).mode.startswith("I")
    to_rgb(Image.open(p16)).save(p8)
    proc = _cli("predict", TINY, str(p16), str(p8), "--weights", str(checkpoint), "--json", ok=True)
    import json

    results = json.loads(proc.stdout)["results"]
    assert results[0]["predictions"] == results[1]["predictions"]


# ------------------------------------------------------------------------------------------ decompression bombs
def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG declaring ``width x height`` grey pixels (Pillow checks the size when opening, before decoding)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.mark.parametrize(
    "factor", [1.2, 2.5]
)  # over the limit: Pillow warns; over twice the limit: it raises
def test_decompression_bomb_is_one_line(tmp_path, factor):
    side = int((Image.MAX_IMAGE_PIXELS * factor) ** 0.5) + 1
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, side, side)
    with pytest.raises(ImageReadError, match="MAX_IMAGE_PIXELS"):
        load_image(bomb)
    line = _one_line_error(_cli("predict", TINY, str(bomb)))
    assert str(bomb) in line and "MAX_IMAGE_PIXELS" in line


# ------------------------------------------------------------------------------------------ convert's destination
def test_convert_refuses_existing_output_unless_force(tmp_path, checkpoint):
    dst = tmp_path / "out"
    _cli("convert", str(checkpoint), str(dst), ok=True)
    first = (dst / "model.safetensors").read_bytes()
    line = _one_line_error(_cli("convert", str(checkpoint), str(dst)))
    assert "model.safetensors" in line and "--force" in line
    assert (dst / "model.safetensors").read_bytes() == first
    _cli("convert", str(checkpoint), str(dst), "--force", ok=True)
    # a file where the folder should be
    line = _one_line_error(_cli("convert", str(checkpoint), str(checkpoint)))
    assert "not a folder" in line


def test_convert_into_read_only_destination_is_one_line(tmp_path, checkpoint, monkeypatch, capsys):
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.geteuid() != 0:  # a real read-only folder
            status = cli.main(["convert", str(checkpoint), str(ro / "out")])
        else:  # root ignores permission bits: report the folder as not writable, as the kernel would
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, m, **k: False if Path(p) == ro else real(p, m, **k))
            status = cli.main(["convert", str(checkpoint), str(ro / "out")])
    finally:
        ro.chmod(0o755)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1 and "cannot write to" in err[0] and str(ro) in err[0]
    assert not (ro / "out").exists()


# ------------------------------------------------------------------------------------------ validate --workers
def test_validate_workers_corrupt_image_names_the_file(tmp_path, checkpoint):
    data = tmp_path / "val"
    (data / "0").mkdir(parents=True)
    Image.new("RGB", (64, 64), (120, 30, 200)).save(data / "0" / "a_good.png")
    bad = data / "0" / "b_bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    line = _one_line_error(
        _cli("validate", TINY, "--data", str(data), "--workers", "2", "-q", "--weights", str(checkpoint))
    )
    assert str(bad) in line and "cannot read" in line and "DataLoader worker" not in line


# ------------------------------------------------------------------------------------------ devices and file names
@pytest.mark.parametrize(
    "device, gpus, message",
    [
        ("bogus", 0, "--device must be auto, cpu, cuda or cuda:N; got 'bogus'"),
        ("meta", 0, "got 'meta'"),
        ("cuda", 0, "(this machine has no CUDA GPU: use --device cpu); got 'cuda'"),
        ("cuda:2", 2, "(this machine has 2 CUDA GPUs: cuda:0 to cuda:1); got 'cuda:2'"),
    ],
)
def test_a_bad_device_is_one_line_before_the_weights_load(
    tmp_path, monkeypatch, capsys, device, gpus, message
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(image)
    missing = tmp_path / "missing.pth"  # loading it would be the error if the device were checked later
    assert cli.main(["predict", TINY, str(image), "--weights", str(missing), "--device", device]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deit-registry: error: --device") and message in err[0]
    assert cli._device("cuda:1" if gpus else "cpu") == ("cuda:1" if gpus else "cpu")


def test_a_file_name_that_is_not_utf8_prints_under_a_strict_stdout(tmp_path, checkpoint):
    import os

    image = tmp_path / os.fsdecode(b"bad\xff\xfename.png")
    Image.new("RGB", (32, 32), (200, 10, 10)).save(image)
    proc = subprocess.run(
        [sys.executable, "-m", "deit_registry", "predict", TINY, str(image), "--weights", str(checkpoint)],
        capture_output=True,
        timeout=180,
        env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode("ascii").startswith(f"{tmp_path}/bad\\xff\\xfename.png  ({TINY})\n")


# ------------------------------------------------------------------------------------ a fine-tuned checkpoint
def test_a_fine_tuned_checkpoint_is_used_with_its_own_classes(tmp_path):
    """A 3-class checkpoint: its trained head, not a random 1000-class one; labels, not ImageNet names."""
    import deit_registry as dr

    torch.manual_seed(0)
    model = dr.create_model(TINY, num_classes=3).eval()
    with torch.no_grad():  # ranks class 2 first for every image
        model.head.bias.copy_(torch.tensor([0.0, 10.0, 20.0]))
    torch.save({"model": model.state_dict()}, tmp_path / "ft3.pth")
    Image.new("RGB", (64, 48), (120, 30, 200)).save(tmp_path / "a.png")
    shown = _cli("predict", TINY, str(tmp_path / "a.png"), "--weights", str(tmp_path / "ft3.pth"), ok=True)
    assert "UserWarning" not in shown.stderr
    first = next(line for line in shown.stdout.splitlines() if line.startswith("1."))
    assert first.split()[1:3] == ["2", "(2)"], shown.stdout  # the label index, no ImageNet name
    for label in ("0", "2"):
        (tmp_path / "data" / label).mkdir(parents=True)
        Image.new("RGB", (64, 48), (90, 90, 90)).save(tmp_path / "data" / label / "x.png")
    args = ["validate", TINY, "--data", str(tmp_path / "data"), "--weights", str(tmp_path / "ft3.pth")]
    record = json.loads(_cli(*args, "-q", "--workers", "0", "--json", ok=True).stdout)
    assert (record["images"], record["correct_top1"], record["correct_top5"]) == (2, 1, 2)
    (tmp_path / "synsets" / "n01440764").mkdir(parents=True)  # ImageNet classes: not this model's
    Image.new("RGB", (64, 48), (90, 90, 90)).save(tmp_path / "synsets" / "n01440764" / "x.png")
    args[3] = str(tmp_path / "synsets")
    assert "synset folders" in _one_line_error(_cli(*args, "-q"))
