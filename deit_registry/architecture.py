"""The DeiT architecture (torch only): patch embedding, class and distillation tokens, position embedding,
pre-norm transformer blocks and a pluggable head, laid out as timm's ``vision_transformer.py``.

State-dict keys are those of the official checkpoints (``cls_token``, ``dist_token``, ``pos_embed``,
``patch_embed.proj.*``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``, ``norm.*``,
``head.*``, ``head_dist.*``), so an official checkpoint loads with ``strict=True``::

    from deit_registry import DeiT
    model = DeiT(embed_dim=384, depth=12, num_heads=6, distilled=True)
    logits = model(torch.randn(2, 3, 224, 224))        # [2, 1000], mean of the two heads

The patch embedding, MLP, stochastic depth and position-embedding resampling live in
:mod:`deit_registry.layers` (timm keeps them in ``timm.layers``).
"""

from typing import Any, Final

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .heads import HeadSpec, build_head
from .layers import (
    DropPath,
    IntOrPair,
    Mlp,
    PatchEmbed,
    _is_fx_proxy,
    feature_take_indices,
    resample_pos_embed,
)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (rows ordered q | k | v).

    ``fused_attn=True`` runs ``scaled_dot_product_attention``; ``False`` computes softmax(QK^T/sqrt(d)) V as
    two matmuls and a softmax (timm's switch, set from ``timm.layers.use_fused_attn()`` by timm's door).
    """

    fused_attn: bool

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused_attn = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = self.attend(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``[B, heads, queries, d]`` queries against ``[B, heads, N, d]`` keys and values."""
        dropout_p = self.attn_drop if self.training else 0.0
        if self.fused_attn:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return F.dropout(attn, dropout_p, self.training) @ v


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class DeiT(nn.Module):
    """Data-efficient image Transformer (Touvron et al., 2021), plain or distilled.

    Args:
        img_size: input size, an int or (H, W).
        patch_size: patch (and stride) of the patch embedding.
        in_chans: input channels.
        num_classes: classes of the classifier head(s); 0 for pooled features.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer shape.
        distilled: add the distillation token (and, by default, the distilled classifier pair).
        head: head kind (``"classifier"``, ``"distilled"``, ``"none"``, ``"mim"`` or a registered name) or an
            ``nn.Module`` applied to the pooled feature; ``None`` picks the variant's default.
        global_pool: ``"token"`` (class token, and distillation token for the pair), ``"avg"`` (mean of the
            patch tokens) or ``""`` (no pooling).
        drop_rate: dropout before the classifier; pos_drop_rate, proj_drop_rate, attn_drop_rate: dropouts
            after the position embedding, in the blocks, and on attention probabilities.
        drop_path_rate: stochastic depth, linearly increasing to this rate over the blocks.
        dynamic_img_size: resample the position embedding on every forward to the input's size.
        dynamic_img_pad: pad inputs that are not multiples of the patch size (with ``dynamic_img_size``; alone,
            as in timm, the input size stays fixed).
        norm_eps: LayerNorm epsilon (1e-6 in the official models; transformers' configs use 1e-12).

    ``forward(x)`` is ``forward_head(forward_features(x))`` for every head.
    """

    dynamic_img_size: Final[bool]
    head_input: Final[str]
    num_prefix_tokens: Final[int]
    global_pool: Final[str]
    __jit_unused_properties__ = ["_traits"]

    def __init__(
        self,
        img_size: IntOrPair = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        distilled: bool = False,
        head: str | nn.Module | None = None,
        global_pool: str = "token",
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        dynamic_img_size: bool = False,
        dynamic_img_pad: bool = False,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool must be 'token', 'avg' or ''; got {global_pool!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.distilled = distilled
        self.has_class_token = True
        self.num_prefix_tokens = 2 if distilled else 1
        self.num_reg_tokens = 0
        self.no_embed_class = False
        self.dynamic_img_size = dynamic_img_size
        self.global_pool = global_pool
        self.distilled_training = False
        self.grad_checkpointing = False
        self.norm_eps = norm_eps

        self.patch_embed = PatchEmbed(
            img_size,
            patch_size,
            in_chans,
            embed_dim,
            strict_img_size=not dynamic_img_size,  # as timm: padding alone keeps the position grid fixed
            dynamic_img_pad=dynamic_img_pad,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        num_tokens = self.patch_embed.num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # cpu: works under meta too
        block_args = (embed_dim, num_heads, mlp_ratio, qkv_bias, proj_drop_rate, attn_drop_rate)
        self.blocks = nn.Sequential(*[Block(*block_args, rates[i], norm_eps) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)
        ]
        self.mask_token: nn.Parameter | None = None
        # The patch grid of the last forward_features call, for spatial heads (see forward_head).
        self.feature_grid: tuple[int, int] = self.patch_embed.grid_size
        self._set_head(head, num_classes)
        self.init_weights()

    # ----------------------------------------------------------------------------------------- set-up
    def _set_head(self, head: str | nn.Module | None, num_classes: int) -> None:
        patch = self.patch_embed.patch_size[0]
        spec = HeadSpec(self.embed_dim, num_classes, self.distilled, patch, self.in_chans)
        self.head_kind, modules = build_head(head, spec)
        self.num_classes = num_classes
        self.head = modules.head
        self.head_dist = modules.head_dist if self.global_pool == "token" else None
        self.head_input = modules.head_input
        if modules.mask_token and self.mask_token is None:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))

    def init_weights(self) -> None:
        """Truncated-normal (std 0.02) tokens, position embedding and linear weights; zero biases."""
        for p in (self.pos_embed, self.cls_token, self.dist_token, self.mask_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def set_distilled_training(self, enable: bool = True) -> None:
        """Return the pair ``(cls_logits, dist_logits)`` in training mode, as the distillation loss needs."""
        self.distilled_training = enable

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass to save memory."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module | tuple[nn.Module, nn.Module]:
        return self.head if self.head_dist is None else (self.head, self.head_dist)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier(s) with fresh ones for ``num_classes`` (0: pooled features).

        Plain and distilled models behave alike: ``global_pool="token"`` keeps the distilled pair, ``"avg"``
        or ``""`` use the single ``head`` on the pooled patch tokens.
        """
        if global_pool is not None:
            if global_pool not in ("token", "avg", ""):
                raise ValueError(f"global_pool must be 'token', 'avg' or ''; got {global_pool!r}")
            self.global_pool = global_pool
        kind = self.head_kind if self.head_kind in ("classifier", "distilled") else None
        if num_classes == 0:
            kind = "none"
        # A distilled head stays one: _set_head leaves out head_dist unless the pool is "token", as when built.
        device, dtype = self.cls_token.device, self.cls_token.dtype
        self._set_head(kind, num_classes)
        for new in (self.head, self.head_dist):  # match the model: device, dtype, train/eval mode
            if new is not None:
                new.to(device=device, dtype=dtype).train(self.training)

    def no_weight_decay(self) -> set[str]:
        """Parameters that optimisers should not decay (timm's convention)."""
        return {"pos_embed", "cls_token", "dist_token", "mask_token"}

    def group_matcher(self, coarse: bool = False) -> dict[str, object]:
        """Parameter groups for layer-wise learning-rate decay (timm's format; the final norm joins the last
        block in both modes, as in timm's ViT and DeiT)."""
        return dict(
            stem=r"^cls_token|^pos_embed|^patch_embed|^dist_token|^mask_token",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    def set_input_size(self, img_size: IntOrPair) -> None:
        """Rebuild for a new input size, resampling the position embedding (prefix tokens kept)."""
        old_grid = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size)
        grid, prefix = self.patch_embed.grid_size, self.num_prefix_tokens
        new = resample_pos_embed(self.pos_embed.data, grid, old_grid, prefix)
        self.pos_embed = nn.Parameter(new, requires_grad=self.pos_embed.requires_grad)  # frozen stays frozen

    # timm (1.0.31 on) reads a model's current input size and whether it is fixed from ``model._traits``:
    # ``timm.models.get_model_input_config`` and ``timm.data.resolve_input_data_config``, with which its scripts
    # check ``--img-size``. ``build_model_with_cfg`` records them at construction, and only timm's private helper
    # updates them after a resize. The model answers live instead: what timm recorded, with its own current size.
    @property
    def _traits(self) -> dict[str, Any]:
        recorded = getattr(self, "_recorded_traits", {})
        return {
            **recorded,
            "img_size": self.patch_embed.img_size,
            "fixed_input_size": self.patch_embed.strict_img_size,
        }

    @_traits.setter
    def _traits(self, traits: dict[str, Any]) -> None:
        self._recorded_traits = dict(traits)

    # ----------------------------------------------------------------------------------------- forward
    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        pos_embed = self.pos_embed
        if self.dynamic_img_size:
            built = self.patch_embed.grid_size
            pos_embed = resample_pos_embed(pos_embed, grid, built, self.num_prefix_tokens)
        tokens = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            tokens.append(self.dist_token.expand(x.shape[0], -1, -1))
        tokens.append(x)
        return self.pos_drop(torch.cat(tokens, dim=1) + pos_embed)

    def _embed(self, x: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        grid = self.patch_embed.dynamic_feat_size((x.shape[-2], x.shape[-1]))
        x = self.patch_embed(x)
        # torch.fx passes every optional argument as a Proxy: an absent mask is then not a mask to apply.
        if bool_masked_pos is not None and (torch.jit.is_scripting() or not _is_fx_proxy(bool_masked_pos)):
            mask_token = self.mask_token
            if mask_token is None:
                raise ValueError(
                    "bool_masked_pos needs a model built with head='mim' (it owns the mask token)"
                )
            self._check_mask(bool_masked_pos, x.shape[0], grid)
            mask = bool_masked_pos.reshape(x.shape[0], -1, 1).to(x.dtype)
            x = x * (1.0 - mask) + mask_token.to(x.dtype) * mask
        if self.head_input == "spatial":
            self.feature_grid = grid
        return self._pos_embed(x, grid)

    def _check_mask(self, mask: torch.Tensor, batch: int, grid: tuple[int, int]) -> None:
        shape, rank = mask.shape, mask.dim()
        flat = rank == 2 and shape[0] == batch and shape[1] == grid[0] * grid[1]
        if not flat and not (rank == 3 and shape[0] == batch and shape[1] == grid[0] and shape[2] == grid[1]):
            raise ValueError(
                f"bool_masked_pos must have shape [B, num_patches] = [{batch}, {grid[0] * grid[1]}] or "
                f"[B, h, w] = [{batch}, {grid[0]}, {grid[1]}] for this input; got {list(shape)}"
            )

    def forward_features(self, x: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens after the final norm: ``[B, prefix + H/16 * W/16, D]`` (class, distillation, patches)."""
        x = self._embed(x, bool_masked_pos)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for blk in self.blocks:
                x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        """Pool the tokens from :meth:`forward_features` and apply the head.

        ``pre_logits=True`` returns the pooled feature: the class token, or for the distilled pair the mean of
        the class and distillation tokens (spatial heads: the patch tokens). A spatial head (``"mim"``) reads
        the patch grid of the last :meth:`forward_features` call from ``feature_grid``.
        """
        if self.head_input == "spatial":
            x = x[:, self.num_prefix_tokens :]
            if pre_logits:
                return x
            grid = self.feature_grid
            if not torch.jit.is_scripting() and not _is_fx_proxy(x):
                self._check_grid(x.shape[1], grid)
            return self.head(x.transpose(1, 2).reshape(x.shape[0], x.shape[2], grid[0], grid[1]))
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        elif self.global_pool == "token":
            if self.head_dist is not None:
                x, x_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
                if pre_logits:
                    return (x + x_dist) / 2
                x, x_dist = self.head(x), self.head_dist(x_dist)
                if self.distilled_training and self.training and not torch.jit.is_scripting():
                    return x, x_dist
                return (x + x_dist) / 2
            x = x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    @torch.jit.unused
    def _check_grid(self, num_patches: int, grid: tuple[int, int]) -> None:
        known = all(type(v) is int for v in (num_patches, *grid))  # symbolic sizes: nothing to check
        if known and grid[0] * grid[1] != num_patches:
            raise ValueError(
                f"forward_head got {num_patches} patch tokens but the last forward_features call made a "
                f"{grid[0]}x{grid[1]} grid: pass forward_head the output of forward_features on the same input"
            )

    def forward(self, x: torch.Tensor, bool_masked_pos: torch.Tensor | None = None):
        """Image batch ``[B, C, H, W]`` -> the head's output: ``forward_head(forward_features(x))``."""
        return self.forward_head(self.forward_features(x, bool_masked_pos))

    # ------------------------------------------------------------------------------------ intermediates
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Outputs of selected blocks, as timm's ``forward_intermediates``.

        Args:
            indices: ``None`` every block, an int ``n`` the last ``n``, a list those blocks.
            return_prefix_tokens: pair each map with its prefix tokens ``[B, prefix, D]`` (class first).
            norm: apply the final norm to each intermediate.
            stop_early: stop after the last block asked for.
            output_fmt: ``"NCHW"`` maps ``[B, D, H/16, W/16]`` or ``"NLC"`` tokens ``[B, H/16 * W/16, D]``.
            intermediates_only: return only the list, not ``(final_features, list)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC'; got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        b, _, height, width = x.shape
        grid = self.patch_embed.dynamic_feat_size((height, width))
        x = self._embed(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[: max_index + 1]
        intermediates: list[torch.Tensor] = []
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        npt = self.num_prefix_tokens
        prefix_tokens = [y[:, :npt] for y in intermediates]
        intermediates = [y[:, npt:] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [
                y.reshape(b, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous() for y in intermediates
            ]
        if not torch.jit.is_scripting() and return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks (and optionally norm and head) that ``forward_intermediates(indices)`` never needs."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")  # as timm: forward then returns every token
        return take_indices

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | list[int] = 1,
        reshape: bool = False,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        return_class_token: bool = False,
    ) -> tuple:
        """DINO-style access: the last ``n`` blocks (or blocks ``n``), as tokens or ``reshape``-d maps.

        ``return_prefix_tokens`` pairs each with its prefix tokens ``[B, prefix, D]`` (timm);
        ``return_class_token`` with the class token alone, ``[B, D]`` (DINOv2's spelling).
        """
        out = self.forward_intermediates(
            x,
            n,
            return_prefix_tokens=return_prefix_tokens or return_class_token,
            norm=norm,
            output_fmt="NCHW" if reshape else "NLC",
            intermediates_only=True,
        )
        if return_class_token and not return_prefix_tokens:
            return tuple((y, prefix[:, 0]) for y, prefix in out)
        return tuple(out)
