"""ImageNet-style evaluation: top-1/top-5 of a classifier on an ImageFolder tree.

The tree has one folder per class with the images inside (ImageNet validation laid out by class folders, as
``torchvision.datasets.ImageFolder`` and the DeiT repository expect). A folder's label comes from its name:

* an ImageNet-1k synset id (``n01440764``): its index in the sorted synset list, i.e. the ImageNet-1k label
  (so a subset of the classes still gets the right labels);
* an integer (``0`` ... ``999``): that label.

Synset folders need a 1000-class model; a model with other classes takes integer folders. Folders are followed
through symbolic links, as ``torchvision.datasets.ImageFolder`` does.

::

    from deit_registry.evaluation import ImageFolder, evaluate
    from deit_registry.transforms import eval_transform
    data = ImageFolder("/data/imagenet/val", eval_transform("deit_tiny_patch16_224"))
    result = evaluate(model, data, batch_size=64, workers=8)
    result.top1, result.top5                                   # percentages
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import torch

from .errors import DeiTRegistryError
from .transforms import ImageReadError, load_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_SYNSET = re.compile(r"^n\d{8}$")


class DatasetError(DeiTRegistryError):
    """An evaluation folder is missing, empty, or laid out in a way the labels cannot be read from."""


@cache
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ImageNet-1k synset ids (WordNet ids) in label order (sorted)."""
    text = resources.files(__package__).joinpath("imagenet_synsets.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def folder_labels(class_dirs: list[str], num_classes: int = 1000) -> dict[str, int]:
    """Map class-folder names to labels: ImageNet synset ids or integers (see the module docstring)."""
    if not class_dirs:
        raise DatasetError("no class folders found")
    if all(_SYNSET.match(d) for d in class_dirs):
        if num_classes != 1000:
            raise DatasetError(
                f"synset folders ({class_dirs[0]}, ...) name ImageNet-1k classes, but the model has {num_classes}; "
                f"name the class folders by the model's label indices (0 to {num_classes - 1})"
            )
        index = {s: i for i, s in enumerate(imagenet_synsets())}
        unknown = [d for d in class_dirs if d not in index]
        if unknown:
            raise DatasetError(
                f"folders {unknown[:3]} are not ImageNet-1k synsets; the model has no such classes"
            )
        return {d: index[d] for d in class_dirs}
    if all(d.isdigit() for d in class_dirs):
        out = {d: int(d) for d in class_dirs}
        bad = [d for d, i in out.items() if i >= num_classes]
        if bad:
            raise DatasetError(
                f"class folders {bad[:3]} are outside the model's {num_classes} classes (0 to {num_classes - 1})"
            )
        return out
    odd = [d for d in class_dirs if not (_SYNSET.match(d) or d.isdigit())][:3]
    why = (
        f"folders such as {odd} are neither ImageNet synset ids nor label indices"
        if odd
        else "the folders mix ImageNet synset ids and label indices"
    )
    raise DatasetError(
        f"cannot tell the class labels: {why}. Name every class folder by its synset id (n01440764, ...) or "
        "every one by its label index (0 to 999)"
    )


def _walk(top: str):
    """``os.walk`` following symbolic links to folders, as torchvision's ImageFolder does, each real folder
    once (a link back up the tree would otherwise never end)."""
    seen = set()
    for dirpath, dirnames, files in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        yield dirpath, dirnames, files


class ImageFolder(torch.utils.data.Dataset):
    """``root/<class folder>/<image>`` -> ``(transform(image), label)``, files in sorted order."""

    def __init__(
        self, root: str | os.PathLike[str], transform: Callable[[Any], torch.Tensor], num_classes: int = 1000
    ):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DatasetError(f"data folder not found: {root}")
        class_dirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not class_dirs:
            raise DatasetError(
                f"{root} has no class folders; lay the images out as {root}/<synset or label>/<image>.JPEG"
            )
        labels = folder_labels(class_dirs, num_classes)
        self.samples: list[tuple[str, int]] = []
        for d in class_dirs:
            for dirpath, _, files in sorted(_walk(os.path.join(root, d))):
                for f in sorted(files):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, f), labels[d]))
        if not self.samples:
            raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        self.root = root
        self.transform = transform
        self.num_class_dirs = len(class_dirs)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(load_image(path)), label


@dataclass(frozen=True)
class EvalResult:
    """Counts and percentages of one evaluation."""

    images: int
    correct1: int
    correct5: int

    @property
    def top1(self) -> float:
        return 100.0 * self.correct1 / self.images

    @property
    def top5(self) -> float:
        return 100.0 * self.correct5 / self.images


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> EvalResult:
    """Top-1/top-5 of ``model`` (eval mode) over ``dataset``; a tqdm bar on stderr when ``progress``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be 0 or more; got {workers}")
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=str(device).startswith("cuda"),
    )
    bar = _progress(len(dataset), progress)
    model.eval().to(device)
    seen = correct1 = correct5 = 0
    for images, labels in _batches(loader):
        logits = model(images.to(device))
        labels = labels.to(logits.device)
        if len(labels) and int(labels.max()) >= logits.shape[-1]:
            raise DatasetError(
                f"label {int(labels.max())} is outside the model's {logits.shape[-1]} classes; evaluate on a "
                f"folder of its classes, or with the model trained for these labels"
            )
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top == labels[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=-1).sum())
        seen += len(labels)
        if bar is not None:
            bar.update(len(labels))
            bar.set_postfix(top1=f"{100.0 * correct1 / seen:.2f}", top5=f"{100.0 * correct5 / seen:.2f}")
    if bar is not None:
        bar.close()
    return EvalResult(seen, correct1, correct5)


def _batches(loader: Any) -> Any:
    """The loader's batches; an image that cannot be read in a worker process is re-raised as one line.

    A DataLoader worker's exception comes back as the same type with the worker's traceback in its message;
    the original message (the file and the reason) is its last line, which is all a user needs.
    """
    try:
        yield from loader
    except ImageReadError as exc:
        lines = str(exc).strip().splitlines()
        if len(lines) > 1:
            tag = f"{ImageReadError.__name__}: "
            last = next((ln for ln in reversed(lines) if tag in ln), lines[-1])
            raise ImageReadError(last.split(tag, 1)[-1].strip()) from None
        raise


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with huggingface_hub; without it the run is simply silent
        return None
    return tqdm(total=total, unit="img", desc="validate", dynamic_ncols=True)
