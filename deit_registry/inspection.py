"""Looking inside a DeiT: per-layer attention probabilities and DINO-style class-token heat maps.

Normal forwards use the fused ``scaled_dot_product_attention`` kernel, which never materialises the
probabilities. :func:`attention_maps` puts a forward hook (public ``register_forward_hook``) on every attention
layer for the duration of a ``with`` block; the hook recomputes softmax(QK^T / sqrt(d)) from the layer's input
and its own qkv weights, so the model's forward itself is unchanged::

    import torch
    from deit_registry import create_model
    from deit_registry.inspection import attention_maps, class_token_heatmaps

    model = create_model("deit_small_patch16_224").eval()
    with attention_maps(model) as rec, torch.no_grad():
        model(images)
    rec.maps                 # one [B, heads, N, N] tensor per block (N = prefix tokens + patches)
    heat = class_token_heatmaps(model, images)      # [B, heads, H, W] last-layer class-token attention
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import Attention


def attention_probabilities(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """softmax(QK^T / sqrt(d)) of ``attn`` for its input ``x`` ``[B, N, D]``: ``[B, heads, N, N]`` (detached)."""
    with torch.no_grad():
        b, n, _ = x.shape
        weight = attn.qkv.weight  # a method of the fast copy's int8 layers, which only run as a whole
        qkv = F.linear(x, weight, attn.qkv.bias) if isinstance(weight, torch.Tensor) else attn.qkv(x)
        qk = qkv[..., : 2 * attn.num_heads * attn.head_dim]
        q, k = qk.reshape(b, n, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


class AttentionRecorder:
    """What :func:`attention_maps` yields: the attention layers it watches, in forward order, and what they
    computed in the last forward pass."""

    def __init__(self, layers: list[Attention]) -> None:
        self.layers = layers
        self._maps: list[torch.Tensor | None] = [None] * len(layers)

    def _hook(self, index: int):
        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            # A new pass: one that stops early must not leave the deeper maps of an older one.
            if index == 0:
                self._maps = [None] * len(self.layers)
            self._maps[index] = attention_probabilities(self.layers[index], args[0])

        return record

    @property
    def maps(self) -> list[torch.Tensor]:
        """Attention probabilities of the last forward pass, one ``[B, heads, N, N]`` tensor per layer."""
        if all(m is None for m in self._maps):
            raise RuntimeError(
                "no attention recorded yet: run a forward pass inside the `with attention_maps(model)`"
            )
        if any(m is None for m in self._maps):
            missing = [i for i, m in enumerate(self._maps) if m is None]
            raise RuntimeError(
                f"the last forward pass stopped before attention layer(s) {missing}; run a full forward pass "
                f"(not stop_early, or indices short of the last block) to record every layer"
            )
        return list(self._maps)  # type: ignore[arg-type]


@contextmanager
def attention_maps(model: nn.Module) -> Iterator[AttentionRecorder]:
    """Record every attention layer's probabilities during the ``with`` block.

    The model computes what it always does; a forward hook per layer recomputes the probabilities from the
    layer's input (one extra q/k projection per layer, detached: the maps do not keep the autograd graph
    alive). On exit the hooks are removed and the recorded tensors released.
    """
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no deit_registry attention layers to record")
    recorder = AttentionRecorder(layers)
    handles = [layer.register_forward_hook(recorder._hook(i)) for i, layer in enumerate(layers)]
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()
        recorder._maps = [None] * len(layers)


def attention_to_heatmaps(
    attention: torch.Tensor,
    grid_size: tuple[int, int],
    num_prefix_tokens: int,
    patch_size: int = 16,
    token_index: int = 0,
    image_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """One layer's attention ``[B, heads, queries, N]`` (queries: N, or the prefix tokens alone) -> per-head maps
    ``[B, heads, H, W]`` of how much token ``token_index`` (0: the class token, 1: the distillation token)
    attends to each patch.

    Each patch's weight fills its ``patch_size`` x ``patch_size`` square (nearest upsampling, as DINO's
    visualisations); ``image_size`` crops padding away (inputs padded by ``dynamic_img_pad``).
    """
    b, heads, _, n = attention.shape  # n keys: every token
    gh, gw = grid_size
    if n != num_prefix_tokens + gh * gw:
        raise ValueError(
            f"attention over {n} tokens does not match {num_prefix_tokens} prefix tokens + a {gh}x{gw} patch grid"
        )
    if not 0 <= token_index < num_prefix_tokens:
        raise ValueError(
            f"token_index must name a prefix token (0 to {num_prefix_tokens - 1}); got {token_index}"
        )
    maps = attention[:, :, token_index, num_prefix_tokens:].reshape(b, heads, gh, gw)
    maps = F.interpolate(maps, scale_factor=patch_size, mode="nearest")
    if image_size is not None:
        maps = maps[..., : image_size[0], : image_size[1]]
    return maps


@torch.no_grad()
def class_token_heatmaps(model: nn.Module, images: torch.Tensor, token_index: int = 0) -> torch.Tensor:
    """Run ``model`` on ``images`` ``[B, C, H, W]`` and return the last layer's class-token attention as
    per-head heat maps at image resolution, ``[B, heads, H, W]``: each pixel holds the attention probability
    of the patch it lies in. ``token_index=1`` shows the distillation token of distilled models."""
    height, width = images.shape[-2:]
    grid = model.patch_embed.dynamic_feat_size((height, width))
    with attention_maps(model) as rec:
        model.forward_features(images)
        last = rec.maps[-1]
    return attention_to_heatmaps(
        last, grid, model.num_prefix_tokens, model.patch_embed.patch_size[0], token_index, (height, width)
    )
