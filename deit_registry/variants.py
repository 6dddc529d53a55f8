"""The eight DeiT variants and their pretrained metadata: the single source of truth.

Every other part of the package (constructors, timm ``pretrained_cfg``, torch.hub, weight downloads, the CLI)
reads this table::

    from deit_registry.variants import VARIANTS
    v = VARIANTS["deit_small_distilled_patch16_224"]
    v.arch.embed_dim, v.weights.url, v.weights.top1, v.weights.eval_resize   # 384, 'https://...', 81.2, 256

This module imports nothing heavy (no torch), so listing models stays instant.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from .errors import UnknownModelError

OFFICIAL_URL_ROOT = "https://dl.fbaipublicfiles.com/deit/"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAPER = (
    "Touvron et al., Training data-efficient image transformers & distillation through attention, ICML 2021"
)
PAPER_URL = "https://arxiv.org/abs/2012.12877"


@dataclass(frozen=True)
class Architecture:
    """The shape of a DeiT: everything :class:`deit_registry.architecture.DeiT` needs besides options."""

    embed_dim: int
    num_heads: int
    img_size: int
    distilled: bool
    depth: int = 12
    patch_size: int = 16
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class PretrainedWeights:
    """Where a variant's ImageNet-1k weights come from and how they were evaluated.

    ``crop_pct`` 0.875 is the official evaluation (resize the shorter side to ``int(size / 0.875)`` with
    bicubic interpolation, centre-crop ``size``): the published accuracies were measured that way.
    """

    file_name: str
    hf_hub_id: str
    transformers_id: str
    top1: float
    top5: float
    input_size: tuple[int, int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"
    num_classes: int = 1000
    license: str = "apache-2.0"
    tag: str = "fb_in1k"
    hf_hub_filename: str = "model.safetensors"

    @property
    def url(self) -> str:
        """The official checkpoint on Meta's CDN."""
        return OFFICIAL_URL_ROOT + self.file_name

    @property
    def sha256_prefix(self) -> str:
        """The first 8 hex digits of the official file's sha256 (torch.hub's ``check_hash`` convention)."""
        return self.file_name.rsplit("-", 1)[1].split(".")[0]

    @property
    def eval_resize(self) -> int:
        """Shorter-side resize of the evaluation transform: 256 for 224 models, 438 for 384."""
        return int(self.input_size[-1] / self.crop_pct)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The 1000 ImageNet-1k class names in label order."""
        return imagenet_class_names()


@dataclass(frozen=True)
class Variant:
    """One named DeiT: architecture, pretrained weights and their cost."""

    name: str
    arch: Architecture
    weights: PretrainedWeights
    num_params: int
    gmacs: (
        float  # billions of multiply-accumulates at the native resolution, 1000 classes (the paper's "FLOPs")
    )
    paper: str = field(default=PAPER)

    def model_kwargs(self) -> dict[str, Any]:
        """The :class:`~deit_registry.architecture.DeiT` arguments that build this variant as published."""
        a = self.arch
        return dict(
            img_size=a.img_size,
            patch_size=a.patch_size,
            embed_dim=a.embed_dim,
            depth=a.depth,
            num_heads=a.num_heads,
            mlp_ratio=a.mlp_ratio,
            distilled=a.distilled,
            num_classes=self.weights.num_classes,
        )

    @property
    def default_head(self) -> str:
        return "distilled" if self.arch.distilled else "classifier"

    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's ``pretrained_cfg`` fields of the published weights (the official crop 0.875, bicubic, the
        official URL and timm's copy on the Hub), as the plain dict every model of this variant carries::

            timm.data.resolve_model_data_config(dr.create_model("deit_base_patch16_384"))["input_size"]
        """
        w = self.weights
        return dict(
            architecture=self.name,  # as timm's default_cfgs give every model (save_for_hf reads it)
            tag=PRETRAINED_TAG,
            custom_load=False,
            url=w.url,
            hf_hub_id=w.hf_hub_id,
            hf_hub_filename=w.hf_hub_filename,
            input_size=w.input_size,
            fixed_input_size=True,
            interpolation=w.interpolation,
            crop_pct=w.crop_pct,
            crop_mode=w.crop_mode,
            mean=w.mean,
            std=w.std,
            num_classes=w.num_classes,
            pool_size=None,
            first_conv="patch_embed.proj",
            classifier=("head", "head_dist") if self.arch.distilled else "head",
            license=w.license,
            description=f"{self.name}: ImageNet-1k top-1 {w.top1}, top-5 {w.top5} (official weights)",
            origin_url="https://github.com/facebookresearch/deit",
            paper_name=self.paper,
            paper_ids="arXiv:2012.12877",
        )


