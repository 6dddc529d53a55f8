"""torch.hub entry points: the eight DeiT models of deit-registry (torch only).

::

    import torch
    model = torch.hub.load("<owner>/deit-registry", "deit_small_patch16_224", pretrained=True)
    model = torch.hub.load("/path/to/checkout", "deit_tiny_patch16_224", source="local", num_classes=10)
    torch.hub.list("<owner>/deit-registry")          # the eight names
    print(torch.hub.help("<owner>/deit-registry", "deit_base_patch16_384"))

The package ``deit_registry`` is imported from this checkout (torch.hub puts the repository on ``sys.path``) or
from an installed copy. Every entry takes the options of ``deit_registry.create_model``.
"""

from deit_registry.deit import (
    deit_base_distilled_patch16_224,
    deit_base_distilled_patch16_384,
    deit_base_patch16_224,
    deit_base_patch16_384,
    deit_small_distilled_patch16_224,
    deit_small_patch16_224,
    deit_tiny_distilled_patch16_224,
    deit_tiny_patch16_224,
)

dependencies = ["torch"]

__all__ = [
    "deit_base_distilled_patch16_224",
    "deit_base_distilled_patch16_384",
    "deit_base_patch16_224",
    "deit_base_patch16_384",
    "deit_small_distilled_patch16_224",
    "deit_small_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "deit_tiny_patch16_224",
]
