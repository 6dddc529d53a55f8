"""A ViTDet-style simple feature pyramid: DeiT as a stride 4/8/16/32 backbone for FPN and UNet decoders.

A plain ViT has one stride (16). :class:`FeaturePyramid` takes the patch-token maps of four blocks and
resamples them as ViTDet's simple feature pyramid does (Li et al., 2022): two stride-2 transposed
convolutions to stride 4, one to stride 8, the map itself at stride 16, 2x2 max-pooling to stride 32::

    import torch
    from deit_registry import create_model
    from deit_registry.pyramid import FeaturePyramid

    backbone = create_model("deit_small_patch16_224", dynamic_img_size=True)
    pyramid = FeaturePyramid(backbone)                      # blocks 2, 5, 8, 11; the head is pruned
    p4, p8, p16, p32 = pyramid(torch.randn(1, 3, 512, 1024))
    pyramid.feature_info.channels(), pyramid.feature_info.reduction()   # [96, 192, 384, 384], [4, 8, 16, 32]

With ``out_chans=256`` every level is projected to 256 channels (ViTDet's 1x1 + 3x3 convolutions with
channel LayerNorm), as FPN heads expect.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import DeiT, feature_take_indices


class FeatureInfoList(list):
    """``feature_info`` as a list of dicts (``module``, ``num_chs``, ``reduction``) that also answers timm's
    ``channels()`` and ``reduction()`` questions (what segmentation_models_pytorch and mmdet read)."""

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``[B, C, H, W]`` map (ViTDet's norm in the pyramid)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def default_pyramid_indices(depth: int) -> list[int]:
    """Four evenly spaced blocks ending with the last: ``[2, 5, 8, 11]`` for depth 12."""
    if depth < 4:
        raise ValueError(f"a feature pyramid needs 4 blocks to read from; the model has {depth}")
    return [depth * (i + 1) // 4 - 1 for i in range(4)]


class FeaturePyramid(nn.Module):
    """Four maps at strides 4, 8, 16 and 32 from four blocks of a DeiT (ViTDet's simple feature pyramid).

    Args:
        backbone: a :class:`~deit_registry.architecture.DeiT`; build it with ``dynamic_img_size=True`` to
            take any input size (multiples of 32 keep every level exact).
        indices: the block each level reads, stride 4 to 32 (default :func:`default_pyramid_indices`); a
            block may feed several levels.
        out_chans: project every level to this many channels (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d);
            ``None`` keeps ViTDet's widths ``D/4, D/2, D, D``.
        norm: apply the backbone's final norm to each map first.
        prune: drop the blocks after the deepest index and the classifier head from ``backbone``, which this
            module then owns (unused parameters would stall DistributedDataParallel).

    ``forward(x)`` returns the list ``[p4, p8, p16, p32]``; ``feature_info`` describes them.
    """

    def __init__(
        self,
        backbone: DeiT,
        indices: Sequence[int] | None = None,
        out_chans: int | None = None,
        norm: bool = False,
        prune: bool = True,
    ) -> None:
        super().__init__()
        depth = len(backbone.blocks)
        if indices is None:
            indices = default_pyramid_indices(depth)
        if len(indices) != 4:
            raise ValueError(f"indices must name 4 blocks (for strides 4, 8, 16, 32); got {list(indices)}")
        self.indices, _ = feature_take_indices(depth, list(indices))
        if prune:
            backbone.prune_intermediate_layers(self.indices, prune_norm=not norm, prune_head=True)
        self.backbone = backbone
        self.norm = norm
        dim = backbone.embed_dim
        patch = backbone.patch_embed.patch_size[0]
        if patch % 4 != 0:
            raise ValueError(f"the pyramid needs a patch size divisible by 4; got {patch}")
        self.stages = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
                    LayerNorm2d(dim // 2),
                    nn.GELU(),
                    nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2),
                ),
                nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
                nn.Identity(),
                nn.MaxPool2d(2, stride=2),
            ]
        )
        widths = [dim // 4, dim // 2, dim, dim]
        if out_chans is not None:
            self.projections = nn.ModuleList(
                [
                    nn.Sequential(
                        nn.Conv2d(w, out_chans, 1, bias=False),
                        LayerNorm2d(out_chans),
                        nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False),
                        LayerNorm2d(out_chans),
                    )
                    for w in widths
                ]
            )
            widths = [out_chans] * 4
        else:
            self.projections = nn.ModuleList([nn.Identity() for _ in widths])
        self.feature_info = FeatureInfoList(
            dict(module=f"stages.{i}", num_chs=w, reduction=r)
            for i, (w, r) in enumerate(zip(widths, (patch // 4, patch // 2, patch, patch * 2)))
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # forward_intermediates returns each block once, shallow to deep (timm's convention); a block may feed
        # several levels (ViTDet's simple pyramid reads the last one four times).
        taken = sorted(set(self.indices))
        maps = self.backbone.forward_intermediates(
            x, taken, norm=self.norm, stop_early=True, output_fmt="NCHW", intermediates_only=True
        )
        by_block = dict(zip(taken, maps))
        return [
            proj(stage(by_block[i])) for i, stage, proj in zip(self.indices, self.stages, self.projections)
        ]
