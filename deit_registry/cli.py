"""The ``deit-registry`` command line (also ``python -m deit_registry``)::

    deit-registry list                                   # the model table (offline, instant)
    deit-registry info deit_small_patch16_224            # every metadata field, the eval transform, weights
    deit-registry predict deit_tiny_patch16_224 cat.jpg dog.png --topk 3
    deit-registry explain deit_small_patch16_224 cat.jpg -o cat_attention.png
    deit-registry download deit_tiny_patch16_224 deit_small_patch16_224
    deit-registry convert deit_tiny_patch16_224-a1311bcf.pth tiny/ [--ema] [--force]
    deit-registry validate deit_tiny_patch16_224 --data /data/imagenet/val --batch-size 128 --workers 8
    deit-registry run validate.py --model deit_tiny_patch16_224 ...   # any timm script, our models active

Errors print one line saying what went wrong and what to do, and exit with status 1 (2 for bad usage);
``--debug`` shows the traceback instead. ``list`` and ``info`` never import torch or timm.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import DeiTRegistryError, UnknownModelError
from .registry import get_pretrained_cfg, list_models
from .transforms import eval_transform, load_image
from .variants import VARIANTS, Architecture, PretrainedWeights, Variant, imagenet_class_names

if TYPE_CHECKING:
    import torch
    from PIL import Image

PROG = "deit-registry"


# ------------------------------------------------------------------------------------------------ helpers
def _variant(name: str) -> Variant:
    """The variant record of ``name`` (tag allowed); UnknownModelError with suggestions otherwise."""
    cfg = get_pretrained_cfg(name)
    if not isinstance(cfg, Variant):
        raise DeiTRegistryError(
            f"{name!r} is a registered model but not a DeiT variant; the command line knows only "
            f"{', '.join(VARIANTS)}"
        )
    return cfg


def _hub_checkpoints_dir() -> str:
    """torch.hub's checkpoint folder, computed as ``torch.hub.get_dir()`` does but without importing torch:
    ``$TORCH_HOME/hub/checkpoints``, ``$TORCH_HOME`` defaulting to ``$XDG_CACHE_HOME/torch`` (``~/.cache``)."""
    torch_home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return os.path.join(os.path.expanduser(torch_home), "hub", "checkpoints")


def _is_cached(name: str) -> bool:
    """Whether the official weights of ``name`` are in the cache.

    In a fresh process (``list``, ``info``) the cache path is computed without torch, which would cost seconds
    to import; once torch is loaded (``torch.hub.set_dir`` may have moved the cache) the weights module answers.
    A test keeps the two in agreement.
    """
    if "torch" not in sys.modules:
        if os.path.isfile(os.path.join(_hub_checkpoints_dir(), VARIANTS[name].weights.file_name)):
            return True
        # The default order looks in the Hugging Face cache first (as weights.hubfetch.cached_file does, but
        # without importing deit_registry.weights, which imports torch).
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return False
        hub_cache = os.getenv("HF_HUB_CACHE") or (
            os.path.join(os.environ["HF_HOME"], "hub") if os.getenv("HF_HOME") else None
        )
        found = try_to_load_from_cache(f"timm/{name}.fb_in1k", "model.safetensors", cache_dir=hub_cache)
        return isinstance(found, str) and os.path.isfile(found)
    from .weights import is_cached

    return bool(is_cached(name))


def _device(choice: str) -> str:
    """``--device`` checked against this machine before any weights load: ``auto``, ``cpu``, ``cuda[:N]``."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    expected = "--device must be auto, cpu, cuda or cuda:N"
    try:
        device = torch.device(choice)
    except (RuntimeError, ValueError, TypeError):  # torch's parser: RuntimeError for an unknown type
        device = None
    if device is None or device.type not in ("cpu", "cuda"):  # meta, mps...: not what this command runs on
        raise DeiTRegistryError(f"{expected}; got {choice!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise DeiTRegistryError(
                f"{expected} (this machine has no CUDA GPU: use --device cpu); got {choice!r}"
            )
        if device.index is not None and device.index >= count:
            raise DeiTRegistryError(
                f"{expected} (this machine has {count} CUDA GPU{'s' if count > 1 else ''}: cuda:0 to "
                f"cuda:{count - 1}); got {choice!r}"
            )
    return str(device)