@cache
def imagenet_class_names() -> tuple[str, ...]:
    """The ImageNet-1k class names, index = label."""
    text = resources.files(__package__).joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line)


def _variant(
    size: str,
    res: int,
    distilled: bool,
    sha8: str,
    num_params: int,
    gmacs: float,
    top1: float,
    top5: float,
) -> Variant:
    width, heads = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}[size]
    kind = "distilled_" if distilled else ""
    name = f"deit_{size}_{kind}patch16_{res}"
    hf_kind = "distilled-" if distilled else ""
    return Variant(
        name=name,
        arch=Architecture(embed_dim=width, num_heads=heads, img_size=res, distilled=distilled),
        weights=PretrainedWeights(
            file_name=f"{name}-{sha8}.pth",
            hf_hub_id=f"timm/{name}.fb_in1k",
            transformers_id=f"facebook/deit-{size}-{hf_kind}patch16-{res}",
            top1=top1,
            top5=top5,
            input_size=(3, res, res),
        ),
        num_params=num_params,
        gmacs=gmacs,
    )


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        _variant("tiny", 224, False, "a1311bcf", 5_717_416, 1.25, 72.2, 91.1),
        _variant("small", 224, False, "cd65a155", 22_050_664, 4.60, 79.9, 95.0),
        _variant("base", 224, False, "b5f2ef4d", 86_567_656, 17.56, 81.8, 95.6),
        _variant("base", 384, False, "8de9b5d1", 86_859_496, 55.48, 82.9, 96.2),
        _variant("tiny", 224, True, "b40b3cf7", 5_910_800, 1.26, 74.5, 91.9),
        _variant("small", 224, True, "649709d9", 22_436_432, 4.62, 81.2, 95.4),
        _variant("base", 224, True, "df68dfff", 87_338_192, 17.66, 83.4, 96.5),
        _variant("base", 384, True, "d0272ac0", 87_630_032, 55.59, 85.2, 97.2),
    )
}


PRETRAINED_TAG = (
    "fb_in1k"  # timm's tag for the official ImageNet-1k weights: "deit_small_patch16_224.fb_in1k"
)


def get_variant(name: str | Variant) -> Variant:
    """The :class:`Variant` for a name, a tagged name or a variant (returned as is)::

        get_variant("deit_tiny_patch16_224") is get_variant("deit_tiny_patch16_224.fb_in1k")   # True

    Raises :class:`~deit_registry.errors.UnknownModelError` (listing the close names) for anything else.
    """
    if isinstance(name, Variant):
        return name
    base, _, tag = str(name).partition(".")
    variant = VARIANTS.get(base)
    if variant is not None and tag in ("", PRETRAINED_TAG):
        return variant
    if variant is not None:  # a known architecture with a tag we do not publish
        raise UnknownModelError(str(name), [f"{base}.{PRETRAINED_TAG}"], len(VARIANTS))
    close = difflib.get_close_matches(base, list(VARIANTS), n=5, cutoff=0.5)
    close = close or [n for n in VARIANTS if base and base in n][:5]
    raise UnknownModelError(str(name), close, len(VARIANTS))
