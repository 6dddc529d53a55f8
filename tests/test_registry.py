"""Registry API and entry-point discovery, including third-party and broken distributions."""

import subprocess
import sys
import textwrap
import warnings
from importlib import metadata
from pathlib import Path

import pytest

import deit_registry as dr
from deit_registry import registry
from deit_registry.variants import VARIANTS


def test_entry_points_are_published() -> None:
    eps = {ep.name: ep for ep in metadata.entry_points(group="timm.models")}
    for name in VARIANTS:
        assert eps[name].value == f"deit_registry.deit:{name}"
        assert eps[name].dist.name == "deit-registry"


def test_list_is_and_create() -> None:
    assert set(VARIANTS) <= set(dr.list_models())
    assert dr.list_models("deit_*distilled*") == sorted(n for n in VARIANTS if "distilled" in n)
    assert dr.list_models(["deit_tiny*", "*_384"]) == sorted(
        [
            "deit_tiny_patch16_224",
            "deit_tiny_distilled_patch16_224",
            "deit_base_patch16_384",
            "deit_base_distilled_patch16_384",
        ]
    )
    assert dr.list_models("deit_base*", exclude_filters="*distilled*") == [
        "deit_base_patch16_224",
        "deit_base_patch16_384",
    ]
    assert "deit_small_patch16_224.fb_in1k" in dr.list_models(pretrained=True, include_tags=True)
    assert dr.is_model("deit_small_patch16_224") and dr.is_model("deit_small_patch16_224.fb_in1k")
    assert not dr.is_model("deit_small_patch16_224.in21k") and not dr.is_model("resnet50")
    model = dr.create_model("deit_tiny_distilled_patch16_224.fb_in1k", num_classes=3)
    assert isinstance(model, dr.DeiT) and model.num_classes == 3
    assert dr.get_pretrained_cfg("deit_tiny_patch16_224.fb_in1k") is VARIANTS["deit_tiny_patch16_224"]


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(dr.UnknownModelError) as info:
        dr.create_model("deit_smal_distiled_patch16_224")
    message = str(info.value)
    assert "deit_small_distilled_patch16_224" in message and "list_models" in message
    assert info.value.suggestions[0] == "deit_small_distilled_patch16_224"
    assert isinstance(info.value, ValueError) and isinstance(info.value, dr.DeiTRegistryError)
    with pytest.raises(dr.UnknownModelError, match="deit_tiny_patch16_224.fb_in1k"):
        dr.create_model("deit_tiny_patch16_224.in22k")
    with pytest.raises(dr.UnknownModelError, match="deit_base_patch16_384"):
        dr.get_pretrained_cfg("base_patch16_384")


def test_get_variant_is_the_one_resolver() -> None:
    v = VARIANTS["deit_small_patch16_224"]
    assert dr.get_variant(v) is v
    assert dr.get_variant("deit_small_patch16_224") is dr.get_variant("deit_small_patch16_224.fb_in1k") is v
    with pytest.raises(dr.UnknownModelError, match="deit_small_patch16_224.fb_in1k"):
        dr.get_variant("deit_small_patch16_224.in22k")
    with pytest.raises(dr.UnknownModelError) as info:
        dr.get_variant("deit_smal_patch16_224")
    assert info.value.suggestions[0] == "deit_small_patch16_224"


@pytest.mark.parametrize(
    "option",
    [
        {"features_only": True},
        {"pretrained_cfg": {}},
        {"pretrained_cfg_overlay": {"file": "x.pth"}},
        {"cache_dir": "/tmp"},
        {"out_indices": (1,)},
    ],
)
def test_timm_factory_options_point_to_timm_create_model(option: dict) -> None:
    with pytest.raises(ValueError, match=r"timm\.create_model\('deit_tiny_patch16_224'"):
        dr.create_model("deit_tiny_patch16_224", **option)


def test_constructor_options_are_checked_before_anything_is_read(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here.pth"  # never opened: the bad option is refused first
    with pytest.raises(TypeError, match="not_an_option"):
        dr.create_model("deit_tiny_patch16_224", pretrained=True, weights=missing, not_an_option=1)
    with pytest.raises(ValueError, match="reg_tokens"):
        dr.create_model("deit_tiny_patch16_224", pretrained=True, weights=missing, reg_tokens=4)
    with pytest.raises(ValueError, match="pretrained=True"):
        dr.create_model("deit_tiny_patch16_224", weights=missing)


def test_device_and_dtype() -> None:
    import torch

    m = dr.create_model("deit_tiny_patch16_224", depth=1, device="meta", dtype=torch.bfloat16)
    assert {p.device.type for p in m.parameters()} == {"meta"} and {p.dtype for p in m.parameters()} == {
        torch.bfloat16
    }


def test_register_model_decorator() -> None:
    @dr.register_model(pretrained_cfg={"url": "file:///weights.pth"})
    def my_toy_deit(pretrained: bool = False, **kwargs):
        return dr.DeiT(embed_dim=16, depth=1, num_heads=1, **kwargs)

    assert "my_toy_deit" in dr.list_models("my_toy*", pretrained=True)
    assert dr.create_model("my_toy_deit", num_classes=2).num_classes == 2
    assert dr.get_pretrained_cfg("my_toy_deit") == {"url": "file:///weights.pth"}


def _throwaway_distribution(root: Path) -> None:
    """Two installed-looking distributions: one publishes a working model, one a broken one."""
    (root / "goodzoo.py").write_text(
        textwrap.dedent(
            """
            import deit_registry

            def good_deit(pretrained=False, **kwargs):
                return deit_registry.DeiT(embed_dim=16, depth=1, num_heads=1, **kwargs)
            """
        )
    )
    (root / "brokenzoo.py").write_text("raise ImportError('brokenzoo needs libfoo, which is missing')\n")
    for dist, module, fn in (("goodzoo", "goodzoo", "good_deit"), ("brokenzoo", "brokenzoo", "broken_deit")):
        info = root / f"{dist}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[timm.models]\n{fn} = {module}:{fn}\n")


def test_third_party_and_broken_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _throwaway_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh_entry_points()
    try:
        names = dr.list_models()
        assert {"good_deit", "broken_deit"} <= set(names) and set(VARIANTS) <= set(names)
        assert "goodzoo" not in sys.modules and "brokenzoo" not in sys.modules  # listing imports nothing

        assert dr.create_model("good_deit", num_classes=5).num_classes == 5
        with pytest.raises(dr.ModelImportError, match=r"'broken_deit'.*brokenzoo 1\.0.*libfoo"):
            dr.create_model("broken_deit")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = dr.load_entry_points()
        assert "good_deit" in loaded and "broken_deit" not in loaded and set(VARIANTS) <= set(loaded)
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1 and "broken_deit" in messages[0] and "brokenzoo" in messages[0]
    finally:
        monkeypatch.undo()
        registry.refresh_entry_points()


def test_listing_imports_no_model_code() -> None:
    code = (
        "import sys, deit_registry as dr; names = dr.list_models(pretrained=True); "
        "assert len(names) >= 8, names; "
        "print(sorted(m for m in ('torch', 'timm', 'torchvision', 'deit_registry.architecture') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
