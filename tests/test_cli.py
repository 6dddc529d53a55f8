"""The ``deit-registry`` command line, end to end through the installed console script (issue 7).

Every run gets its own torch cache (``TORCH_HOME``) and ``DEIT_REGISTRY_URL_ROOT`` pointing at a file server
on 127.0.0.1 started here, so nothing reaches the network. Models are deit_tiny with random weights saved in
the official checkpoint layout (``{"model": state_dict}``).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from deit_registry import cli
from deit_registry.architecture import DeiT
from deit_registry.deit import build_deit
from deit_registry.evaluation import DatasetError, folder_labels, imagenet_synsets
from deit_registry.transforms import eval_transform
from deit_registry.variants import VARIANTS, Architecture, PretrainedWeights, imagenet_class_names

TINY = "deit_tiny_patch16_224"
# the console script installed beside this interpreter (a venv's bin/), else the one on PATH
SCRIPT = Path(sys.executable).with_name("deit-registry")
if not SCRIPT.exists() and shutil.which("deit-registry"):
    SCRIPT = Path(shutil.which("deit-registry"))


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def server(workdir: Path):
    """A quiet static file server on 127.0.0.1 over ``workdir / "www"``; yields its root URL."""
    www = workdir / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", www
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def env(workdir: Path, server) -> dict[str, str]:
    url_root, _ = server
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "DEIT_REGISTRY_", "TORCH_"))}
    e.update(
        TORCH_HOME=str(workdir / "torch"),
        XDG_CACHE_HOME=str(workdir / "xdg"),
        HF_HOME=str(workdir / "hf"),
        DEIT_REGISTRY_URL_ROOT=url_root,
        COLUMNS="200",
    )
    return e


@pytest.fixture(scope="module")
def model() -> DeiT:
    torch.manual_seed(0)
    return build_deit(TINY).eval()


@pytest.fixture(scope="module")
def checkpoint(workdir: Path, model: DeiT) -> Path:
    path = workdir / "tiny_random.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


def _picture(size: tuple[int, int], seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    w, h = size
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    rgb = torch.stack([xs, ys, (xs * ys + torch.rand(h, w, generator=g) * 0.3).clamp(0, 1)], dim=-1)
    return Image.frombytes("RGB", size, bytes((rgb * 255).round().to(torch.uint8).flatten().tolist()))


@pytest.fixture(scope="module")
def images(workdir: Path) -> list[Path]:
    paths = [workdir / "wide.png", workdir / "tall.jpg"]
    _picture((320, 240), 1).save(paths[0])
    _picture((200, 300), 2).save(paths[1], quality=95)
    return paths


def run(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    assert SCRIPT.exists(), (
        f"{SCRIPT} missing: reinstall the package (pip install -e .) to create the console script"
    )
    proc = subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _reference_probs(model: DeiT, path: Path) -> torch.Tensor:
    x = eval_transform(TINY)(Image.open(path).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        return model(x).softmax(dim=-1)[0]


# ------------------------------------------------------------------------------------------------ list, info
def test_list_table_json_cached_column_and_no_torch(env: dict[str, str], workdir: Path) -> None:
    cache = workdir / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / VARIANTS[TINY].weights.file_name).write_bytes(b"stand-in: only its presence is read")

    text = run(env, "list").stdout
    for name, v in VARIANTS.items():
        line = next(ln for ln in text.splitlines() if ln.startswith(name + " "))
        cells = line.split()
        assert cells == [
            name,
            f"{v.num_params / 1e6:.1f}M",
            f"{v.gmacs:.2f}",
            "224x224" if v.arch.img_size == 224 else "384x384",
            f"{v.weights.top1:.1f}",
            f"{v.weights.top5:.1f}",
            "yes" if name == TINY else "no",
        ]
    assert text.splitlines()[0].split() == ["model", "params", "GMACs", "input", "top-1", "top-5", "cached"]

    records = json.loads(run(env, "list", "--json").stdout)
    assert [r["name"] for r in records] == list(VARIANTS)
    for r in records:
        v = VARIANTS[r["name"]]
        assert (r["params"], r["gmacs"], r["top1"], r["top5"]) == (
            v.num_params,
            v.gmacs,
            v.weights.top1,
            v.weights.top5,
        )
        assert r["input_size"] == list(v.weights.input_size) and r["cached"] is (r["name"] == TINY)
    assert [r["name"] for r in json.loads(run(env, "list", "*distilled*384", "--json").stdout)] == [
        "deit_base_distilled_patch16_384"
    ]

    # python -m works too, and listing imports neither torch nor timm (instant, offline on a fresh machine)
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['deit-registry', 'list', '--json']\n"
        "try:\n    runpy.run_module('deit_registry', run_name='__main__')\nexcept SystemExit as e:\n    rc = e.code\n"
        "heavy = {'torch', 'timm'} & set(sys.modules)\n"
        "sys.exit(f'imported {heavy}' if heavy else rc)"
    )
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == records


def test_cached_column_agrees_with_weights_module(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The torch-free cache check of ``list`` finds the file where ``deit_registry.weights`` puts it."""
    from deit_registry.weights import is_cached

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = Path(cli._hub_checkpoints_dir()) / VARIANTS[TINY].weights.file_name
    assert path.parent == tmp_path / "hub" / "checkpoints"
    assert not is_cached(TINY)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    assert is_cached(TINY)


