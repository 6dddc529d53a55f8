"""DeiT as a segmentation_models_pytorch encoder (through the stride 4/8/16/32 :class:`FeaturePyramid`).

:func:`register_smp_encoders` adds the eight DeiT names to smp's public encoder table (``smp.encoders.encoders``,
the table smp's own encoders live in); then every smp architecture takes them by name::

    import segmentation_models_pytorch as smp
    import deit_registry

    deit_registry.register_smp_encoders()
    unet = smp.Unet("deit_small_patch16_224", encoder_weights=None, in_channels=1, classes=21)
    masks = unet(torch.randn(2, 1, 512, 512))             # [2, 21, 512, 512]; sizes divisible by 32
    dlv3 = smp.DeepLabV3Plus("deit_small_patch16_224", encoder_weights=None, encoder_output_stride=16)

Weights, three ways:

- ``encoder_weights="imagenet"`` (smp's default): smp downloads ``model.safetensors`` of timm's Hub mirror of the
  official weights (``timm/<name>.fb_in1k``, through huggingface_hub, so ``HF_HUB_OFFLINE`` / ``HF_HUB_CACHE``
  apply) and the encoder loads it;
- ``register_smp_encoders(pretrained=True)``: the official weights through :func:`deit_registry.create_model`
  (Meta's URL, the torch.hub cache, the package's usual sources), with ``encoder_weights=None``;
- ``register_smp_encoders(pretrained=True, weights=PATH)``: a local file/folder, URL or ``hf-hub:`` id.

``smp.from_pretrained(dir)`` and ``Model.from_pretrained`` need the names registered in the loading process too:
call ``deit_registry.register_smp_encoders()`` (with the same ``pyramid_kwargs`` as when saving) first.
A ViT has one native stride, 16: ``encoder_output_stride=16`` (DeepLabV3's default is 8: pass 16) makes the
deepest map the stride-16 one instead of max-pooling it to stride 32. segmentation_models_pytorch is imported
only by :func:`register_smp_encoders`.
"""

from __future__ import annotations

import re
from collections import namedtuple
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .pyramid import FeaturePyramid

# The checkpoint keys a FeaturePyramid prunes from its backbone (final norm, classifier, blocks past the deepest
# index): present in every full checkpoint, absent from the pruned model, so dropped before loading.
_PRUNABLE = re.compile(r"^(norm|fc_norm|head|head_dist)\.|^blocks\.(\d+)\.")
# What nn.Module.load_state_dict returns (missing, unexpected): a backbone checkpoint leaves neither.
IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


