"""torch.hub entry points: the eight DeiT models of deit-registry.

::

    import torch
    model = torch.hub.load("<owner>/deit-registry", "deit_small_patch16_224", pretrained=True)
    model = torch.hub.load("/path/to/checkout", "deit_tiny_patch16_224", source="local", num_classes=10)
    torch.hub.list("<owner>/deit-registry")          # the eight names
    print(torch.hub.help("<owner>/deit-registry", "deit_base_patch16_384"))

Needs only torch: the package ``deit_registry`` is imported from this checkout (torch.hub puts the repository
on ``sys.path``) or from an installed copy. Every entry takes the options of ``deit_registry.create_model``.
"""

import deit_registry.hub as _hub

dependencies = ["torch"]

_OPTIONS = """

    Args:
        pretrained: load the official ImageNet-1k weights (downloaded once, sha256-checked, cached in
            torch.hub's checkpoint folder).
        weights: with ``pretrained=True``, another checkpoint: a local .pth/.bin/.safetensors file or folder,
            an http(s) URL, or ``"hf-hub:owner/repo"``.
        num_classes: classes of the new classifier (the pretrained head is dropped when it differs); 0 gives
            pooled features.
        img_size: input size, an int or ``(H, W)`` (the position embedding is resampled).
        in_chans: input channels (pretrained patch-embedding weights are adapted).
        global_pool: ``"token"`` (class token), ``"avg"`` (mean of patch tokens) or ``""`` (all tokens).
        head: ``"classifier"``, ``"distilled"``, ``"none"``, ``"mim"``, a registered head name or a module.
        drop_rate, drop_path_rate: classifier dropout and stochastic depth for fine-tuning.
        dynamic_img_size: accept any input size (the position embedding is resampled on the fly).

    Returns:
        ``deit_registry.DeiT``, an ``nn.Module`` in training mode (call ``.eval()`` for inference).
    """


def deit_tiny_patch16_224(pretrained=False, **kwargs):
    """DeiT-Ti, 224x224: 5.7M parameters, 1.3 GMACs, 72.2% ImageNet top-1."""
    return _hub.build("deit_tiny_patch16_224", pretrained, **kwargs)


def deit_small_patch16_224(pretrained=False, **kwargs):
    """DeiT-S, 224x224: 22.1M parameters, 4.6 GMACs, 79.9% ImageNet top-1."""
    return _hub.build("deit_small_patch16_224", pretrained, **kwargs)


def deit_base_patch16_224(pretrained=False, **kwargs):
    """DeiT-B, 224x224: 86.6M parameters, 17.6 GMACs, 81.8% ImageNet top-1."""
    return _hub.build("deit_base_patch16_224", pretrained, **kwargs)


def deit_base_patch16_384(pretrained=False, **kwargs):
    """DeiT-B, 384x384 (fine-tuned at 384): 86.9M parameters, 55.5 GMACs, 82.9% ImageNet top-1."""
    return _hub.build("deit_base_patch16_384", pretrained, **kwargs)


def deit_tiny_distilled_patch16_224(pretrained=False, **kwargs):
    """DeiT-Ti distilled (class + distillation token, logits = mean of both heads), 224x224: 5.9M
    parameters, 74.5% ImageNet top-1."""
    return _hub.build("deit_tiny_distilled_patch16_224", pretrained, **kwargs)


def deit_small_distilled_patch16_224(pretrained=False, **kwargs):
    """DeiT-S distilled (class + distillation token, logits = mean of both heads), 224x224: 22.4M
    parameters, 81.2% ImageNet top-1."""
    return _hub.build("deit_small_distilled_patch16_224", pretrained, **kwargs)


def deit_base_distilled_patch16_224(pretrained=False, **kwargs):
    """DeiT-B distilled (class + distillation token, logits = mean of both heads), 224x224: 87.3M
    parameters, 83.4% ImageNet top-1."""
    return _hub.build("deit_base_distilled_patch16_224", pretrained, **kwargs)


def deit_base_distilled_patch16_384(pretrained=False, **kwargs):
    """DeiT-B distilled (class + distillation token, logits = mean of both heads), 384x384: 87.6M
    parameters, 85.2% ImageNet top-1."""
    return _hub.build("deit_base_distilled_patch16_384", pretrained, **kwargs)


for _entry in (
    deit_tiny_patch16_224,
    deit_small_patch16_224,
    deit_base_patch16_224,
    deit_base_patch16_384,
    deit_tiny_distilled_patch16_224,
    deit_small_distilled_patch16_224,
    deit_base_distilled_patch16_224,
    deit_base_distilled_patch16_384,
):
    _entry.__doc__ += _OPTIONS  # the options are the same for all eight; torch.hub.help shows the whole text
del _entry

# A mistyped entry name gets the close names instead of torch.hub's bare "Cannot find callable".
_hub.suggest_close_entries(globals())