def test_info_prints_every_field_transform_and_sources(env: dict[str, str]) -> None:
    name = "deit_base_distilled_patch16_384"
    v = VARIANTS[name]
    text = run(env, "info", name + ".fb_in1k").stdout
    for field in [*Architecture.__dataclass_fields__, *PretrainedWeights.__dataclass_fields__]:
        assert re.search(rf"^  {field} +\S", text, re.M), f"{field} missing from info"
    for value in (
        f"{v.num_params:,}",
        v.weights.url,
        v.weights.hf_hub_id,
        v.weights.transformers_id,
        v.paper,
    ):
        assert value in text
    assert "resize the shorter side to 438 (bicubic" in text and "centre-crop 384x384" in text
    assert re.search(r"^  cached +no \(`deit-registry download", text, re.M)

    record = json.loads(run(env, "info", name, "--json").stdout)
    assert record["eval_transform"] == {
        "resize": 438,
        "crop": [384, 384],
        "interpolation": "bicubic",
        "mean": list(v.weights.mean),
        "std": list(v.weights.std),
    }
    assert record["architecture"]["embed_dim"] == 768 and record["architecture"]["distilled"] is True
    assert record["pretrained"]["sha256_prefix"] == "d0272ac0" and record["num_params"] == v.num_params


# ------------------------------------------------------------------------------------------------ predict, explain
def test_predict_json_and_text(
    env: dict[str, str], checkpoint: Path, images: list[Path], model: DeiT
) -> None:
    out = json.loads(
        run(
            env, "predict", TINY, *map(str, images), "--weights", str(checkpoint), "--topk", "3", "--json"
        ).stdout
    )
    assert out["model"] == TINY and [r["image"] for r in out["results"]] == list(map(str, images))
    names = imagenet_class_names()
    for path, result in zip(images, out["results"]):
        ref = _reference_probs(model, path)
        top = ref.topk(3)
        assert [p["label"] for p in result["predictions"]] == top.indices.tolist()
        assert [p["class"] for p in result["predictions"]] == [names[i] for i in top.indices.tolist()]
        assert [p["probability"] for p in result["predictions"]] == pytest.approx(
            top.values.tolist(), abs=1e-5
        )

    text = run(env, "predict", TINY, str(images[0]), "--weights", str(checkpoint)).stdout
    ref = _reference_probs(model, images[0]).topk(5)
    lines = text.splitlines()
    assert lines[0] == f"{images[0]}  ({TINY})"
    for rank, (p, i) in enumerate(zip(ref.values.tolist(), ref.indices.tolist()), 1):
        row = lines[1 + rank]
        assert row.split()[0] == f"{rank}." and names[i] in row and f"({i})" in row
        assert row.endswith(f"{100 * p:.2f}%")