class DeiTSmpEncoder(nn.Module):
    """smp's encoder contract: ``forward(x)`` returns maps at strides 1, 2, 4, 8, 16, 32 (the input itself and
    an empty stride-2 map, as smp does for transformer encoders) and ``out_channels`` lists their widths.

    Args:
        model_name: one of the DeiT names.
        depth: smp's encoder depth; only 5 (strides up to 32) is supported.
        output_stride: 32, or 16 (the deepest map stays at the ViT's native stride 16; for DeepLabV3/V3+).
        pretrained: load the official ImageNet weights (or ``weights``) into the backbone.
        weights: with ``pretrained=True``, the checkpoint to load instead: a file/folder, URL or ``hf-hub:`` id.
        in_channels: input channels; the patch embedding is adapted from the RGB weights when pretrained.
        **pyramid_kwargs: passed to :class:`FeaturePyramid` (``indices``, ``out_chans``, ``norm``).
    """

    def __init__(
        self,
        model_name: str,
        depth: int = 5,
        output_stride: int = 32,
        pretrained: bool = False,
        weights: str | None = None,
        in_channels: int = 3,
        **pyramid_kwargs: Any,
    ) -> None:
        super().__init__()
        if depth != 5:
            raise ValueError(f"DeiT encoders provide strides 4 to 32: use encoder_depth=5 (got {depth})")
        if weights is not None and not pretrained:
            raise ValueError("weights= is a checkpoint to load: pass pretrained=True with it")
        from .registry import create_model

        kwargs: dict[str, Any] = dict(in_chans=in_channels, dynamic_img_size=True)
        if weights is not None:
            kwargs["weights"] = weights
        backbone = create_model(model_name, pretrained=pretrained, **kwargs)
        self.name = model_name
        self.pyramid = FeaturePyramid(backbone, **pyramid_kwargs)
        self._in_channels = in_channels
        self._depth = depth
        self._output_stride = 32
        self._has_weights = pretrained
        self.out_channels = [in_channels, 0, *self.pyramid.feature_info.channels()]
        if output_stride != 32:
            self.make_dilated(output_stride)

    @property
    def output_stride(self) -> int:
        return self._output_stride

    def make_dilated(self, output_stride: int) -> None:
        """smp's request for a denser deepest map: 16 keeps it at the ViT's native stride (no max-pooling)."""
        if output_stride == self._output_stride:
            return
        if output_stride != 16:
            raise ValueError(
                f"a ViT's deepest map is at stride 16 or 32; got encoder_output_stride={output_stride}. "
                "Use encoder_output_stride=16 (DeepLabV3/V3+) or 32"
            )
        self.pyramid.stages[3] = nn.Identity()  # the stride-32 stage is a parameter-free 2x2 max-pool
        self.pyramid.feature_info[3]["reduction"] = self.pyramid.feature_info[2]["reduction"]
        self._output_stride = output_stride

    def set_in_channels(self, in_channels: int, pretrained: bool = True) -> None:
        """smp's ``in_channels``: rebuild the patch embedding for ``in_channels`` inputs.

        With loaded weights (``pretrained`` or weights already in the backbone) the RGB filters are adapted
        (summed for 1 channel, repeated and rescaled for more), as smp does for its own encoders.
        """
        if in_channels == self._in_channels:
            return
        from .weights.conversion import adapt_input_conv

        embed = self.pyramid.backbone.patch_embed
        old = embed.proj
        new = nn.Conv2d(
            in_channels,
            old.out_channels,
            kernel_size=old.kernel_size,
            stride=old.stride,
            bias=old.bias is not None,
        ).to(device=old.weight.device, dtype=old.weight.dtype)
        if pretrained or self._has_weights:
            with torch.no_grad():
                new.weight.copy_(adapt_input_conv(old.weight.detach(), in_channels))
                if old.bias is not None:
                    new.bias.copy_(old.bias.detach())
        embed.proj = new
        embed.in_chans = in_channels
        self.pyramid.backbone.in_chans = in_channels
        self._in_channels = in_channels
        self.out_channels[0] = in_channels

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """This encoder's own ``state_dict`` loads as usual; a DeiT checkpoint (official, timm or transformers
        layout, as smp's ``encoder_weights="imagenet"`` passes it) loads into the backbone, with the parts the
        pyramid pruned dropped and the usual checks of :func:`deit_registry.weights.load_checkpoint`."""
        if any(k.startswith("pyramid.") for k in state_dict):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        from .weights.conversion import is_transformers_layout, to_official
        from .weights.loading import load_checkpoint

        backbone = self.pyramid.backbone
        sd = to_official(state_dict) if is_transformers_layout(state_dict) else dict(state_dict)
        keep = backbone.state_dict()
        for key in list(sd):
            m = _PRUNABLE.match(key)
            pruned = m is not None and (m.group(2) is None or int(m.group(2)) >= len(backbone.blocks))
            if pruned and key not in keep:
                del sd[key]
        load_checkpoint(backbone, sd)  # adapts the position embedding and input channels, checks every key
        self._has_weights = True
        return IncompatibleKeys([], [])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b, _, h, w = x.shape
        stride2 = x.new_empty(b, 0, h // 2, w // 2)
        return [x, stride2, *self.pyramid(x)]


def register_smp_encoders(
    pretrained: bool = False, weights: str | None = None, **pyramid_kwargs: Any
) -> list[str]:
    """Add the eight DeiT names to segmentation_models_pytorch's encoder table; return the names.

    ``encoder_weights="imagenet"`` loads timm's Hub copy of the official weights; ``pretrained=True`` (with
    ``encoder_weights=None``) loads the official weights the package's way, or ``weights`` (a file/folder, URL
    or ``hf-hub:`` id) instead. ``pyramid_kwargs`` (``indices``, ``out_chans``, ``norm``) configure every DeiT
    encoder built afterwards; registering again replaces the settings. Call it again in a new process before
    ``smp.from_pretrained`` with the same ``pyramid_kwargs``.
    """
    from segmentation_models_pytorch.encoders import encoders

    from .variants import VARIANTS

    for name, variant in VARIANTS.items():
        encoders[name] = dict(
            encoder=DeiTSmpEncoder,
            params=dict(model_name=name, pretrained=pretrained, weights=weights, **pyramid_kwargs),
            pretrained_settings={"imagenet": dict(repo_id=variant.weights.hf_hub_id, revision=None)},
        )
    return list(VARIANTS)
