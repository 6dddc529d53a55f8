"""A DeiT that has learned something, to measure how far a faster inference mode moves its predictions.

Pretrained weights cannot always be downloaded, and a randomly initialised DeiT's top-1 is noise: two modes can
disagree on it without meaning anything. This module trains a small :class:`deit_registry.DeiT` (DeiT-Tiny's
width, fewer blocks, small images) on scikit-learn's bundled handwritten digits, which ship inside the package
(no download), and compares any two callables on its held-out images.

Usage::

    from agreement import agreement, digits_images, train_digits_deit
    from deit_registry.fast import optimize_for_inference

    model, info = train_digits_deit()  # eval mode; info["test_accuracy"], info["train_seconds"], ...
    _, _, x_test, y_test = digits_images()
    fast = optimize_for_inference(model)  # any candidate: a callable on NCHW float32 batches
    print(agreement(model, fast, x_test, y_test))

The benchmark scripts load this file by path or with their own folder on ``sys.path``, so it uses no relative
imports. Needs scikit-learn (the ``test`` extra).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import deit_registry as dr

# ImageNet's per-channel statistics, as the real DeiTs' preprocessing uses.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The "quick" setting: trains in a few seconds and still clearly learns (for tests and smoke runs).
QUICK = {"size": 16, "depth": 2, "epochs": 5, "lr": 2e-3}


def digits_images(size: int = 16, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8x8 digits as ImageNet-normalised RGB images: ``x_train, y_train, x_test, y_test``.

    Pixel values 0..16 are scaled to [0, 1], upsampled bilinearly to ``size`` x ``size``, repeated to three
    channels and normalised with ImageNet's mean and std. The split is a fixed stratified 75/25 one chosen by
    ``seed``. Images are float32 NCHW, labels int64.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    images = (images.expand(-1, 3, -1, -1) - mean) / std
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=0.25, stratify=labels.numpy(), random_state=seed
    )
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    return (
        images[train_idx].contiguous(),
        labels[train_idx].contiguous(),
        images[test_idx].contiguous(),
        labels[test_idx].contiguous(),
    )


def train_digits_deit(
    *,
    size: int = 16,
    patch_size: int = 4,
    embed_dim: int = 192,
    depth: int = 4,
    num_heads: int = 3,
    distilled: bool = False,
    epochs: int = 16,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    seed: int = 0,
) -> tuple[dr.DeiT, dict]:
    """Train a small :class:`deit_registry.DeiT` on the digits from :func:`digits_images`.

    AdamW with one linear warm-up epoch then cosine decay, gradient clipping at norm 1, label smoothing 0.1,
    no augmentation. Everything
    random (initialisation, shuffling, the split) follows ``seed``; the global RNG is left as it was. Returns
    the model in eval mode and ``{"test_accuracy", "train_seconds", "epochs", "params"}``.

    ``train_digits_deit(**QUICK)`` is the few-second setting.
    """
    x_train, y_train, x_test, y_test = digits_images(size, seed)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = dr.DeiT(
            img_size=size,
            patch_size=patch_size,
            num_classes=10,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            distilled=distilled,
        )
        decay = [p for n, p in model.named_parameters() if p.ndim > 1 and n not in model.no_weight_decay()]
        no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n in model.no_weight_decay()]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr,
        )
        steps_per_epoch = -(-len(y_train) // batch_size)
        total, warmup = epochs * steps_per_epoch, min(steps_per_epoch, epochs * steps_per_epoch // 2)
        schedule = torch.optim.lr_scheduler.SequentialLR(
            optimizer,
            [
                torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=max(warmup, 1)),
                torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total - warmup, 1)),
            ],
            milestones=[warmup],
        )
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(y_train), generator=generator).split(batch_size):
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx], label_smoothing=0.1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # keeps the short run stable
                optimizer.step()
                schedule.step()
    seconds = time.perf_counter() - start
    model.eval()
    result = agreement(model, model, x_test, y_test)
    info = {
        "test_accuracy": result["reference_accuracy"],
        "train_seconds": seconds,
        "epochs": epochs,
        "params": sum(p.numel() for p in model.parameters()),
    }
    return model, info


def agreement(
    reference: Callable[[Tensor], Tensor],
    candidate: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    batch_size: int = 64,
) -> dict:
    """Compare two classifiers' logits on ``x`` (labels ``y``), batch by batch under ``torch.inference_mode``.

    Returns ``{"n", "reference_accuracy", "accuracy", "top1_agreement", "max_abs_logit_diff"}``: ``accuracy``
    is the candidate's, ``top1_agreement`` the fraction of images whose arg-max matches the reference's. The
    candidate's logits are cast to float32 (and to the reference's device) before comparing, so a bf16 or
    fp16 mode is judged against fp32.
    """
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x and y must be non-empty and of equal length; got {len(x)} and {len(y)}")
    ref_correct = cand_correct = agree = 0
    max_diff = 0.0
    with torch.inference_mode():
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            ref = reference(xb).float()
            cand = candidate(xb).to(device=ref.device, dtype=torch.float32)
            yb = yb.to(ref.device)
            ref_top, cand_top = ref.argmax(-1), cand.argmax(-1)
            ref_correct += int((ref_top == yb).sum())
            cand_correct += int((cand_top == yb).sum())
            agree += int((ref_top == cand_top).sum())
            max_diff = max(max_diff, float((ref - cand).abs().max()))
    n = len(y)
    return {
        "n": n,
        "reference_accuracy": ref_correct / n,
        "accuracy": cand_correct / n,
        "top1_agreement": agree / n,
        "max_abs_logit_diff": max_diff,
    }


if __name__ == "__main__":
    for name, kwargs in (("default", {}), ("quick", QUICK)):
        _, info = train_digits_deit(**kwargs)
        print(f"{name:8s} {kwargs} -> {info}")
