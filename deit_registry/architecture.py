"""The DeiT architecture (torch only): patch embedding, class and distillation tokens, position embedding,
pre-norm transformer blocks and a pluggable head.

State-dict keys are those of the official checkpoints (``cls_token``, ``dist_token``, ``pos_embed``,
``patch_embed.proj.*``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``, ``norm.*``,
``head.*``, ``head_dist.*``), so an official checkpoint loads with ``strict=True``::

    from deit_registry import DeiT
    model = DeiT(embed_dim=384, depth=12, num_heads=6, distilled=True)
    logits = model(torch.randn(2, 3, 224, 224))        # [2, 1000], mean of the two heads
"""

import math
from typing import Final

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as nn_module  # the global forward-hook registries (see _observed)
from torch.utils.checkpoint import checkpoint

from .heads import HeadSpec, build_head

IntOrPair = int | tuple[int, int]


def to_2tuple(x: IntOrPair) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    h, w = x
    return (int(h), int(w))


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_size: tuple[int, int],
    old_size: tuple[int, int],
    num_prefix_tokens: int,
    antialias: bool = True,
) -> torch.Tensor:
    """Bicubically resample a ``[1, prefix + H*W, D]`` position embedding to ``new_size`` (H, W).

    The prefix-token embeddings (class, distillation) are kept as they are; an unchanged size returns the
    input itself, so the native resolution stays bit-identical.
    """
    if new_size[0] == old_size[0] and new_size[1] == old_size[1]:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_size, mode="bicubic", antialias=antialias, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_size[0] * new_size[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


@torch.jit.unused
def _is_fx_proxy(x: torch.Tensor) -> bool:
    """torch.fx traces every optional argument as a Proxy: an absent mask is then not a mask to apply."""
    return isinstance(x, torch.fx.Proxy)


def feature_take_indices(
    num_blocks: int, indices: int | list[int] | tuple[int, ...] | None
) -> tuple[list[int], int]:
    """timm's convention: ``None`` takes every block, an int ``n`` the last ``n``, a list those (negatives from
    the end). Returns the absolute indices and the largest one."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {num_blocks})")
        take = [num_blocks - indices + i for i in range(indices)]
    else:
        take = []
        for i in indices:
            idx = num_blocks + i if i < 0 else i
            if not 0 <= idx < num_blocks:
                raise ValueError(f"feature index {i} is out of range (0 to {num_blocks - 1})")
            take.append(idx)
    return take, max(take)


class PatchEmbed(nn.Module):
    """16x16 convolution that turns ``[B, C, H, W]`` into ``[B, H/16 * W/16, D]`` tokens, checking its input."""

    dynamic_img_pad: Final[bool]
    strict_img_size: Final[bool]

    def __init__(
        self,
        img_size: IntOrPair = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
    ) -> None:
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.in_chans = in_chans
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.set_input_size(img_size)

    def set_input_size(self, img_size: IntOrPair) -> None:
        self.img_size = to_2tuple(img_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid for an input of ``img_size`` (H, W)."""
        if self.dynamic_img_pad:
            return math.ceil(img_size[0] / self.patch_size[0]), math.ceil(img_size[1] / self.patch_size[1])
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"DeiT expects an image batch of shape [B, {self.in_chans}, H, W]; got a {x.dim()}-D tensor of "
                f"shape {list(x.shape)} (add a batch dimension with x.unsqueeze(0) for a single image)"
            )
        _, c, h, w = x.shape
        if c != self.in_chans:
            raise ValueError(
                f"DeiT was built for {self.in_chans} input channels; got {c} (shape {list(x.shape)}). "
                f"Convert the images or create the model with in_chans={c}"
            )
        ph, pw = self.patch_size
        if self.strict_img_size:
            if h != self.img_size[0] or w != self.img_size[1]:
                raise ValueError(
                    f"DeiT was built for {self.img_size[0]}x{self.img_size[1]} inputs; got {h}x{w}. Resize the "
                    f"input, create the model with img_size=({h}, {w}), or pass dynamic_img_size=True"
                )
        elif self.dynamic_img_pad:
            pad_h, pad_w = (ph - h % ph) % ph, (pw - w % pw) % pw
            x = F.pad(x, (0, pad_w, 0, pad_h))
        elif h % ph != 0 or w % pw != 0:
            raise ValueError(
                f"input size {h}x{w} is not a multiple of the patch size {ph}x{pw}; resize it or create the "
                f"model with dynamic_img_pad=True"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (rows ordered q | k | v).

    Normal use runs ``scaled_dot_product_attention`` (``fused_attn=True``). With ``fused_attn=False`` it computes
    softmax(QK^T/sqrt(d)) V as two matmuls and a softmax, which compiled bf16 CPU inference runs faster than
    the fused CPU kernel at DeiT's sequence lengths (``deit_registry.fast`` switches it off there). With
    ``record_attention`` set (see :func:`deit_registry.inspection.attention_maps`) it takes the explicit path
    and keeps the probabilities in ``last_attention``.
    """

    fused_attn: bool
    record_attention: bool
    last_attention: torch.Tensor | None

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
        self.record_attention = False
        self.last_attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, num_queries: int | None = None) -> torch.Tensor:
        """``[B, N, D]`` -> ``[B, N, D]``; with ``num_queries`` only the first ``num_queries`` tokens attend (every
        token is still a key and a value) and the output is ``[B, num_queries, D]``."""
        b, n, c = x.shape
        if num_queries is None:
            qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:  # the q rows of the fused projection for the queries only, the k and v rows for all tokens
            w, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(x[:, :num_queries], w[:c], None if bias is None else bias[:c])
            q = q.reshape(b, num_queries, self.num_heads, self.head_dim).transpose(1, 2)
            kv = F.linear(x, w[c:], None if bias is None else bias[c:])
            k, v = kv.reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        dropout_p = self.attn_drop if self.training else 0.0
        if self.fused_attn and not self.record_attention:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            if self.record_attention:
                self.last_attention = attn.detach()
            x = F.dropout(attn, dropout_p, self.training) @ v
        x = x.transpose(1, 2).reshape(b, q.shape[2], c)
        return self.proj_drop(self.proj(x))


@torch.jit.unused
def _observed(*modules: nn.Module) -> bool:
    """Whether forward hooks (the modules' own, or global ones) could keep a tensor that an in-place op would
    then overwrite."""
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout.

    When autograd is not recording and no hook watches ``fc1`` or ``act``, GELU runs in place on fc1's output:
    the same values, one [B, N, 4D] allocation fewer per block (measured 5-7% faster in eager fp32 at batch
    32, where those buffers are large enough to be mapped fresh from the OS on every call).
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if not torch.jit.is_scripting() and self._gelu_in_place(x):
            x = torch.ops.aten.gelu_(x, approximate=self.act.approximate)
        else:
            x = self.act(x)
        return self.drop2(self.fc2(self.drop1(x)))

    @torch.jit.unused
    def _gelu_in_place(self, x: torch.Tensor) -> bool:
        if type(self.act) is not nn.GELU or _is_fx_proxy(x):
            return False
        if torch.is_grad_enabled() and x.requires_grad:
            return False
        return not _observed(self.fc1, self.act)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample during training."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


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

    def forward(self, x: torch.Tensor, num_queries: int | None = None) -> torch.Tensor:
        """``[B, N, D]`` -> ``[B, N, D]``, or with ``num_queries`` the first ``num_queries`` tokens' outputs only
        (see :meth:`Attention.forward`)."""
        residual = x if num_queries is None else x[:, :num_queries]
        x = residual + self.drop_path1(self.attn(self.norm1(x), num_queries))
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
        dynamic_img_pad: pad inputs that are not multiples of the patch size.
        norm_eps: LayerNorm epsilon (1e-6 in the official models; transformers' configs use 1e-12).

    Attributes:
        head_tokens_only: when True and the head reads only the prefix tokens (``global_pool="token"`` with a
            pooled head), :meth:`forward` runs the last block for those tokens alone: the same output up to
            rounding, for about 7% less compute (the last block's query, projection and MLP work on the patch
            tokens). Off by default because forward hooks on the last block (and its ``attn.qkv``) then see
            only the prefix tokens; :func:`deit_registry.fast.optimize_for_inference` turns it on.
    """

    dynamic_img_size: Final[bool]
    head_input: Final[str]
    num_prefix_tokens: Final[int]
    global_pool: Final[str]

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
        self.head_tokens_only = False
        self.norm_eps = norm_eps

        self.patch_embed = PatchEmbed(
            img_size,
            patch_size,
            in_chans,
            embed_dim,
            strict_img_size=not (dynamic_img_size or dynamic_img_pad),
            dynamic_img_pad=dynamic_img_pad,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.pos_embed = nn.Parameter(
            torch.zeros(1, self.patch_embed.num_patches + self.num_prefix_tokens, embed_dim)
        )
        self.pos_drop = nn.Dropout(pos_drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # cpu: works under meta too
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias,
                    proj_drop_rate,
                    attn_drop_rate,
                    rates[i],
                    norm_eps,
                )
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)
        ]
        self.mask_token: nn.Parameter | None = None
        self._set_head(head, num_classes)
        self.init_weights()

    # ----------------------------------------------------------------------------------------- set-up
    def _set_head(self, head: str | nn.Module | None, num_classes: int) -> None:
        spec = HeadSpec(
            self.embed_dim, num_classes, self.distilled, self.patch_embed.patch_size[0], self.in_chans
        )
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
        if kind == "distilled" and self.global_pool != "token":
            kind = "classifier"
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
        new = resample_pos_embed(
            self.pos_embed.data, self.patch_embed.grid_size, old_grid, self.num_prefix_tokens
        )
        self.pos_embed = nn.Parameter(new, requires_grad=self.pos_embed.requires_grad)  # frozen stays frozen

    # ----------------------------------------------------------------------------------------- forward
    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        pos_embed = self.pos_embed
        if self.dynamic_img_size:
            pos_embed = resample_pos_embed(
                pos_embed, grid, self.patch_embed.grid_size, self.num_prefix_tokens
            )
        tokens = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            tokens.append(self.dist_token.expand(x.shape[0], -1, -1))
        tokens.append(x)
        return self.pos_drop(torch.cat(tokens, dim=1) + pos_embed)

    def _embed(self, x: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        grid = self.patch_embed.dynamic_feat_size((x.shape[-2], x.shape[-1]))
        x = self.patch_embed(x)
        if bool_masked_pos is not None and (torch.jit.is_scripting() or not _is_fx_proxy(bool_masked_pos)):
            if self.mask_token is None:
                raise ValueError(
                    "bool_masked_pos needs a model built with head='mim' (it owns the mask token)"
                )
            mask = bool_masked_pos.reshape(x.shape[0], -1, 1).to(x.dtype)
            x = x * (1.0 - mask) + self.mask_token.to(x.dtype) * mask
        return self._pos_embed(x, grid)

    def _run_blocks(self, x: torch.Tensor, last_block_queries: int | None = None) -> torch.Tensor:
        """All blocks; with ``last_block_queries`` the last one computes only that many leading tokens."""
        if last_block_queries is None and not self.grad_checkpointing:
            return self.blocks(x)
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            queries = last_block_queries if i == last else None
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, queries, use_reentrant=False)
            else:
                x = blk(x, queries)
        return x

    def forward_features(self, x: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens after the final norm: ``[B, prefix + H/16 * W/16, D]`` (class, distillation, patches)."""
        return self.norm(self._run_blocks(self._embed(x, bool_masked_pos)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        """Pool the tokens from :meth:`forward_features` and apply the head.

        ``pre_logits=True`` returns the pooled feature: the class token, or for the distilled pair the mean of
        the class and distillation tokens.
        """
        if self.head_input == "spatial":
            if pre_logits:
                return x[:, self.num_prefix_tokens :]
            return self.head(self._tokens_to_map(x[:, self.num_prefix_tokens :], None))
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

    def _tokens_to_map(self, x: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        """Patch tokens ``[B, h*w, D]`` -> map ``[B, D, h, w]``; without ``grid`` the built one (or a square)."""
        b, n, d = x.shape
        if grid is None:
            grid = self.patch_embed.grid_size
            if grid[0] * grid[1] != n:
                side = int(math.sqrt(n))
                grid = (side, side)
        return x.transpose(1, 2).reshape(b, d, grid[0], grid[1])

    def forward(self, x: torch.Tensor, bool_masked_pos: torch.Tensor | None = None):
        """Image batch ``[B, C, H, W]`` -> logits (the head's output; see :meth:`forward_head`)."""
        grid = self.patch_embed.dynamic_feat_size((x.shape[-2], x.shape[-1]))
        if self.head_tokens_only and self.head_input == "pooled" and self.global_pool == "token":
            x = self._run_blocks(self._embed(x, bool_masked_pos), self.num_prefix_tokens)
            return self.forward_head(self.norm(x))
        x = self.forward_features(x, bool_masked_pos)
        if self.head_input == "spatial":
            return self.head(self._tokens_to_map(x[:, self.num_prefix_tokens :], grid))
        return self.forward_head(x)

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
            self.reset_classifier(0)
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