def test_explain_writes_a_labelled_heat_map(
    env: dict[str, str], checkpoint: Path, workdir: Path, model: DeiT
) -> None:
    """A uniform grey image: the overlay's brightness then follows the attention exactly in rank."""
    from deit_registry.inspection import class_token_heatmaps

    grey = workdir / "grey.png"
    Image.new("RGB", (256, 256), (128, 128, 128)).save(grey)
    out = workdir / "explained.png"
    proc = run(env, "explain", TINY, str(grey), "-o", str(out), "--weights", str(checkpoint))
    assert f"wrote {out}" in proc.stdout and "3 heads + mean" in proc.stdout

    figure = Image.open(out)
    assert figure.format == "PNG"
    pad, label_h, title_h, size = 8, 22, 50, 224  # two title lines
    assert figure.size == (pad + 5 * (size + pad), title_h + size + label_h + pad)  # input, 3 heads, mean

    x = eval_transform(TINY)(Image.open(grey)).unsqueeze(0)
    heat = class_token_heatmaps(model, x)[0]
    maps = [*heat, heat.mean(dim=0)]
    for panel, expected in enumerate(maps, start=1):
        left, top = pad + panel * (size + pad), title_h + label_h
        crop = figure.crop((left, top, left + size, top + size))
        pixels = (
            torch.frombuffer(bytearray(crop.tobytes()), dtype=torch.uint8).view(size, size, 3).float().sum(-1)
        )
        shown = pixels.view(14, 16, 14, 16).mean(dim=(1, 3)).flatten()  # per patch
        wanted = expected.view(14, 16, 14, 16).mean(dim=(1, 3)).flatten()
        ranks = torch.stack([shown.argsort().argsort(), wanted.argsort().argsort()]).float()
        assert torch.corrcoef(ranks)[0, 1] > 0.99, f"panel {panel} does not follow the attention"
    first = figure.crop((pad, title_h + label_h, pad + size, title_h + label_h + size))
    assert set(first.tobytes()) == {128}  # the input panel is the picture itself


# ------------------------------------------------------------------------------------------------ download, convert
def test_download_then_offline_use_and_convert(
    env: dict[str, str], server, checkpoint: Path, images: list[Path], workdir: Path, model: DeiT
) -> None:
    url_root, www = server
    data = checkpoint.read_bytes()
    file_name = f"{TINY}-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    (www / file_name).write_bytes(data)
    url = url_root + file_name

    proc = run(env, "download", TINY, "--weights", url)
    cached = workdir / "torch" / "hub" / "checkpoints" / file_name
    assert proc.stdout.strip() == f"{TINY}: {cached}"
    assert cached.read_bytes() == data
    assert "100%" in proc.stderr  # the progress bar

    # later, offline: the cached copy serves predictions
    (www / file_name).unlink()
    offline = {**env, "DEIT_REGISTRY_OFFLINE": "1"}
    out = json.loads(
        run(offline, "predict", TINY, str(images[0]), "--weights", url, "--topk", "1", "--json").stdout
    )
    assert out["results"][0]["predictions"][0]["label"] == int(_reference_probs(model, images[0]).argmax())

    dst = workdir / "converted"
    proc = run(env, "convert", str(checkpoint), str(dst))
    assert "converted" in proc.stdout and any(dst.iterdir())
    from deit_registry import create_model

    reloaded = create_model(TINY, pretrained=True, weights=str(dst))
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


# ------------------------------------------------------------------------------------------------ validate
def test_validate_on_synthetic_imagefolder(
    env: dict[str, str], checkpoint: Path, workdir: Path, model: DeiT
) -> None:
    """Folders named by synset; top-1/top-5 are recomputed here from the same model and transform."""
    root = workdir / "val"
    synsets = imagenet_synsets()
    chosen = [synsets[i] for i in (0, 1, 207, 999)]
    files = []
    for c, synset in enumerate(chosen):
        (root / synset).mkdir(parents=True)
        for k in range(2):
            path = root / synset / f"img{k}.png"
            _picture((240 + 16 * k, 230), 10 * c + k).save(path)
            files.append((path, synsets.index(synset)))

    # make one image's true class its own top-1 prediction, so the hand count is not trivially zero
    first = root / chosen[0] / "img0.png"
    predicted = int(_reference_probs(model, first).argmax())
    target = synsets[predicted]
    if target != chosen[0]:
        (root / target).mkdir(exist_ok=True)
        first.rename(root / target / "img0.png")
        files[0] = (root / target / "img0.png", predicted)

    correct1 = correct5 = 0
    for path, label in files:
        top5 = _reference_probs(model, path).topk(5).indices.tolist()
        correct1 += top5[0] == label
        correct5 += label in top5
    assert correct1 >= 1

    proc = run(
        env,
        "validate",
        TINY,
        "--data",
        str(root),
        "--weights",
        str(checkpoint),
        "--batch-size",
        "3",
        "--workers",
        "1",
    )
    n = len(files)
    assert f"{n} images in {len(list(root.iterdir()))} class folders" in proc.stdout
    assert f"correct: top-1 {correct1}/{n}, top-5 {correct5}/{n}" in proc.stdout
    v = VARIANTS[TINY].weights
    top1_row = next(ln for ln in proc.stdout.splitlines() if ln.startswith("top-1"))
    assert top1_row.split() == [
        "top-1",
        f"{100 * correct1 / n:.2f}%",
        f"{v.top1:.1f}%",
        f"{100 * correct1 / n - v.top1:+.2f}",
    ]
    top5_row = next(ln for ln in proc.stdout.splitlines() if ln.startswith("top-5"))
    assert top5_row.split()[1:3] == [f"{100 * correct5 / n:.2f}%", f"{v.top5:.1f}%"]
    assert "validate" in proc.stderr and f"{n}/{n}" in proc.stderr  # the progress bar


