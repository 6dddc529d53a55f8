"""Training conveniences: gradient checkpointing, weight-decay and layer-decay groups, classifier reset,
freezing, and the DeiT distillation loss (checked against hand computations, then trained a few steps)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deit_registry as dr
from deit_registry import DeiT, DistillationLoss, freeze, param_groups_layer_decay, unfreeze
from deit_registry.training import layer_id, trainable_parameter_names

CFG = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=4)


def tiny(distilled: bool = False, **kwargs) -> DeiT:
    torch.manual_seed(0)
    return DeiT(**{**CFG, "distilled": distilled, **kwargs})


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------------- model-level helpers
@pytest.mark.parametrize("distilled", [False, True])
def test_grad_checkpointing_same_output_and_gradients(distilled, x):
    a, b = tiny(distilled), tiny(distilled)
    b.set_grad_checkpointing()
    assert b.grad_checkpointing
    out_a, out_b = a(x), b(x)
    torch.testing.assert_close(out_a, out_b)
    out_a.sum().backward()
    out_b.sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)
    inter = b.forward_intermediates(x, indices=[1], intermediates_only=True)[0]
    inter.sum().backward()  # checkpointed intermediates are differentiable too


def test_no_weight_decay_and_group_matcher_cover_the_model():
    from timm.models import group_parameters

    model = tiny(True)
    assert {"pos_embed", "cls_token", "dist_token"} <= model.no_weight_decay()
    names = {n for n, _ in model.named_parameters()}
    for coarse in (False, True):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        grouped = [n for params in groups.values() for n in params]
        assert sorted(grouped) == sorted(names)  # every parameter in exactly one group
    # the same groups as timm's own distilled DeiT of the same shape
    from timm.models.deit import VisionTransformerDistilled

    theirs = VisionTransformerDistilled(
        img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=4
    )
    for coarse in (False, True):
        ours = group_parameters(model, model.group_matcher(coarse=coarse))
        expected = group_parameters(theirs, theirs.group_matcher(coarse=coarse))
        assert [sorted(g) for g in ours.values()] == [sorted(g) for g in expected.values()]


def test_param_groups_layer_decay():
    model = tiny(True)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5, lr=1e-3)
    seen = [n for g in groups for n in g["param_names"]]
    assert sorted(seen) == sorted(n for n, _ in model.named_parameters())
    scale_of = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    decay_of = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert scale_of["head.weight"] == scale_of["head_dist.bias"] == scale_of["norm.weight"] == 1.0
    assert scale_of["blocks.2.mlp.fc1.weight"] == 0.5
    assert scale_of["blocks.0.attn.qkv.weight"] == 0.5**3
    assert scale_of["patch_embed.proj.weight"] == scale_of["cls_token"] == scale_of["pos_embed"] == 0.5**4
    assert decay_of["blocks.0.attn.qkv.weight"] == decay_of["head.weight"] == 0.05
    assert decay_of["blocks.0.attn.qkv.bias"] == decay_of["norm.weight"] == decay_of["pos_embed"] == 0.0
    assert decay_of["dist_token"] == 0.0
    assert all(g["lr"] == pytest.approx(1e-3 * g["lr_scale"]) for g in groups)
    assert layer_id("blocks.10.norm1.weight", 12) == 11 and layer_id("head.bias", 12) == 13
    optimizer = torch.optim.AdamW(groups)  # plain torch optimizers take the groups as they are
    before = model.cls_token.detach().clone()
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    optimizer.step()
    assert not torch.equal(model.cls_token, before)
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups_layer_decay(model, layer_decay=0.0)


@pytest.mark.parametrize("distilled", [False, True])
def test_reset_classifier_same_semantics_plain_and_distilled(distilled, x):
    model = tiny(distilled).eval()
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    assert (model.head_dist is not None) == distilled
    feats = model.forward_features(x)
    model.reset_classifier(0)
    pooled = model(x)
    assert pooled.shape == (2, 32)
    torch.testing.assert_close(pooled, model.forward_head(feats, pre_logits=True))
    model.reset_classifier(3, global_pool="avg")
    assert model.head_dist is None and model(x).shape == (2, 3)
    model.reset_classifier(0)
    torch.testing.assert_close(model(x), feats[:, model.num_prefix_tokens :].mean(1))
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="max")


def test_freeze_and_unfreeze(x):
    model = tiny(True)
    frozen = freeze(model)
    assert trainable_parameter_names(model) == [
        "head.weight",
        "head.bias",
        "head_dist.weight",
        "head_dist.bias",
    ]
    assert "norm.weight" in frozen and "cls_token" in frozen
    model(x).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is None and model.head.weight.grad is not None
    unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())
    freeze(model, up_to_block=2)
    trainable = trainable_parameter_names(model)
    assert (
        all(n.startswith(("blocks.2.", "norm.", "head")) for n in trainable)
        and "blocks.2.mlp.fc1.weight" in trainable
    )
    # layer-decay groups skip frozen parameters
    groups = param_groups_layer_decay(model)
    assert sorted(n for g in groups for n in g["param_names"]) == sorted(trainable)
    with pytest.raises(ValueError, match="up_to_block"):
        freeze(model, up_to_block=4)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda m: torch.compile(m),
        nn.DataParallel,  # on CPU a plain wrapper: what DistributedDataParallel does to the names
        lambda m: torch.compile(nn.DataParallel(m)),
    ],
    ids=["compiled", "data-parallel", "compiled-data-parallel"],
)
def test_freeze_and_layer_decay_see_through_compile_and_data_parallel(wrap):
    """torch.compile and (Distributed)DataParallel prefix every parameter name (``_orig_mod.``,
    ``module.``): the helpers read the DeiT's own names and return the wrapper's."""
    plain, model = tiny(True), tiny(True)
    wrapped = wrap(model)
    prefix = next(n for n, _ in wrapped.named_parameters()).removesuffix("cls_token")
    assert prefix  # the names really are prefixed
    want = param_groups_layer_decay(plain, layer_decay=0.5)
    got = param_groups_layer_decay(wrapped, layer_decay=0.5)
    assert [(g["lr_scale"], g["weight_decay"], [prefix + n for n in g["param_names"]]) for g in want] == [
        (g["lr_scale"], g["weight_decay"], g["param_names"]) for g in got
    ]
    assert freeze(wrapped, up_to_block=2) == [prefix + n for n in freeze(plain, up_to_block=2)]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable_parameter_names(plain)
    with pytest.raises(ValueError, match="up_to_block must be between 0 and 3"):
        freeze(wrapped, up_to_block=4)


def test_helpers_refuse_models_without_blocks():
    for model in (nn.Linear(3, 3), torch.compile(nn.Sequential(nn.Linear(3, 3)))):
        for helper in (freeze, param_groups_layer_decay):
            with pytest.raises(ValueError, match=r"no parameters named blocks\.\*.*expect a DeiT"):
                helper(model)


# --------------------------------------------------------------------------------------- distillation loss
def test_distillation_loss_matches_hand_computation():
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3])
    cls_out, dist_out = torch.randn(4, 4), torch.randn(4, 4)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4))
    teacher_out = teacher(images).detach()
    ce = nn.CrossEntropyLoss()
    base = F.cross_entropy(cls_out, labels)

    none = DistillationLoss(ce, None, kind="none")
    torch.testing.assert_close(none(images, (cls_out, dist_out), labels), base)
    torch.testing.assert_close(none(images, cls_out, labels), base)

    hard = DistillationLoss(ce, teacher, kind="hard", alpha=0.3)
    expected_hard = 0.7 * base + 0.3 * F.cross_entropy(dist_out, teacher_out.argmax(1))
    torch.testing.assert_close(hard(images, (cls_out, dist_out), labels), expected_hard)

    tau = 2.0
    soft = DistillationLoss(ce, teacher, kind="soft", alpha=0.5, tau=tau)
    p_teacher = torch.softmax(teacher_out / tau, dim=1)
    log_p_student = torch.log_softmax(dist_out / tau, dim=1)
    kl = (p_teacher * (p_teacher.log() - log_p_student)).sum() * tau * tau / dist_out.numel()
    torch.testing.assert_close(soft(images, (cls_out, dist_out), labels), 0.5 * base + 0.5 * kl)

    with pytest.raises(ValueError, match="set_distilled_training"):
        hard(images, cls_out, labels)
    with pytest.raises(ValueError, match="teacher"):
        DistillationLoss(ce, None, kind="soft")
    with pytest.raises(ValueError, match="kind"):
        DistillationLoss(ce, teacher, kind="medium")


def test_teacher_stays_in_eval_mode_without_gradients():
    teacher = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(3 * 32 * 32, 4))
    loss_fn = DistillationLoss(nn.CrossEntropyLoss(), teacher, kind="hard").train()
    assert not teacher.training
    student = tiny(True).train()
    student.set_distilled_training(True)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    loss_fn(images, student(images), labels).backward()
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_tiny_student_learns_from_tiny_teacher(kind):
    torch.manual_seed(0)
    teacher = DeiT(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=4)
    student = DeiT(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4, distilled=True
    )
    student.set_distilled_training(True)
    student.train()
    images = torch.randn(8, 3, 32, 32)
    labels = torch.randint(0, 4, (8,))
    criterion = DistillationLoss(nn.CrossEntropyLoss(), teacher, kind=kind, alpha=0.5, tau=2.0)
    optimizer = torch.optim.AdamW(param_groups_layer_decay(student, lr=2e-3, layer_decay=0.9))
    losses = []
    for _ in range(10):
        outputs = student(images)
        assert isinstance(outputs, tuple) and len(outputs) == 2  # the distilled pair in training
        loss = criterion(images, outputs, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    student.eval()
    assert student(images).shape == (8, 4)  # eval returns the mean of the two heads


def test_top_level_names_are_lazy():
    assert dr.DistillationLoss is DistillationLoss and dr.freeze is freeze
    assert dr.FeaturePyramid.__module__ == "deit_registry.pyramid"
    assert dr.attention_maps.__module__ == "deit_registry.inspection"
