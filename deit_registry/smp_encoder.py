"""DeiT as a segmentation_models_pytorch encoder (through the stride 4/8/16/32 :class:`FeaturePyramid`).

smp's ``Unet``, ``FPN``, ``UnetPlusPlus``... take an encoder by name; :func:`register_smp_encoders` adds the
eight DeiT names to smp's encoder table::

    import segmentation_models_pytorch as smp
    from deit_registry.smp_encoder import register_smp_encoders

    register_smp_encoders()
    unet = smp.Unet("deit_small_patch16_224", encoder_weights=None, classes=21)
    masks = unet(torch.randn(2, 3, 512, 512))          # [2, 21, 512, 512]; any size divisible by 32

smp's own ``encoder_weights`` must stay ``None``: ``register_smp_encoders(pretrained=True)`` makes every DeiT
encoder load the official weights through :func:`deit_registry.create_model` instead.
segmentation_models_pytorch is imported only by :func:`register_smp_encoders`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .pyramid import FeaturePyramid


class DeiTSmpEncoder(nn.Module):
    """smp's encoder contract: ``forward(x)`` returns maps at strides 1, 2, 4, 8, 16, 32 (the input itself and
    an empty stride-2 map, as smp does for transformer encoders) and ``out_channels`` lists their widths.

    Args:
        model_name: one of the DeiT names.
        depth: smp's encoder depth; only 5 (strides up to 32) is supported.
        output_stride: must be 32 (a ViT cannot be dilated).
        pretrained: load the official ImageNet weights into the backbone.
        **pyramid_kwargs: passed to :class:`FeaturePyramid` (``indices``, ``out_chans``, ``norm``).
    """

    def __init__(
        self,
        model_name: str,
        depth: int = 5,
        output_stride: int = 32,
        pretrained: bool = False,
        in_channels: int = 3,
        **pyramid_kwargs: Any,
    ) -> None:
        super().__init__()
        if depth != 5:
            raise ValueError(f"DeiT encoders provide strides 4 to 32: use encoder_depth=5 (got {depth})")
        if output_stride != 32:
            raise ValueError(f"a ViT cannot be dilated: use encoder_output_stride=32 (got {output_stride})")
        from .registry import create_model

        backbone = create_model(
            model_name, pretrained=pretrained, in_chans=in_channels, dynamic_img_size=True
        )
        self.pyramid = FeaturePyramid(backbone, **pyramid_kwargs)
        self._in_channels = in_channels
        self._depth = depth
        self._output_stride = output_stride
        self.out_channels = [in_channels, 0, *self.pyramid.feature_info.channels()]

    @property
    def output_stride(self) -> int:
        return self._output_stride

    def set_in_channels(self, in_channels: int, pretrained: bool = True) -> None:
        if in_channels != self._in_channels:
            raise ValueError(
                f"this DeiT encoder was built for {self._in_channels} input channels; got in_channels={in_channels}"
            )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b, _, h, w = x.shape
        stride2 = x.new_empty(b, 0, h // 2, w // 2)
        return [x, stride2, *self.pyramid(x)]


def register_smp_encoders(pretrained: bool = False, **pyramid_kwargs: Any) -> list[str]:
    """Add the eight DeiT names to segmentation_models_pytorch's encoder table; return the names.

    Build models with ``encoder_weights=None``; ``pretrained=True`` loads the official weights into every
    DeiT encoder built afterwards. ``pyramid_kwargs`` (``indices``, ``out_chans``, ``norm``) configure them.
    """
    from segmentation_models_pytorch.encoders import encoders

    from .variants import VARIANTS

    for name in VARIANTS:
        encoders[name] = dict(
            encoder=DeiTSmpEncoder,
            params=dict(model_name=name, pretrained=pretrained, **pyramid_kwargs),
            pretrained_settings={},
        )
    return list(VARIANTS)