def test_folder_labels() -> None:
    assert folder_labels(["n01440764", "n15075141"]) == {"n01440764": 0, "n15075141": 999}
    assert folder_labels(["0", "17", "999"]) == {"0": 0, "17": 17, "999": 999}
    with pytest.raises(DatasetError, match=r"folders such as \['cats', 'dogs'\] are neither .* label index"):
        folder_labels(["cats", "dogs"])
    with pytest.raises(DatasetError, match="the folders mix ImageNet synset ids and label indices"):
        folder_labels(["n01440764", "17"])
    with pytest.raises(DatasetError, match="outside"):
        folder_labels(["1000"])
    with pytest.raises(DatasetError, match="synset folders .* but the model has 10"):
        folder_labels(["n01440764"], num_classes=10)


def test_image_folder_follows_links_as_torchvision_and_labels_fit_the_model(tmp_path: Path) -> None:
    from deit_registry.evaluation import ImageFolder, evaluate

    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere" / "linked.png")
    (tmp_path / "data" / "3" / "real").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "3" / "real" / "r.png")
    (tmp_path / "data" / "3" / "link").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "data" / "3" / "real" / "loop").symlink_to(tmp_path / "data" / "3")  # walked once
    data = ImageFolder(tmp_path / "data", lambda im: torch.zeros(3, 4, 4))
    assert sorted(Path(p).name for p, _ in data.samples) == ["linked.png", "r.png"]
    three = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))  # labels 0-2 only
    with pytest.raises(DatasetError, match="label 3 is outside the model's 3 classes"):
        evaluate(three, data, batch_size=2, progress=False)


# ------------------------------------------------------------------------------------------------ errors
def test_errors_are_one_actionable_line(env: dict[str, str], workdir: Path, images: list[Path]) -> None:
    def fails(*args: str, e: dict[str, str] = env) -> str:
        proc = run(e, *args, ok=False)
        assert proc.returncode == 1, (args, proc.returncode, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith("deit-registry: error: ")
        return lines[0]

    assert "Did you mean: deit_small_patch16_224" in fails("info", "deit_smal_patch16_224")
    assert "Did you mean" in fails("predict", "deit_tiny_patch16", str(images[0]))
    assert f"image file not found: {workdir / 'nope.jpg'}" in fails(
        "predict", TINY, str(workdir / "nope.jpg")
    )
    broken = workdir / "broken.jpg"
    broken.write_bytes(b"not really a JPEG")
    assert f"cannot read {broken} as an image" in fails("predict", TINY, str(broken))
    (workdir / "empty").mkdir()
    assert "no class folders" in fails("validate", TINY, "--data", str(workdir / "empty"))
    for n in ("0", "-1"):  # never a silent run that predicts nothing
        assert f"--batch-size must be at least 1; got {n}" in fails(
            "predict", TINY, str(images[0]), "--batch-size", n
        )
    assert "HTTP 404" in fails("download", "deit_small_patch16_224")  # the server has no such file

    # offline with nothing cached: names the file and the way out
    fresh = {**env, "TORCH_HOME": str(workdir / "empty_cache"), "DEIT_REGISTRY_OFFLINE": "1"}
    msg = fails("predict", TINY, str(images[0]), e=fresh)
    assert "offline" in msg and VARIANTS[TINY].weights.file_name in msg

    # --debug shows the traceback instead
    proc = run(env, "info", "deit_smal_patch16_224", "--debug", ok=False)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "UnknownModelError" in proc.stderr
    # bad usage is argparse's exit status 2
    assert run(env, "predict", TINY, ok=False).returncode == 2
