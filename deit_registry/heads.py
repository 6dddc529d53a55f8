"""Pluggable heads for :class:`deit_registry.architecture.DeiT`.

A head turns the final, normalised token sequence into the model's output. The model keeps the official
checkpoint layout, so heads live in two slots: ``head`` (reads the class token) and ``head_dist`` (reads the
distillation token of distilled models). Built-in kinds, chosen with ``head="..."``:

* ``"classifier"``: a linear classifier on the class token;
* ``"distilled"``: ``head`` on the class token and ``head_dist`` on the distillation token; returns their mean,
  or the pair ``(cls_logits, dist_logits)`` in training after ``model.set_distilled_training(True)``;
* ``"none"``: no classifier, the model returns pooled features (``num_classes=0`` spells the same);
* ``"mim"``: the SimMIM decoder of masked image modelling (1x1 conv to ``patch*patch*in_chans`` channels and
  ``PixelShuffle(patch)``), as transformers' ``DeiTForMaskedImageModeling``.

A user head is either an ``nn.Module`` passed as ``head=`` (it receives the pooled ``[B, D]`` feature), or a
named factory registered with :func:`register_head`::

    from torch import nn
    from deit_registry import create_model, register_head

    register_head("mlp", lambda spec: HeadModules(nn.Sequential(
        nn.Linear(spec.embed_dim, 256), nn.GELU(), nn.Linear(256, spec.num_classes))))
    model = create_model("deit_tiny_patch16_224", head="mlp", num_classes=10)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

HeadInput = Literal["pooled", "spatial"]


@dataclass(frozen=True)
class HeadSpec:
    """What a head factory needs to know about the model it is built for."""

    embed_dim: int
    num_classes: int
    distilled: bool
    patch_size: int
    in_chans: int


@dataclass
class HeadModules:
    """The modules a head factory returns.

    ``head`` reads the pooled class-token feature ``[B, D]`` (``head_input="pooled"``) or the patch-token map
    ``[B, D, H/16, W/16]`` (``head_input="spatial"``); ``head_dist``, if given, reads the distillation token.
    ``mask_token`` asks the model to create a learned mask token for ``bool_masked_pos``.
    """

    head: nn.Module
    head_dist: nn.Module | None = None
    head_input: HeadInput = "pooled"
    mask_token: bool = False


HeadFactory = Callable[[HeadSpec], HeadModules]
_HEADS: dict[str, HeadFactory] = {}


def register_head(name: str, factory: HeadFactory, *, overwrite: bool = False) -> None:
    """Make ``head=name`` build ``factory(spec)`` in every DeiT constructor."""
    if name in _HEADS and not overwrite:
        raise ValueError(f"a head named {name!r} is already registered; pass overwrite=True to replace it")
    _HEADS[name] = factory


def list_heads() -> list[str]:
    """Names accepted by ``head=``."""
    return sorted(_HEADS)


def _linear_or_identity(embed_dim: int, num_classes: int) -> nn.Module:
    return nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()


def _classifier(spec: HeadSpec) -> HeadModules:
    return HeadModules(_linear_or_identity(spec.embed_dim, spec.num_classes))


def _distilled(spec: HeadSpec) -> HeadModules:
    if not spec.distilled:
        raise ValueError(
            "head='distilled' needs a distillation token; use a *_distilled_* model or head='classifier'"
        )
    return HeadModules(
        _linear_or_identity(spec.embed_dim, spec.num_classes),
        _linear_or_identity(spec.embed_dim, spec.num_classes),
    )


def _features(spec: HeadSpec) -> HeadModules:
    # Distilled models keep an identity pair so that the pooled feature is the mean of the class and
    # distillation tokens, the same vector the distilled classifier pair reads.
    return HeadModules(nn.Identity(), nn.Identity() if spec.distilled else None)


class MaskedImageModelingHead(nn.Module):
    """SimMIM decoder: patch-token map ``[B, D, h, w]`` -> reconstructed image ``[B, C, 16h, 16w]``."""

    def __init__(self, embed_dim: int, patch_size: int = 16, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.conv = nn.Conv2d(embed_dim, patch_size * patch_size * in_chans, kernel_size=1)
        self.shuffle = nn.PixelShuffle(patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x))

    def loss(
        self, pixel_values: torch.Tensor, reconstruction: torch.Tensor, bool_masked_pos: torch.Tensor
    ) -> torch.Tensor:
        """Masked L1 loss: the mean absolute error over the pixels of masked patches only."""
        return masked_image_modeling_loss(pixel_values, reconstruction, bool_masked_pos, self.patch_size)


def masked_image_modeling_loss(
    pixel_values: torch.Tensor, reconstruction: torch.Tensor, bool_masked_pos: torch.Tensor, patch_size: int
) -> torch.Tensor:
    """L1 reconstruction loss counted on masked patches only (SimMIM; transformers' normalisation).

    ``bool_masked_pos`` is ``[B, num_patches]`` (row-major over the patch grid).
    """
    b, c, h, w = pixel_values.shape
    grid_h, grid_w = h // patch_size, w // patch_size
    mask = bool_masked_pos.reshape(b, grid_h, grid_w).to(pixel_values.dtype)
    mask = mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1)
    per_pixel = F.l1_loss(pixel_values, reconstruction, reduction="none")
    return (per_pixel * mask).sum() / (mask.sum() + 1e-5) / c


def _mim(spec: HeadSpec) -> HeadModules:
    return HeadModules(
        MaskedImageModelingHead(spec.embed_dim, spec.patch_size, spec.in_chans),
        head_input="spatial",
        mask_token=True,
    )


register_head("classifier", _classifier)
register_head("distilled", _distilled)
register_head("none", _features)
register_head("mim", _mim)


def build_head(head: str | nn.Module | None, spec: HeadSpec) -> tuple[str, HeadModules]:
    """Resolve ``head=`` into ``(kind, modules)``; ``None`` picks the variant's default."""
    if isinstance(head, nn.Module):
        return "custom", HeadModules(head)
    if head is None:
        head = "none" if spec.num_classes == 0 else ("distilled" if spec.distilled else "classifier")
    if head not in _HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {list_heads()} or pass an nn.Module")
    return head, _HEADS[head](spec)
