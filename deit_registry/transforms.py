"""The official DeiT evaluation transform, with PIL and torch only (no torchvision needed).

Bicubic resize of the shorter side to ``int(size / crop_pct)`` (224 -> 256, 384 -> 438), centre crop ``size``,
to a float tensor in [0, 1], normalise with the ImageNet mean and std: the transform the published accuracies
were measured with, step for step what ``torchvision.transforms`` does on PIL images::

    from deit_registry.transforms import eval_transform, load_image
    transform = eval_transform("deit_small_patch16_224")
    x = transform(load_image("cat.jpg")).unsqueeze(0)     # [1, 3, 224, 224]
    print(transform)                                       # the steps, in words

PIL and torch are imported when an image is touched, so building or printing a transform stays instant
(``deit-registry info`` prints one without loading torch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import DeiTRegistryError
from .variants import VARIANTS, Variant

if TYPE_CHECKING:
    import torch
    from PIL import Image


class ImageReadError(DeiTRegistryError):
    """An image file is missing or could not be decoded."""


_PIL_FILTERS = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1}  # PIL.Image.Resampling values


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open ``path`` as an RGB PIL image, raising :class:`ImageReadError` with the reason if it cannot.

    16-bit greyscale images (PNG/TIFF modes ``I;16``, ``I;16B``, ``I``) are scaled to 8 bits by
    :func:`to_rgb`. An image over Pillow's pixel limit (``PIL.Image.MAX_IMAGE_PIXELS``, its
    decompression-bomb guard) is refused, the warning case included, before it is decoded.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    if not os.path.exists(path):
        raise ImageReadError(f"image file not found: {os.fspath(path)}")
    if os.path.isdir(path):
        raise ImageReadError(f"{os.fspath(path)} is a directory; give an image file (JPEG, PNG, ...)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(
            f"refused {os.fspath(path)}: {exc} Downscale the image, or if you trust it raise "
            "PIL.Image.MAX_IMAGE_PIXELS in Python"
        ) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(
            f"cannot read {os.fspath(path)} as an image ({type(exc).__name__}: {exc}); give a JPEG, PNG or "
            "other format Pillow can open"
        ) from exc


_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB. Pillow's own ``convert("RGB")`` clips 16-bit greyscale to white; here ``I;16*``
    images are divided by 257 (65535 -> 255: the full 16-bit range maps onto the 8-bit one, so brightness
    is kept), and 32-bit ``I`` images likewise when any value exceeds 255 (else they already are 8-bit
    values). Values outside 0..255 after scaling are clipped."""
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "I":
        wide = img.convert("I")
        _, high = wide.getextrema()
        if img.mode != "I" or high > 255:
            wide = wide.point(lambda v: v * (1 / 257))
        return wide.convert("L").convert("RGB")
    return img.convert("RGB")


def resize_shorter_side(img: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Resize so the shorter side is ``size``, keeping the aspect (the longer side is truncated, as torchvision)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return img.resize((new_w, new_h), resample=_PIL_FILTERS[interpolation])


def center_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The central ``size`` (H, W) region (offsets rounded as torchvision does)."""
    crop_h, crop_w = size
    w, h = img.size
    if crop_h > h or crop_w > w:
        raise ValueError(f"cannot centre-crop {crop_h}x{crop_w} from a {h}x{w} image; resize it first")
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return img.crop((left, top, left + crop_w, top + crop_h))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float ``[3, H, W]`` tensor in [0, 1]."""
    import torch

    w, h = img.size
    data = torch.frombuffer(bytearray(to_rgb(img).tobytes()), dtype=torch.uint8)
    return data.view(h, w, 3).permute(2, 0, 1).float().div_(255.0)


@dataclass(frozen=True)
class EvalTransform:
    """Resize the shorter side, centre-crop, to tensor, normalise; call it on a PIL image.

    ``denormalize`` undoes the last step (for drawing the model's input back as a picture).
    """

    resize: int
    crop: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.interpolation not in _PIL_FILTERS:
            raise ValueError(
                f"interpolation must be one of {sorted(_PIL_FILTERS)}; got {self.interpolation!r}"
            )

    def crop_image(self, img: Image.Image) -> Image.Image:
        """The geometric part only: the RGB picture the model sees, before normalisation."""
        return center_crop(resize_shorter_side(to_rgb(img), self.resize, self.interpolation), self.crop)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        import torch

        x = to_tensor(self.crop_image(img))
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``[..., 3, H, W]`` -> values in [0, 1]."""
        import torch

        mean = torch.tensor(self.mean, dtype=x.dtype).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(3, 1, 1)
        return (x * std + mean).clamp(0, 1)

    def steps(self) -> list[str]:
        """The transform in words, one step per line (what ``deit-registry info`` prints)."""
        return [
            f"resize the shorter side to {self.resize} ({self.interpolation}, aspect ratio kept)",
            f"centre-crop {self.crop[0]}x{self.crop[1]}",
            "to a float tensor in [0, 1], RGB, channels first",
            f"normalise with mean {self.mean} and std {self.std}",
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "resize": self.resize,
            "crop": list(self.crop),
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def __str__(self) -> str:
        return "; ".join(self.steps())


def eval_transform(variant: str | Variant) -> EvalTransform:
    """The official evaluation transform of a variant (by name, with or without its ``.fb_in1k`` tag)."""
    if isinstance(variant, str):
        from .registry import get_pretrained_cfg

        cfg = get_pretrained_cfg(variant)  # UnknownModelError with suggestions for a bad name
        if not isinstance(cfg, Variant):
            raise ValueError(f"{variant!r} is not one of the DeiT variants ({', '.join(VARIANTS)})")
        variant = cfg
    w = variant.weights
    return EvalTransform(
        resize=w.eval_resize,
        crop=(w.input_size[1], w.input_size[2]),
        mean=w.mean,
        std=w.std,
        interpolation=w.interpolation,
    )
