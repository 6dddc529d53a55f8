"""Building blocks of the DeiT model (torch only), as ``timm.layers`` holds them for timm's ViT: the patch
embedding (with its input checks), position-embedding resampling, the MLP, stochastic depth and timm's
feature-index convention.

Input checks run in eager Python only: under ``torch.fx`` tracing they are skipped, and sizes that are
symbolic (``torch.export`` with dynamic height and width) never decide a Python branch, so an exported
program stays valid for every size.
"""

import warnings
from collections.abc import Iterable
from typing import Any, Final

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as nn_module
from torch.overrides import has_torch_function

IntOrPair = int | tuple[int, int]


def to_2tuple(x: IntOrPair) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    h, w = x
    return (int(h), int(w))


@torch.jit.unused
def _is_fx_proxy(x: torch.Tensor) -> bool:
    """torch.fx traces with Proxies: Python checks on them would raise a TraceError."""
    return isinstance(x, torch.fx.Proxy)


@torch.jit.unused
def _known_equal(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Equal as Python ints; a symbolic size (export, fx, dynamic compile) is never known equal, so the caller
    takes the path that is right for every size instead of specialising to the example's."""
    return all(type(x) is int and type(y) is int and x == y for x, y in zip(a, b))


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
    if torch.jit.is_scripting():
        if new_size[0] == old_size[0] and new_size[1] == old_size[1]:
            return pos_embed
    elif _known_equal(new_size, old_size):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_size, mode="bicubic", antialias=antialias, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


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
        """Token grid for an input of ``img_size`` (H, W); integer arithmetic only, so symbolic sizes work."""
        ph, pw = self.patch_size
        if self.dynamic_img_pad:
            return -(-img_size[0] // ph), -(-img_size[1] // pw)
        return img_size[0] // ph, img_size[1] // pw

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the fix for an input the model cannot read."""
        if x.dim() != 4:
            raise ValueError(
                f"DeiT expects an image batch of shape [B, {self.in_chans}, H, W]; got a {x.dim()}-D tensor of "
                f"shape {list(x.shape)} (add a batch dimension with x.unsqueeze(0) for a single image)"
            )
        if not x.is_floating_point():
            raise ValueError(
                f"DeiT expects a float image tensor (normalised with the model's mean and std); got {x.dtype}. "
                "Convert with x.float() / 255 and then normalise, or use deit_registry.eval_transform(name)"
            )
        c, h, w = x.shape[1], x.shape[2], x.shape[3]
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
        elif not self.dynamic_img_pad and (h % ph != 0 or w % pw != 0):
            raise ValueError(
                f"input size {h}x{w} is not a multiple of the patch size {ph}x{pw}; resize it or create the "
                f"model with dynamic_img_pad=True"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or not _is_fx_proxy(x):
            self.check_input(x)
        if self.dynamic_img_pad:
            ph, pw = self.patch_size
            x = F.pad(x, (0, (pw - x.shape[-1] % pw) % pw, 0, (ph - x.shape[-2] % ph) % ph))
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout; without autograd GELU overwrites fc1's output in place where
    nothing else can see it (:func:`_gelu_may_overwrite`), with the same values."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = self.act(h) if torch.jit.is_scripting() else self._act(h)
        return self.drop2(self.fc2(self.drop1(h)))

    @torch.jit.unused
    def _act(self, h: torch.Tensor) -> torch.Tensor:
        """``self.act(h)``, in place where that is safe. Each submodule is looked up once: nn.Module's
        ``__getattr__`` costs as much as the rest of the checks together, and batch 1 feels it."""
        fc1, act = self.fc1, self.act
        if _gelu_may_overwrite(fc1, act, h):
            return torch.ops.aten.gelu_(h, approximate=act.approximate)
        return act(h)


# Linear layers return a new tensor: nn.Linear and its subclasses that keep its forward (a subclass's own
# forward could keep what it returns), and the fast copy's dynamic int8 linear (named, not imported:
# importing torch.ao's quantized modules is slow and warns of their deprecation).
_INT8_LINEAR_MODULE = "torch.ao.nn.quantized.dynamic.modules.linear"


def _gelu_may_overwrite(fc1: nn.Module, act: nn.Module, h: torch.Tensor) -> bool:
    """Whether an MLP's GELU ``act`` may overwrite ``h``, its ``fc1``'s output, in place: the same values
    without a second ``[B, N, 4D]`` buffer, which for a large batch glibc takes fresh from the kernel (page
    faults) on every call.

    Only where nothing else can see or keep ``h``: fc1 a linear layer with ``nn.Linear``'s forward (a new
    tensor) and act exactly ``nn.GELU``, without forward hooks on either or globally, no autograd needing ``h``,
    no tensor subclass, ``TorchFunctionMode`` or ``TorchDispatchMode`` (a recorder, FlopCounterMode) that sees
    every op and could keep ``h``; never under ``torch.compile`` or ``torch.export`` (inductor reuses buffers
    itself; the graph stays timm's) or fx tracing; under ``torch.jit.trace`` only for weights without grad.
    """
    if torch.compiler.is_compiling() or _is_fx_proxy(h) or type(act) is not nn.GELU:
        return False
    # torch.jit.trace's check traces again under no_grad: decide by the weights, the same in both traces.
    if torch.jit.is_tracing() and any(p.requires_grad for p in fc1.parameters()):
        return False
    linear = isinstance(fc1, nn.Linear) and type(fc1).forward is nn.Linear.forward
    if not (linear or type(fc1).__module__ == _INT8_LINEAR_MODULE):
        return False
    if torch.is_grad_enabled() and h.requires_grad:
        return False
    if has_torch_function((h,)) or _dispatch_mode_active():  # public: subclasses and function modes
        return False
    tables = _forward_hook_tables((fc1, act))
    return tables is not None and not any(tables)


def _dispatch_mode_active() -> bool:
    """Whether a ``TorchDispatchMode`` is active. No public API tells; this reads torch's own count of them,
    and where torch has moved it assumes one is, with a warning."""
    count = getattr(torch._C, "_len_torch_dispatch_stack", None)
    if callable(count):
        return bool(count())
    warnings.warn(
        f"torch {torch.__version__} does not say whether a TorchDispatchMode is active; running as if one were "
        "(GELU no longer overwrites fc1's output)",
        RuntimeWarning,
        stacklevel=4,
    )
    return True


def _forward_hook_tables(modules: Iterable[nn.Module]) -> tuple[dict[Any, Any], ...] | None:
    """The tables in which torch's global module hooks and then each of ``modules`` keep their forward
    pre-hooks and hooks (one not empty: a hook is registered), or None, with a warning, where torch has moved
    them.

    No public API tells whether a module has hooks; this is the package's one reader of ``nn.Module``'s own
    tables, read in place, so a hook registered later shows in them."""
    try:
        tables = [nn_module._global_forward_pre_hooks, nn_module._global_forward_hooks]
        for m in modules:
            tables += (m._forward_pre_hooks, m._forward_hooks)
    except AttributeError:
        tables = [None]
    if all(isinstance(t, dict) for t in tables):
        return tuple(tables)
    warnings.warn(
        f"torch {torch.__version__} keeps forward hooks where deit_registry cannot see them; running as if one "
        "were registered (GELU no longer overwrites fc1's output, the fast copy runs its modules untraced)",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


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
