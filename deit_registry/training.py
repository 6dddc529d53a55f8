"""Training conveniences for :class:`deit_registry.architecture.DeiT`: layer-wise learning-rate decay, freezing,
and the paper's distillation objective.

::

    import torch
    import deit_registry as dr
    from deit_registry.training import DistillationLoss, freeze, param_groups_layer_decay

    model = dr.create_model("deit_small_distilled_patch16_224", num_classes=10)
    model.set_distilled_training(True)                     # training forward returns (cls_logits, dist_logits)
    groups = param_groups_layer_decay(model, lr=5e-4, weight_decay=0.05, layer_decay=0.75)
    optimizer = torch.optim.AdamW(groups)
    criterion = DistillationLoss(torch.nn.CrossEntropyLoss(), teacher, kind="hard")
    loss = criterion(images, model(images), labels)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DISTILLATION_KINDS = ("none", "soft", "hard")

# Parameters before the first block (layer 0 of layer-wise decay, and what `freeze` calls the stem).
_STEM_PREFIXES = ("cls_token", "dist_token", "pos_embed", "patch_embed", "mask_token")


# What wrappers put before the model's own parameter names: torch.compile's OptimizedModule, and
# DistributedDataParallel / DataParallel (either around the other).
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def _model_name(name: str) -> str:
    """``name`` as the wrapped DeiT itself names the parameter (wrapper prefixes stripped)."""
    while name.startswith(_WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def _wrapped_attribute(model: nn.Module, name: str) -> Any:
    """``model``'s attribute ``name`` (torch.compile's wrapper forwards attributes), else that of the model a
    DistributedDataParallel / DataParallel holds in its public ``module``; None without one."""
    for owner in (model, getattr(model, "module", None)):
        value = getattr(owner, name, None)
        if value is not None:
            return value
    return None


def _named_parameters(model: nn.Module) -> tuple[list[tuple[str, str, nn.Parameter]], int]:
    """``(name, the DeiT's own name, parameter)`` for each parameter of ``model``, and its number of blocks.

    Wrapped in ``torch.compile`` or ``DistributedDataParallel``, names carry the wrapper's prefix; the helpers
    read the DeiT's own. Raises ``ValueError`` where no parameter is in ``blocks.*`` (not a DeiT)."""
    named = [(name, _model_name(name), param) for name, param in model.named_parameters()]
    depths = [int(own.split(".")[1]) for _, own, _ in named if own.startswith("blocks.")]
    if not depths:
        raise ValueError(
            f"{type(model).__name__} has no parameters named blocks.*; these helpers expect a DeiT "
            "(deit_registry.DeiT), also inside torch.compile or DistributedDataParallel"
        )
    blocks = _wrapped_attribute(model, "blocks")
    return named, len(blocks) if isinstance(blocks, nn.Module) else max(depths) + 1


def _no_weight_decay(model: nn.Module) -> set[str]:
    method = _wrapped_attribute(model, "no_weight_decay")
    return set(method()) if callable(method) else set()


def layer_id(name: str, num_blocks: int) -> int:
    """Depth of parameter ``name`` for layer-wise decay: 0 for the stem (tokens, position and patch embedding),
    ``i + 1`` for ``blocks.i``, ``num_blocks + 1`` for the final norm and the heads."""
    if name.startswith(_STEM_PREFIXES):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_blocks + 1


def param_groups_layer_decay(
    model: nn.Module,
    weight_decay: float = 0.05,
    layer_decay: float = 0.75,
    lr: float | None = None,
    no_weight_decay: set[str] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with layer-wise learning-rate decay (the BEiT and MAE convention).

    A parameter at depth ``l`` (see :func:`layer_id`) gets the scale ``layer_decay ** (num_blocks + 1 - l)``:
    the heads keep the full rate, each block below gets ``layer_decay`` times the one above. Biases, norm
    weights (all 1-D parameters) and ``model.no_weight_decay()`` get no weight decay. Frozen parameters are
    left out. Each group carries ``lr_scale`` (which timm's schedulers read) and, when ``lr`` is given,
    ``lr = lr * lr_scale`` so that plain torch optimizers apply it too::

        optimizer = torch.optim.AdamW(param_groups_layer_decay(model, lr=1e-3, layer_decay=0.65))

    ``model`` may be wrapped in ``torch.compile`` or ``DistributedDataParallel`` (see :func:`_named_parameters`);
    ``param_names`` are the wrapper's names. Raises ``ValueError`` for a model without ``blocks.*``.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1]; got {layer_decay}")
    named, num_blocks = _named_parameters(model)
    skip = set(no_weight_decay) if no_weight_decay is not None else _no_weight_decay(model)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, own, param in named:
        if not param.requires_grad:
            continue
        depth = layer_id(own, num_blocks)
        decay = not (param.ndim <= 1 or own in skip or own.endswith(".bias"))
        key = (depth, decay)
        if key not in groups:
            scale = layer_decay ** (num_blocks + 1 - depth)
            group: dict[str, Any] = dict(
                params=[], param_names=[], weight_decay=weight_decay if decay else 0.0, lr_scale=scale
            )
            if lr is not None:
                group["lr"] = lr * scale
            groups[key] = group
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def freeze(model: nn.Module, up_to_block: int | None = None, include_norm: bool | None = None) -> list[str]:
    """Stop gradients for the stem and the first ``up_to_block`` blocks (``None``: every block); return the
    names of the parameters frozen.

    The final norm is frozen with it when every block is (``include_norm=None``), so ``freeze(model)`` leaves
    only the head(s) trainable, a linear probe::

        freeze(model)                   # linear probing
        freeze(model, up_to_block=6)    # fine-tune the top half

    As :func:`param_groups_layer_decay`, through ``torch.compile`` and ``DistributedDataParallel`` too.
    """
    named, num_blocks = _named_parameters(model)
    if up_to_block is None:
        up_to_block = num_blocks
    if not 0 <= up_to_block <= num_blocks:
        raise ValueError(f"up_to_block must be between 0 and {num_blocks}; got {up_to_block}")
    if include_norm is None:
        include_norm = up_to_block == num_blocks
    frozen = []
    for name, own, param in named:
        depth = layer_id(own, num_blocks)
        is_norm = own.startswith("norm.")
        if depth <= up_to_block or (include_norm and is_norm):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def unfreeze(model: nn.Module) -> None:
    """Make every parameter trainable again."""
    for param in model.parameters():
        param.requires_grad_(True)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that will receive gradients."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


class DistillationLoss(nn.Module):
    """The DeiT training objective (facebookresearch/deit ``losses.py``).

    ``loss = (1 - alpha) * base_criterion(cls_logits, labels) + alpha * D``, where ``D`` compares the
    distillation-token logits with the teacher's on the same images:

    * ``"hard"``: ``cross_entropy(dist_logits, teacher_logits.argmax(1))``;
    * ``"soft"``: ``KL(softmax(teacher / tau) || softmax(dist / tau))`` summed, times ``tau**2``, divided by
      the number of logits (``B * num_classes``, as the original code does);
    * ``"none"``: only ``base_criterion(cls_logits, labels)``; ``teacher`` may be ``None``.

    ``outputs`` is what the student returns in training: the pair ``(cls_logits, dist_logits)`` from a distilled
    model after ``model.set_distilled_training(True)``, or plain logits for ``kind="none"``. The teacher runs
    without gradients and stays in eval mode (``.train()`` on this loss does not switch it)::

        criterion = DistillationLoss(nn.CrossEntropyLoss(), teacher, kind="soft", alpha=0.5, tau=3.0)
        loss = criterion(images, student(images), labels)
    """

    def __init__(
        self,
        base_criterion: nn.Module,
        teacher: nn.Module | None,
        kind: str = "none",
        alpha: float = 0.5,
        tau: float = 1.0,
    ) -> None:
        super().__init__()
        if kind not in DISTILLATION_KINDS:
            raise ValueError(f"kind must be one of {DISTILLATION_KINDS}; got {kind!r}")
        if kind != "none" and teacher is None:
            raise ValueError(f"kind={kind!r} needs a teacher model; pass teacher=... or use kind='none'")
        if tau <= 0:
            raise ValueError(f"tau must be positive; got {tau}")
        self.base_criterion = base_criterion
        self.teacher = teacher
        self.kind = kind
        self.alpha = alpha
        self.tau = tau
        if teacher is not None:
            teacher.eval()

    def train(self, mode: bool = True) -> DistillationLoss:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(
        self,
        inputs: torch.Tensor,
        outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        labels: torch.Tensor,
    ) -> torch.Tensor:
        outputs_kd = None
        if not isinstance(outputs, torch.Tensor):
            outputs, outputs_kd = outputs
        base_loss = self.base_criterion(outputs, labels)
        if self.kind == "none":
            return base_loss
        if outputs_kd is None:
            raise ValueError(
                f"kind={self.kind!r} needs the pair (cls_logits, dist_logits); use a distilled model and call "
                "model.set_distilled_training(True) so that its training forward returns the pair"
            )
        with torch.no_grad():
            teacher_outputs = self.teacher(inputs)
        if self.kind == "soft":
            t = self.tau
            distillation = (
                F.kl_div(
                    F.log_softmax(outputs_kd / t, dim=1),
                    F.log_softmax(teacher_outputs / t, dim=1),
                    reduction="sum",
                    log_target=True,
                )
                * (t * t)
                / outputs_kd.numel()
            )
        else:
            distillation = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
        return base_loss * (1 - self.alpha) + distillation * self.alpha