def _shown(path: Any) -> str:
    """``path`` as stdout can print it, whatever its encoding and error handler (``PYTHONIOENCODING=utf-8:strict``):
    bytes of a file name that are not valid in the file-system encoding (Python holds them as lone surrogates)
    and characters stdout cannot encode become backslash escapes."""
    text = os.fsencode(path).decode(sys.getfilesystemencoding(), "backslashreplace")
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    return text.encode(encoding, "backslashreplace").decode(encoding)


def _load_model(variant: Variant, weights: str | None, device: str) -> torch.nn.Module:
    """The pretrained model in eval mode: official weights, or ``weights`` (file, folder, URL, hf-hub: id)."""
    from .registry import create_model

    model = create_model(variant.name, pretrained=True, weights=weights)
    return model.eval().to(device)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def _table(rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ list
def _list_record(v: Variant, cached: bool) -> dict[str, Any]:
    return {
        "name": v.name,
        "params": v.num_params,
        "gmacs": v.gmacs,
        "input_size": list(v.weights.input_size),
        "top1": v.weights.top1,
        "top5": v.weights.top5,
        "distilled": v.arch.distilled,
        "cached": cached,
    }


def cmd_list(args: argparse.Namespace) -> int:
    matching = set(list_models(args.pattern or ""))
    names = [n for n in VARIANTS if n in matching]  # the table's order: tiny, small, base; plain, distilled
    if not names:
        raise DeiTRegistryError(f"no DeiT model matches {args.pattern!r}; run `{PROG} list` for all of them")
    records = [_list_record(VARIANTS[n], _is_cached(n)) for n in names]
    if args.json:
        _print_json(records)
        return 0
    rows = [["model", "params", "GMACs", "input", "top-1", "top-5", "cached"]]
    for r in records:
        rows.append(
            [
                r["name"],
                f"{r['params'] / 1e6:.1f}M",
                f"{r['gmacs']:.2f}",
                f"{r['input_size'][1]}x{r['input_size'][2]}",
                f"{r['top1']:.1f}",
                f"{r['top5']:.1f}",
                "yes" if r["cached"] else "no",
            ]
        )
    print(_table(rows, right={1, 2, 4, 5}))
    print(
        "\nImageNet-1k top-1/top-5 (%) with the official evaluation transform; GMACs: billions of multiply-accumulates per image."
    )
    return 0


# ------------------------------------------------------------------------------------------------ info
def _info_record(v: Variant) -> dict[str, Any]:
    arch = {f: getattr(v.arch, f) for f in Architecture.__dataclass_fields__}
    weights = {f: getattr(v.weights, f) for f in PretrainedWeights.__dataclass_fields__}
    weights.update(
        url=v.weights.url, sha256_prefix=v.weights.sha256_prefix, eval_resize=v.weights.eval_resize
    )
    return {
        "name": v.name,
        "num_params": v.num_params,
        "gmacs": v.gmacs,
        "default_head": v.default_head,
        "paper": v.paper,
        "architecture": arch,
        "pretrained": {k: list(x) if isinstance(x, tuple) else x for k, x in weights.items()},
        "eval_transform": eval_transform(v).to_dict(),
        "weights_sources": {
            "official": v.weights.url,
            "hf_hub": f"hf-hub:{v.weights.hf_hub_id}",
            "transformers": v.weights.transformers_id,
        },
        "cached": _is_cached(v.name),
    }


def cmd_info(args: argparse.Namespace) -> int:
    v = _variant(args.model)
    record = _info_record(v)
    if args.json:
        _print_json(record)
        return 0
    print(v.name)
    print(f"  parameters       {v.num_params:,}")
    print(
        f"  GMACs            {v.gmacs:.2f} (multiply-accumulates of one image at {v.arch.img_size}x{v.arch.img_size})"
    )
    print(f"  default head     {v.default_head}")
    print(f"  paper            {v.paper}")
    print("architecture")
    for key, value in record["architecture"].items():
        print(f"  {key:<16} {value}")
    print("pretrained weights (ImageNet-1k)")
    for key, value in record["pretrained"].items():
        print(f"  {key:<16} {value}")
    print("evaluation transform")
    for i, step in enumerate(eval_transform(v).steps(), 1):
        print(f"  {i}. {step}")
    print("weights come from")
    print(f"  official         {v.weights.url} (sha256 starts {v.weights.sha256_prefix})")
    print(f"  hub mirror       hf-hub:{v.weights.hf_hub_id} ({v.weights.hf_hub_filename})")
    print(f"  transformers     {v.weights.transformers_id}")
    cached = "yes" if record["cached"] else f"no (`{PROG} download {v.name}` fetches them)"
    print(f"  cached           {cached}")
    return 0


# ------------------------------------------------------------------------------------------------ predict
def _top_classes(probs: torch.Tensor, k: int) -> list[dict[str, Any]]:
    names = imagenet_class_names()
    names = names if probs.numel() == len(names) else ()  # another head's classes have no ImageNet names
    values, indices = probs.topk(min(k, probs.numel()))
    return [
        {
            "rank": rank,
            "label": int(i),
            "class": names[int(i)] if int(i) < len(names) else str(int(i)),
            "probability": float(p),
        }
        for rank, (p, i) in enumerate(zip(values, indices), 1)
    ]


def cmd_predict(args: argparse.Namespace) -> int:
    if args.topk < 1:
        raise ValueError(f"--topk must be at least 1; got {args.topk}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1; got {args.batch_size}")
    v = _variant(args.model)
    transform = eval_transform(v)
    images = [load_image(p) for p in args.images]  # a bad path fails before the model is loaded
    import torch

    device = _device(args.device)
    model = _load_model(v, args.weights, device)
    results = []
    with torch.inference_mode():
        for start in range(0, len(images), args.batch_size):
            batch = torch.stack([transform(im) for im in images[start : start + args.batch_size]]).to(device)
            probs = model(batch).float().softmax(dim=-1).cpu()
            for path, p in zip(args.images[start : start + args.batch_size], probs):
                results.append({"image": path, "predictions": _top_classes(p, args.topk)})
    if args.json:
        _print_json({"model": v.name, "weights": args.weights or v.weights.url, "results": results})
        return 0
    for i, r in enumerate(results):
        if i:
            print()
        print(f"{_shown(r['image'])}  ({v.name})")
        rows = [
            [f"{p['rank']}.", p["class"], f"({p['label']})", f"{100 * p['probability']:.2f}%"]
            for p in r["predictions"]
        ]
        print(_table([["", "class", "label", "probability"], *rows], right={0, 2, 3}))
    return 0


# ------------------------------------------------------------------------------------------------ explain
_HEAT_STOPS = (
    (0.0, (0, 0, 4)),
    (0.25, (87, 16, 110)),
    (0.5, (188, 55, 84)),
    (0.75, (249, 142, 9)),
    (1.0, (252, 255, 164)),
)


def _heat_colors(heat: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1], shape [H, W] -> uint8 RGB [H, W, 3] on an inferno-like scale."""
    import torch

    xs = torch.tensor([s[0] for s in _HEAT_STOPS])
    cs = torch.tensor([s[1] for s in _HEAT_STOPS], dtype=torch.float32)
    idx = torch.bucketize(heat.clamp(0, 1), xs[1:-1])
    lo, hi = xs[idx], xs[idx + 1]
    t = ((heat - lo) / (hi - lo)).unsqueeze(-1)
    return (cs[idx] * (1 - t) + cs[idx + 1] * t).round().to(torch.uint8)


def _overlay(base: Image.Image, heat: torch.Tensor, alpha: float = 0.6) -> Image.Image:
    from PIL import Image

    lo, hi = heat.min(), heat.max()
    heat = (heat - lo) / (hi - lo) if hi > lo else heat * 0  # each panel on its own scale
    rgb = _heat_colors(heat).contiguous()
    h, w = heat.shape
    colored = Image.frombytes("RGB", (w, h), bytes(rgb.flatten().tolist()))
    return Image.blend(base, colored, alpha)


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _draw_color_scale(
    canvas: Image.Image, draw: Any, font: Any, right: int, top: int, width: int = 120
) -> None:
    """A 'low [gradient] high' legend ending at x = ``right``: each panel spans the scale from its min to max."""
    import torch
    from PIL import Image

    ramp = _heat_colors(torch.linspace(0, 1, width).expand(12, width)).contiguous()
    bar = Image.frombytes("RGB", (width, 12), bytes(ramp.flatten().tolist()))
    high, low = "high (per panel)", "low"
    x_high = right - int(draw.textlength(high, font=font))
    x_bar = x_high - 6 - width
    canvas.paste(bar, (x_bar, top + 2))
    draw.text((x_high, top), high, fill="black", font=font)
    draw.text((x_bar - 6 - int(draw.textlength(low, font=font)), top), low, fill="black", font=font)


def render_attention_figure(
    picture: Image.Image, heatmaps: torch.Tensor, title: list[str], labels: list[str], columns: int = 5
) -> Image.Image:
    """A labelled grid under ``title`` (one line each): the picture, then one overlay per map in ``heatmaps``
    ``[P, H, W]`` (at picture size), each labelled; a colour scale at the top right."""
    from PIL import Image, ImageDraw

    w, h = picture.size
    pad, label_h, line_h = 8, 22, 20
    title_h = 10 + line_h * len(title)
    panels = [("input", picture)] + [(lab, _overlay(picture, m)) for lab, m in zip(labels, heatmaps)]
    cols = min(columns, len(panels))
    rows = -(-len(panels) // cols)
    canvas = Image.new("RGB", (pad + cols * (w + pad), title_h + rows * (h + label_h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title):
        draw.text((pad, 6 + i * line_h), line, fill="black", font=_font(16))
    font = _font(14)
    _draw_color_scale(canvas, draw, font, right=canvas.width - pad, top=8)
    for i, (label, img) in enumerate(panels):
        x = pad + (i % cols) * (w + pad)
        y = title_h + (i // cols) * (h + label_h + pad)
        draw.text((x, y + 2), label, fill="black", font=font)
        canvas.paste(img, (x, y + label_h))
    return canvas


def cmd_explain(args: argparse.Namespace) -> int:
    v = _variant(args.model)
    transform = eval_transform(v)
    image = load_image(args.image)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise DeiTRegistryError(
            f"output folder does not exist: {out_dir}; create it or choose another -o path"
        )
    if not args.output.lower().endswith(".png"):
        raise ValueError(f"-o/--output must end in .png; got {args.output}")
    depth = v.arch.depth
    if not -depth <= args.layer < depth:
        raise ValueError(f"--layer must be in -{depth}..{depth - 1} for {v.name}; got {args.layer}")
    import torch

    from .inspection import attention_maps, attention_to_heatmaps

    device = _device(args.device)
    model = _load_model(v, args.weights, device)
    x = transform(image).unsqueeze(0).to(device)
    depth = len(model.blocks)
    with attention_maps(model) as rec, torch.inference_mode():
        probs = model(x).float().softmax(dim=-1)[0].cpu()
        attention = rec.maps[args.layer].float().cpu()
    grid = model.patch_embed.grid_size
    heat = attention_to_heatmaps(attention, grid, model.num_prefix_tokens, model.patch_embed.patch_size[0])[0]
    heat = torch.cat([heat, heat.mean(dim=0, keepdim=True)])  # per head, then their mean
    labels = [f"head {i + 1}" for i in range(heat.shape[0] - 1)] + ["mean of heads"]
    top = _top_classes(probs, 1)[0]
    layer = args.layer % depth + 1
    title = [
        f"{v.name}: class-token attention, layer {layer}/{depth}",
        f"{_shown(os.path.basename(args.image))}: top class {top['class']} ({100 * top['probability']:.1f}%)",
    ]
    figure = render_attention_figure(transform.crop_image(image), heat, title, labels)
    figure.save(args.output, format="PNG")
    size = f"{figure.size[0]}x{figure.size[1]}"
    print(f"wrote {_shown(args.output)} ({size}): {heat.shape[0] - 1} heads + mean, layer {layer}")
    print(f"top class: {top['class']} ({top['label']}) {100 * top['probability']:.2f}%")
    return 0


# ------------------------------------------------------------------------------------------------ weights
def cmd_download(args: argparse.Namespace) -> int:
    from .weights import download

    names = list(VARIANTS) if args.all else args.models
    if not names:
        raise ValueError(f"name at least one model, or --all; `{PROG} list` shows them")
    variants = [_variant(n) for n in names]  # every name checked before the first download starts
    if args.weights and len(variants) != 1:
        raise ValueError("--weights names one checkpoint: give exactly one MODEL with it")
    for v in variants:
        path = download(v.name, source=args.weights, progress=not args.quiet)
        print(f"{v.name}: {_shown(path)}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .weights import convert

    name = _variant(args.name).name if args.name else None
    out = convert(args.src, args.dst, name=name, ema=args.ema, overwrite=args.force)
    files = ", ".join(sorted(p.name for p in out.iterdir() if p.is_file()))
    print(f"converted {_shown(args.src)} -> {_shown(out)} ({files})")
    return 0


# ------------------------------------------------------------------------------------------------ validate
def cmd_validate(args: argparse.Namespace) -> int:
    from .evaluation import ImageFolder, evaluate

    v = _variant(args.model)
    dataset = ImageFolder(args.data, eval_transform(v), num_classes=v.weights.num_classes)
    device = _device(args.device)
    model = _load_model(v, args.weights, device)
    if model.num_classes != v.weights.num_classes:  # a fine-tuned checkpoint's classes
        dataset = ImageFolder(args.data, eval_transform(v), num_classes=model.num_classes)
    result = evaluate(
        model,
        dataset,
        batch_size=args.batch_size,
        workers=args.workers,
        device=device,
        progress=not args.quiet,
    )
    record = {
        "model": v.name,
        "weights": args.weights or v.weights.url,
        "data": args.data,
        "images": result.images,
        "class_folders": dataset.num_class_dirs,
        "correct_top1": result.correct1,
        "correct_top5": result.correct5,
        "top1": result.top1,
        "top5": result.top5,
        "published_top1": v.weights.top1,
        "published_top5": v.weights.top5,
    }
    if args.json:
        _print_json(record)
        return 0
    print(
        f"{v.name} on {_shown(args.data)}: {result.images} images in {dataset.num_class_dirs} class folders"
    )
    rows = [
        ["", "measured", "published", "difference"],
        ["top-1", f"{result.top1:.2f}%", f"{v.weights.top1:.1f}%", f"{result.top1 - v.weights.top1:+.2f}"],
        ["top-5", f"{result.top5:.2f}%", f"{v.weights.top5:.1f}%", f"{result.top5 - v.weights.top5:+.2f}"],
    ]
    print(_table(rows, right={1, 2, 3}))
    print(f"correct: top-1 {result.correct1}/{result.images}, top-5 {result.correct5}/{result.images}")
    return 0


# ------------------------------------------------------------------------------------------------ run
def cmd_run(args: argparse.Namespace) -> int:
    from .runner import run

    if args.module is not None:
        if not args.module:
            raise ValueError("run -m needs a module name: run -m MODULE [ARGS...]")
        return run(args.module[0], args.module[1:], module=True)
    if not args.argv:
        raise ValueError("run needs a script: run SCRIPT [ARGS...] or run -m MODULE [ARGS...]")
    return run(args.argv[0], args.argv[1:])


# ------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    def model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--weights",
            metavar="PATH|URL|HUB_ID",
            help="checkpoint to use instead of the official weights: a .pth/.bin/.safetensors file or folder, "
            "an http(s) URL, or hf-hub:owner/repo[@revision]",
        )
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="The eight DeiT vision transformers from the terminal: list, inspect, predict, explain, "
        "download, convert, validate.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("list", parents=[common], help="the model table (works offline)")
    p.add_argument("pattern", nargs="?", help="shell-style filter, e.g. '*distilled*'")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "info", parents=[common], help="every metadata field, the eval transform, weight sources"
    )
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("predict", parents=[common], help="top ImageNet classes of images")
    p.add_argument("model")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--topk", type=int, default=5, help="classes to show per image (default 5)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    model_options(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "explain", parents=[common], help="class-token attention heat map of an image, as a PNG"
    )
    p.add_argument("model")
    p.add_argument("image")
    p.add_argument("-o", "--output", required=True, metavar="OUT.png", help="PNG file to write")
    p.add_argument(
        "--layer", type=int, default=-1, help="block whose attention to show (default: the last, -1)"
    )
    model_options(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser(
        "download",
        parents=[common],
        help="pre-fetch weights into the cache: timm's Hub copy, else the official file (as pretrained=True)",
    )
    p.add_argument("models", nargs="*", metavar="MODEL")
    p.add_argument("--all", action="store_true", help="all eight models")
    p.add_argument(
        "--weights",
        metavar="URL|HUB_ID",
        help="fetch this source (an http(s) URL or hf-hub:owner/repo[@revision]) instead; one MODEL",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser(
        "convert", parents=[common], help="any supported checkpoint -> DST/model.safetensors + config.json"
    )
    p.add_argument(
        "src", help="checkpoint: official .pth, timm/transformers .bin/.safetensors, folder, URL, hf-hub:"
    )
    p.add_argument("dst", help="output folder")
    p.add_argument("--name", help="the variant, when it cannot be read from the checkpoint")
    p.add_argument(
        "--ema",
        action="store_true",
        help="take a training checkpoint's EMA weights (model_ema, or timm train.py's state_dict_ema)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace an existing DST/model.safetensors and config.json"
    )
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "validate", parents=[common], help="top-1/top-5 on an ImageFolder tree, beside the published"
    )
    p.add_argument("model")
    p.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="DIR/<class>/<image>; class folders named by ImageNet synset id (n01440764) or label index (0-999)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="default 64")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading processes")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    model_options(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "run",
        help="run a script (e.g. timm's validate.py) as __main__ with the DeiT models registered in timm",
        description="Run SCRIPT (or -m MODULE) as python would, after registering the eight DeiT models with "
        "timm, so timm.create_model in it builds them. The script's output and exit status pass through.",
        usage=f"{PROG} run SCRIPT [ARGS...] | {PROG} run -m MODULE [ARGS...]",
    )
    p.add_argument(
        "-m", dest="module", nargs=argparse.REMAINDER, metavar="MODULE", help="run a module, as python -m"
    )
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="SCRIPT [ARGS...]")
    p.set_defaults(func=cmd_run)
    return parser


def _message(exc: BaseException) -> str:
    if isinstance(exc, UnknownModelError):  # point at the command line's own listing
        hint = f" Did you mean: {', '.join(exc.suggestions)}?" if exc.suggestions else ""
        return f"unknown model {exc.name!r}.{hint} `{PROG} list` shows every model"
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, DeiTRegistryError | ValueError | OSError):
        return text
    return f"{type(exc).__name__}: {text} (unexpected; rerun with --debug for the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 1 error, 2 bad usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    debug = getattr(args, "debug", False)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `deit-registry info ... | head`: the reader left; not an error worth a message
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        if debug:
            raise
        print(f"{PROG}: error: {_message(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
