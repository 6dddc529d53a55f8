"""Pretrained weights: load every published DeiT checkpoint format from every source, safely.

::

    import deit_registry as dr
    from deit_registry import weights

    model = dr.create_model("deit_base_patch16_224", pretrained=True)       # the Hub, else the official file
    model = dr.create_model("deit_base_patch16_224", pretrained=True, weights="hf-hub:timm/deit_base_patch16_224.fb_in1k")
    weights.load_checkpoint(model, "my_finetune.safetensors")                                  # in place
    weights.download("deit_small_patch16_224"); weights.is_cached("deit_small_patch16_224")    # pre-fetch
    weights.save_pretrained(model, "out/")          # model.safetensors + config.json, readable by timm
    weights.convert("checkpoint.pth", "out/")       # any supported checkpoint -> that layout

Modules: :mod:`.sources` (where weights come from, downloads and caches), :mod:`.formats` (reading files),
:mod:`.conversion` (key layouts and adapting to the model), :mod:`.loading` (the loading path),
:mod:`.saving` (save and convert). Errors derive from :class:`deit_registry.errors.WeightsError`.
"""

from __future__ import annotations

from .loading import download, load_checkpoint, load_pretrained
from .saving import convert, save_pretrained
from .sources import is_cached

__all__ = ["convert", "download", "is_cached", "load_checkpoint", "load_pretrained", "save_pretrained"]
