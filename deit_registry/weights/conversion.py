"""Turn any supported state dict into the official key layout and fit it to a model, checking everything first.

* :func:`to_official` - transformers' ``DeiT*`` (``deit.`` prefix) and ``ViT*`` (``vit.``) names to the official
  ones, fusing ``query``/``key``/``value`` into ``qkv`` (rows q | k | v); official and timm keys pass unchanged.
* :func:`adapt` - fit the official-layout dict to a model: a different ``num_classes`` (or head) drops the
  checkpoint's heads with a warning; another ``img_size`` (also non-square) resamples the position embedding
  bicubically, keeping the 1 or 2 prefix tokens; ``in_chans`` other than 3 adapts the patch embedding (sum for
  1 channel, repeat and rescale for more); distilled <-> plain only with ``convert_distillation=True``.
* :func:`check_tensors` - refuse meta, sparse, non-floating and non-finite tensors; :func:`config_norm_eps` -
  refuse a ``layer_norm_eps`` that is not a number in (0, 1);
* :func:`validate` - every key and shape against the model's, before a single tensor is copied, so a failed
  load never leaves a model half-loaded;
* :func:`guess_variant` - the one variant guesser (from a state dict's shapes).

::

    from deit_registry.weights.conversion import to_official
    sd = to_official(transformers_state_dict)       # {'cls_token': ..., 'blocks.0.attn.qkv.weight': ..., ...}
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..architecture import resample_pos_embed
from ..errors import CheckpointMismatchError, CorruptCheckpointError, DistillationMismatchError

HEAD_PREFIXES = ("head.", "head_dist.")
# Keys of transformers models with no counterpart in the official layout (pooler, MIM parts).
_DROPPED = re.compile(r"^(pooler\.|embeddings\.mask_token$|decoder\.)")
_TRANSFORMERS_RENAMES = (
    (re.compile(r"^embeddings\.cls_token$"), "cls_token"),
    (re.compile(r"^embeddings\.distillation_token$"), "dist_token"),
    (re.compile(r"^embeddings\.position_embeddings$"), "pos_embed"),
    (re.compile(r"^embeddings\.patch_embeddings\.projection\."), "patch_embed.proj."),
    (re.compile(r"^encoder\.layer\.(\d+)\.layernorm_before\."), r"blocks.\1.norm1."),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.output\.dense\."), r"blocks.\1.attn.proj."),
    (re.compile(r"^encoder\.layer\.(\d+)\.layernorm_after\."), r"blocks.\1.norm2."),
    (re.compile(r"^encoder\.layer\.(\d+)\.intermediate\.dense\."), r"blocks.\1.mlp.fc1."),
    (re.compile(r"^encoder\.layer\.(\d+)\.output\.dense\."), r"blocks.\1.mlp.fc2."),
    (re.compile(r"^layernorm\."), "norm."),
    (re.compile(r"^cls_classifier\."), "head."),
    (re.compile(r"^distillation_classifier\."), "head_dist."),
    (re.compile(r"^classifier\."), "head."),
)
# transformers 5 names its modules anew in memory (``state_dict()``; its save_pretrained writes the names above):
# mapped onto those first.
_TRANSFORMERS_5 = (
    (re.compile(r"^layers\.(\d+)\.attention\.([qkv])_proj\."), None),
    (re.compile(r"^layers\.(\d+)\.attention\.o_proj\."), r"encoder.layer.\1.attention.output.dense."),
    (re.compile(r"^layers\.(\d+)\.mlp\.fc1\."), r"encoder.layer.\1.intermediate.dense."),
    (re.compile(r"^layers\.(\d+)\.mlp\.fc2\."), r"encoder.layer.\1.output.dense."),
    (re.compile(r"^layers\.(\d+)\."), r"encoder.layer.\1."),
)
_QKV_5 = {"q": "query", "k": "key", "v": "value"}
_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")


def is_transformers_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(
        k.startswith(("deit.", "vit.", "embeddings.", "encoder.layer.", "layers.")) for k in state_dict
    )


def _from_transformers_5(key: str) -> str:
    for pattern, repl in _TRANSFORMERS_5:
        m = pattern.match(key)
        if m:
            if repl is None:  # q_proj -> attention.attention.query
                rest = key[m.end() :]
                return f"encoder.layer.{m.group(1)}.attention.attention.{_QKV_5[m.group(2)]}.{rest}"
            return pattern.sub(repl, key, count=1)
    return key


def to_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official layout of ``state_dict`` (transformers' names converted; others returned as they are)."""
    if not is_transformers_layout(state_dict):
        return dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        for prefix in ("deit.", "vit."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        key = _from_transformers_5(key)
        if _DROPPED.match(key):
            continue
        m = _QKV.match(key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        for pattern, repl in _TRANSFORMERS_RENAMES:
            new, n = pattern.subn(repl, key)
            if n:
                key = new
                break
        out[key] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            missing = sorted({"query", "key", "value"} - set(parts))
            out[f"blocks.{layer}.attn.qkv_incomplete_{'_'.join(missing)}_missing.{kind}"] = next(
                iter(parts.values())
            )
            continue
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0
        )
    return out


def config_norm_eps(config: Mapping[str, Any] | None, where: str | Path = "config.json") -> float | None:
    """The LayerNorm eps a ``config.json`` was saved with (transformers' ``layer_norm_eps``, 1e-12 for DeiT).

    Raises :class:`CorruptCheckpointError` unless it is a real number with ``0 < eps < 1`` (a string, a bool,
    NaN, infinity, zero or a negative value would otherwise surface later as a ``TypeError`` or NaN outputs).
    """
    if not config or "layer_norm_eps" not in config:
        return None
    value = config["layer_norm_eps"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) < 1:
        raise CorruptCheckpointError(
            f"{where}: layer_norm_eps must be a number between 0 and 1 (1e-6 for the official DeiTs, 1e-12 in "
            f"transformers' configs); got {value!r}. Fix that value in config.json, or delete the key to use 1e-6"
        )
    return float(value)


def check_config_architecture(config: Mapping[str, Any] | None, num_heads: int, where: str | Path) -> None:
    """Refuse a config (transformers') whose attention heads or activation differ from the model's: neither
    shows in the weights' shapes, so the load would succeed and give other outputs."""
    if not config:
        return
    heads = config.get("num_attention_heads")
    if heads is not None and heads != num_heads:
        raise CheckpointMismatchError(
            f"{where} says num_attention_heads={heads!r} but the model has {num_heads} heads: the weights would "
            f"load and give other outputs. Nothing was loaded; create the model with num_heads={heads!r}, or fix "
            f"config.json if it is wrong"
        )
    act = config.get("hidden_act")
    if act is not None and act != "gelu":
        raise CheckpointMismatchError(
            f"{where} says hidden_act={act!r}, but DeiT uses the exact GELU ('gelu'): the weights would load and "
            f"give other outputs. Nothing was loaded; run the model it was trained as (in transformers), or fix "
            f"config.json if it is wrong"
        )


def check_tensors(state_dict: Mapping[str, Any], file: str | Path) -> None:
    """Refuse tensors no model can use, before anything is converted or copied.

    Refused: non-tensors, meta tensors (no data), sparse or other non-strided layouts, non-floating dtypes
    (integers, bool, complex, quantized) and NaN or infinite values, naming the first offending keys. Other
    devices and floating dtypes (fp16, bf16, fp64) are accepted and copied to the model's.
    """
    problems: dict[str, list[str]] = {}
    for key, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            why = f"not a tensor but a {type(t).__name__}"
        elif t.is_meta:
            why = "meta tensors (shapes without data: saved from a model on the meta device)"
        elif t.layout != torch.strided:
            why = f"{t.layout} tensors: save them with .to_dense()"
        elif not t.is_floating_point():
            why = f"{t.dtype} tensors where the model has floating-point weights"
        elif not all_finite(t):
            why = "NaN or infinite values (a diverged training run or a damaged file)"
        else:
            continue
        problems.setdefault(why, []).append(key)
    if problems:
        what = "; ".join(f"{why}: {', '.join(keys[:3])}" for why, keys in problems.items())
        raise CorruptCheckpointError(
            f"{file} holds weights no model can use ({what}). Nothing was loaded; re-save the checkpoint from a "
            f"trained model with real, finite, dense floating-point tensors"
        )


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` has no NaN or infinity. A sum is one fast pass with no temporary tensor and is finite
    exactly when every value is (unless it overflows): only a non-finite sum pays for the exact check."""
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def guess_variant(state_dict: Mapping[str, torch.Tensor], num_heads: int | None = None) -> str | None:
    """The one variant guesser: the variant whose architecture ``state_dict`` (official layout) has.

    Width (``cls_token``), distillation token, depth and patch size must match (``num_heads`` too, when
    given); among those the variant with the same position-embedding grid wins, else the 224 one. ``None``
    when no variant has that width.
    """
    from ..variants import VARIANTS

    cls = state_dict.get("cls_token")
    if cls is None:
        return None
    distilled = "dist_token" in state_dict
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.") and k.count(".") >= 2})
    proj = state_dict.get("patch_embed.proj.weight")
    patch = int(proj.shape[-1]) if proj is not None and proj.dim() == 4 else None
    matches = [
        v
        for v in VARIANTS.values()
        if v.arch.embed_dim == cls.shape[-1]
        and v.arch.distilled == distilled
        and (not depth or v.arch.depth == depth)
        and (patch is None or v.arch.patch_size == patch)
        and (num_heads is None or v.arch.num_heads == num_heads)
    ]
    pos = state_dict.get("pos_embed")
    if pos is not None and pos.dim() == 3:
        patches = pos.shape[1] - (2 if distilled else 1)
        exact = [v for v in matches if (v.arch.img_size // v.arch.patch_size) ** 2 == patches]
        if exact:
            return exact[0].name
    native = [v for v in matches if v.arch.img_size == 224]
    return (native or matches)[0].name if matches else None


def config_grid(
    config: Mapping[str, Any] | None, num_patches: int, where: str | Path = "config.json"
) -> tuple[int, int] | None:
    """The patch grid the checkpoint's config states (transformers' ``image_size`` and ``patch_size``, timm's
    ``pretrained_cfg.input_size``), if it states one of ``num_patches`` patches; raises
    :class:`CorruptCheckpointError` for values of the wrong type."""
    if not config:
        return None
    cfg = config.get("pretrained_cfg")
    if cfg is not None and not isinstance(cfg, Mapping):
        raise _bad_config(where, "pretrained_cfg", cfg, "an object")
    size = config.get("image_size") or (cfg or {}).get("input_size")
    patch = config.get("patch_size", 16)
    if not _positive_int(patch):
        raise _bad_config(where, "patch_size", patch, "a positive integer")
    if size is None:
        return None
    if isinstance(size, (list, tuple)) and len(size) == 3:
        size = size[1:]
    if _positive_int(size):
        size = (size, size)
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(map(_positive_int, size))):
        raise _bad_config(where, "image_size", size, "a positive integer or [height, width]")
    grid = (size[0] // patch, size[1] // patch)
    return grid if grid[0] * grid[1] == num_patches else None


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _bad_config(where: str | Path, key: str, value: Any, want: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{where}: {key} must be {want}, got {value!r}. Fix that value in config.json, or delete the key"
    )


def square_grid(num_patches: int) -> tuple[int, int] | None:
    """The square grid of ``num_patches`` patches (the official checkpoints'), if there is one."""
    side = math.isqrt(num_patches)
    return (side, side) if side * side == num_patches else None


def adapt(
    state_dict: dict[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    *,
    grid_size: tuple[int, int],
    file: str | Path,
    config: Mapping[str, Any] | None = None,
    convert_distillation: bool = False,
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Fit an official-layout ``state_dict`` to a model whose ``state_dict()`` is ``expected`` (meta is fine).

    Returns the adapted dict and the model keys left as initialised (dropped heads). Raises
    :class:`DistillationMismatchError` for distilled <-> plain without ``convert_distillation=True``.
    """
    sd = dict(state_dict)
    model_distilled, ckpt_distilled = "dist_token" in expected, "dist_token" in sd
    if model_distilled != ckpt_distilled and "cls_token" in sd:
        if not convert_distillation:
            have, want = ("distilled", "plain") if ckpt_distilled else ("plain", "distilled")
            raise DistillationMismatchError(
                f"{file} holds {have} DeiT weights but the model is {want}. Create the matching model "
                f"({'a *_distilled_* name' if ckpt_distilled else 'a name without _distilled_'}), or pass "
                f"convert_distillation=True to "
                + (
                    "use the class head and drop the distillation token"
                    if ckpt_distilled
                    else "initialise the distillation token and head from the class token and head"
                )
            )
        sd = _distilled_to_plain(sd) if ckpt_distilled else _plain_to_distilled(sd)

    prefix = 2 if model_distilled else 1
    pos, want_pos = sd.get("pos_embed"), expected.get("pos_embed")
    if pos is not None and want_pos is not None and pos.dim() == 3 and pos.shape[2] == want_pos.shape[2]:
        where = Path(file).parent / "config.json"
        # The same number of positions is the model's grid unless the config says otherwise: a 16x20 grid
        # loaded at 20x16 must be resampled, a checkpoint without a config taken as it is.
        stated = config_grid(config, pos.shape[1] - prefix, where)
        if pos.shape[1] != want_pos.shape[1] or (stated is not None and stated != tuple(grid_size)):
            old_grid = stated or square_grid(pos.shape[1] - prefix)
            if old_grid is not None:
                sd["pos_embed"] = resample_pos_embed(pos, tuple(grid_size), old_grid, prefix)

    key = "patch_embed.proj.weight"
    w, want_w = sd.get(key), expected.get(key)
    if w is not None and want_w is not None and w.dim() == 4 and w.shape[1] != want_w.shape[1]:
        if w.shape[0] == want_w.shape[0] and w.shape[2:] == want_w.shape[2:]:
            sd[key] = adapt_input_conv(w, want_w.shape[1])

    fresh = _fit_heads(sd, expected, file)
    return sd, fresh


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Patch-embedding weights ``[D, C, p, p]`` for ``in_chans`` inputs: summed over C for 1 channel, repeated
    and rescaled by ``C / in_chans`` for more, so the response to a grey image stays the same."""
    c = weight.shape[1]
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_chans / c)
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (c / in_chans)


def _distilled_to_plain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = {k: v for k, v in sd.items() if k != "dist_token" and not k.startswith("head_dist.")}
    if "pos_embed" in sd:
        pos = sd["pos_embed"]
        sd["pos_embed"] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
    return sd


def _plain_to_distilled(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    sd["dist_token"] = sd["cls_token"].clone()
    if "pos_embed" in sd:
        pos = sd["pos_embed"]
        sd["pos_embed"] = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)
    for k in [k for k in sd if k.startswith("head.")]:
        sd["head_dist." + k[len("head.") :]] = sd[k].clone()
    return sd


def one_head_beside_dist_token(sd: Mapping[str, torch.Tensor]) -> bool:
    """transformers' ``DeiTForImageClassification``: a distillation token, one classifier (on the class token)."""
    return "dist_token" in sd and "head.weight" in sd and not any(k.startswith("head_dist.") for k in sd)


def _fit_heads(
    sd: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor], file: str | Path
) -> set[str]:
    """Drop the checkpoint's classifier heads if they do not fit the model's; return the model keys left fresh."""
    cls, want_cls = sd.get("cls_token"), expected.get("cls_token")
    if cls is not None and want_cls is not None and tuple(cls.shape) != tuple(want_cls.shape):
        return set()  # another width altogether: validate() reports the variant mismatch, heads included
    ckpt_head = {k: v for k, v in sd.items() if k.startswith(HEAD_PREFIXES)}
    model_head = {k: v for k, v in expected.items() if k.startswith(HEAD_PREFIXES) or k == "mask_token"}
    fits = set(ckpt_head) == {k for k in model_head if k != "mask_token"} and all(
        tuple(v.shape) == tuple(model_head[k].shape) for k, v in ckpt_head.items()
    )
    if fits:
        return {"mask_token"} & set(model_head) - set(sd)
    if "head_dist.weight" in model_head and one_head_beside_dist_token(sd):
        if all(
            k in model_head and tuple(v.shape) == tuple(model_head[k].shape) for k, v in ckpt_head.items()
        ):
            raise CheckpointMismatchError(
                f"{file} has one classifier, on the class token, beside its distillation token (as transformers' "
                f"DeiTForImageClassification), where the model has a class and a distillation head. Nothing was "
                f"loaded; create the model with head='classifier' to load it as saved, or with another "
                f"num_classes to fine-tune new heads"
            )
    for k in ckpt_head:
        del sd[k]
    if not ckpt_head:  # a backbone-only checkpoint: the model's classifier stays random, which must be said
        heads = _describe_heads({k: v for k, v in model_head.items() if k != "mask_token"})
        warnings.warn(
            f"{Path(file).name} has no classifier, so the model's ({heads}) keeps the weights it had (random in a "
            "new model): fine-tune it, or create the model with num_classes=0 for features",
            stacklevel=4,
        )
    else:
        warnings.warn(
            f"{Path(file).name}: dropped the checkpoint's classifier ({_describe_heads(ckpt_head)}) because it does "
            f"not fit the model's ({_describe_heads(model_head)}); "
            + (
                "the model's head is randomly initialised: fine-tune it"
                if model_head
                else "the model returns features"
            ),
            stacklevel=4,
        )
    return set(model_head) - set(sd)


def _describe_heads(heads: Mapping[str, torch.Tensor]) -> str:
    """``"head: 1000 classes, head_dist: 1000 classes"``, or ``"none"``."""
    parts = [
        f"{k.rsplit('.', 1)[0]}: {v.shape[0]} classes" if v.dim() == 2 else k.rsplit(".", 1)[0]
        for k, v in heads.items()
        if k.endswith("weight") or k == "mask_token"
    ]
    return ", ".join(dict.fromkeys(parts)) or "none"


def validate(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    fresh: set[str],
    file: str | Path,
    model_name: str | None = None,
) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state_dict`` has exactly the keys and shapes expected."""
    missing = sorted(set(expected) - set(state_dict) - fresh)
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [
        f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return
    guess = guess_variant(state_dict)
    target = f"the model ({model_name})" if model_name else "the model"
    if shapes:
        what = f"{len(shapes)} shape mismatch(es), e.g. {'; '.join(shapes[:3])}"
        if guess and guess != model_name:
            fix = f"it looks like {guess}: create that model instead"
        elif shapes[0].startswith("pos_embed:") and len(shapes) == 1:
            fix = (
                "its position embedding is no square grid and no config.json beside it gives its image size: "
                "create the model with the img_size it was trained at, img_size=(height, width)"
            )
        else:
            fix = "create the model whose sizes match the checkpoint (embed_dim, depth, patch_size)"
    else:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:4])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:4])}")
        what = "; ".join(parts)
        fix = (
            "check that the file is a complete DeiT checkpoint (official, timm or transformers layout) saved "
            "from the same architecture"
        )
    raise CheckpointMismatchError(f"{file} does not fit {target}: {what}. Nothing was loaded; {fix}")
