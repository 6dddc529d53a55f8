"""timm's door: registration in either import order, the options timm.create_model passes, pretrained weights
through our loader, the evaluation transform, mistyped names and the ``timm.models`` entry-point plugin contract."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import timm.data
import torch
from weights_server import Route, WeightsServer

import deit_registry
from deit_registry import DeiT
from deit_registry.timm_adapter import UnknownTimmModelError, is_registered
from deit_registry.variants import VARIANTS

NAMES = sorted(VARIANTS)
TINY = "deit_tiny_patch16_224"


def _run(code: str, **kwargs) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
        **kwargs,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------- registration
def test_import_deit_registry_alone_imports_neither_timm_nor_torchvision() -> None:
    out = _run(
        """
        import json, sys
        import deit_registry
        deit_registry.list_models()
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("timm", "torchvision", "torch"))))
        """
    )
    assert out == []


_ORDER_CHECK = """
import json, sys, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    {imports}
    import torch
    from deit_registry import DeiT
    from deit_registry.timm_hook import TimmImportHook
    names = sorted(deit_registry.VARIANTS)
    with torch.device("meta"):  # structure only: no weight initialisation
        models = {{n: timm.create_model(n) for n in ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"]}}
        tagged = timm.create_model("deit_small_patch16_224.fb_in1k")
        deit3 = timm.create_model("deit3_small_patch16_224")
print(json.dumps(dict(
    classes=[type(m).__name__ for m in models.values()] + [type(tagged).__name__],
    ours=all(isinstance(m, DeiT) for m in [*models.values(), tagged]),
    deit3=type(deit3).__module__,
    listed=timm.list_models("deit*"),
    pretrained=timm.list_models("deit_*", pretrained=True),
    entry_modules=sorted({{timm.models.model_entrypoint(n).__module__ for n in names}}),
    in_module_deit=sorted(set(names) - set(timm.list_models(module="deit"))),
    hook_left=any(isinstance(f, TimmImportHook) for f in sys.meta_path),
    loader=type(timm.__spec__.loader).__name__,
    warnings=[str(w.message) for w in caught if "registry" in str(w.message) or "deit" in str(w.message)],
    cfg=models["deit_tiny_patch16_224"].pretrained_cfg,
)))
"""


@pytest.mark.parametrize(
    "imports",
    ["import deit_registry; import timm", "import timm; import deit_registry"],
    ids=["ours_first", "timm_first"],
)
def test_both_import_orders_replace_timms_eight_cleanly(imports: str) -> None:
    out = _run(_ORDER_CHECK.format(imports=imports))
    assert out["ours"], out["classes"]
    assert out["entry_modules"] == ["deit_registry.deit"]
    assert out["in_module_deit"] == []  # __module__-based selection (list_models(module="deit")) keeps them
    assert out["deit3"] == "timm.models.vision_transformer"  # timm's deit3_* untouched
    assert len(out["listed"]) == len(set(out["listed"]))
    assert set(NAMES) <= set(out["listed"]) and any(n.startswith("deit3_") for n in out["listed"])
    assert out["pretrained"] == sorted(f"{n}.fb_in1k" for n in NAMES)
    assert out["warnings"] == []  # no "Overwriting ... in registry"
    assert not out["hook_left"] and out["loader"] == "SourceFileLoader"
    cfg, weights = out["cfg"], VARIANTS[TINY].weights
    assert cfg["url"] == weights.url and cfg["hf_hub_id"] == weights.hf_hub_id
    assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic" and cfg["tag"] == "fb_in1k"


def test_registered_in_this_process() -> None:
    assert is_registered()
    for name in NAMES:
        cfg = timm.models.get_pretrained_cfg(f"{name}.fb_in1k")
        v = VARIANTS[name]
        assert (cfg.url, cfg.hf_hub_id, cfg.crop_pct, cfg.input_size) == (
            v.weights.url,
            v.weights.hf_hub_id,
            0.875,
            v.weights.input_size,
        )
        assert cfg.classifier == (("head", "head_dist") if v.arch.distilled else "head")


# ------------------------------------------------------------------------------------------- options
def test_model_options_pass_through() -> None:
    m = timm.create_model(
        TINY, num_classes=7, in_chans=1, img_size=160, drop_rate=0.25, drop_path_rate=0.2, global_pool="avg"
    )
    assert isinstance(m, DeiT) and m.num_classes == 7 and m.head.out_features == 7
    assert m.patch_embed.proj.in_channels == 1 and m.patch_embed.grid_size == (10, 10)
    assert m.head_drop.p == 0.25 and m.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert m.global_pool == "avg"
    assert m.eval()(torch.randn(1, 1, 160, 160)).shape == (1, 7)
    assert m.pretrained_cfg["architecture"] == TINY
    with pytest.raises(TypeError):
        timm.create_model(TINY, not_a_model_arg=1)


def test_features_only_gives_stride_16_nchw_maps() -> None:
    f = timm.create_model("deit_tiny_distilled_patch16_224", features_only=True, out_indices=(2, 5, -1))
    assert f.feature_info.channels() == [192, 192, 192] and f.feature_info.reduction() == [16, 16, 16]
    with torch.no_grad():
        outs = f(torch.randn(2, 3, 224, 224))
    assert [tuple(o.shape) for o in outs] == [(2, 192, 14, 14)] * 3
    default = timm.create_model(TINY, features_only=True)  # timm's DeiT default: the last three blocks
    assert len(default.feature_info.channels()) == 3 and "num_classes" not in default.pretrained_cfg


@pytest.mark.parametrize(("name", "resize", "crop"), [(TINY, 256, 224), ("deit_base_patch16_384", 438, 384)])
def test_data_config_is_the_official_evaluation_transform(name: str, resize: int, crop: int) -> None:
    with torch.device("meta"):
        m = timm.create_model(name)
    cfg = timm.data.resolve_data_config(model=m)
    assert (
        cfg["interpolation"] == "bicubic"
        and cfg["crop_pct"] == 0.875
        and cfg["input_size"] == (3, crop, crop)
    )
    t = timm.data.create_transform(**cfg)
    resize_t, crop_t = t.transforms[0], t.transforms[1]
    assert resize_t.size == resize and str(resize_t.interpolation.value) == "bicubic"
    assert tuple(crop_t.size) == (crop, crop)


# ---------------------------------------------------------------------------------- pretrained weights
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A random-init official-layout checkpoint named ``<name>-<sha256[:8]>.pth`` (passes the hash check)."""
    torch.manual_seed(0)
    state = deit_registry.create_model(TINY).state_dict()
    tmp = tmp_path_factory.mktemp("ckpt") / "tmp.pth"
    torch.save({"model": state}, tmp)
    path = tmp.with_name(f"{TINY}-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth")
    tmp.rename(path)
    return path, state


@pytest.fixture(scope="module")
def server():
    with pytest.MonkeyPatch.context() as mp:  # CI runs offline; this server is local
        mp.delenv("HF_HUB_OFFLINE", raising=False)
        mp.delenv("DEIT_REGISTRY_OFFLINE", raising=False)
        s = WeightsServer()
        yield s
        s.close()


def _same(model: torch.nn.Module, state: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> bool:
    got = model.state_dict()
    return all(torch.equal(got[k], v) for k, v in state.items() if not k.startswith(skip))


def test_pretrained_from_url_overlay_into_cache_dir(
    tiny_checkpoint, server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, state = tiny_checkpoint
    hub_setting = torch.hub._hub_dir
    url = server.add(f"/mirror/{path.name}", Route(path.read_bytes()))
    m = timm.create_model(
        f"{TINY}.fb_in1k", pretrained=True, pretrained_cfg_overlay=dict(url=url), cache_dir=tmp_path / "cache"
    )
    assert _same(m, state)
    assert (tmp_path / "cache" / "checkpoints" / path.name).is_file()  # timm's cache_dir is honoured
    # ... for that call only: torch.hub's setting is restored, so TORCH_HOME still moves the cache afterwards
    assert torch.hub._hub_dir == hub_setting
    if hub_setting is None:
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "elsewhere"))
        assert torch.hub.get_dir() == str(tmp_path / "elsewhere" / "hub")
    assert m.pretrained_cfg["url"] == url and m.pretrained_cfg["crop_pct"] == 0.875
    # a new head for fine-tuning: the backbone keeps the weights
    m10 = timm.create_model(
        TINY,
        pretrained=True,
        num_classes=10,
        pretrained_cfg_overlay=dict(url=url),
        cache_dir=tmp_path / "cache",
    )
    assert m10.head.out_features == 10 and _same(m10, state, skip=("head",))
    assert server.gets[f"/mirror/{path.name}"] == 1


def test_pretrained_from_local_file_overlay_and_features(tiny_checkpoint) -> None:
    path, state = tiny_checkpoint
    m = timm.create_model(TINY, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert _same(m, state)
    f = timm.create_model(
        TINY,
        pretrained=True,
        features_only=True,
        out_indices=(11,),
        pretrained_cfg_overlay=dict(file=str(path)),
    )
    assert torch.equal(f.model.blocks[11].mlp.fc2.weight, state["blocks.11.mlp.fc2.weight"])


def test_pretrained_cfg_dict_and_checkpoint_path(tiny_checkpoint) -> None:
    path, state = tiny_checkpoint
    cfg = timm.models.get_pretrained_cfg(f"{TINY}.fb_in1k").to_dict()
    cfg.update(file=str(path), crop_pct=0.95)
    m = timm.create_model(TINY, pretrained=True, pretrained_cfg=cfg)
    assert _same(m, state) and m.pretrained_cfg["crop_pct"] == 0.95
    m2 = timm.create_model(TINY, checkpoint_path=str(path))  # timm loads this after building
    assert _same(m2, state)


# --------------------------------------------------------------------------------------- mistyped names
def test_mistyped_name_lists_close_names() -> None:
    with pytest.raises(RuntimeError) as info:
        timm.create_model("deit_smal_patch16_224")
    assert isinstance(info.value, UnknownTimmModelError) and isinstance(
        info.value, deit_registry.UnknownModelError
    )
    assert "deit_small_patch16_224" in info.value.suggestions and "Did you mean" in str(info.value)
    assert "timm.list_models()" in str(info.value)
    with pytest.raises(RuntimeError, match="resnet50"):
        timm.create_model("resnet5O")  # the help covers every timm name, not only ours


# ------------------------------------------------------------------------------------ entry-point plugins
def test_register_entry_points_installs_a_third_party_model(tmp_path: Path) -> None:
    """A throw-away distribution publishing ``toy_plugin_net`` in the ``timm.models`` group."""
    (tmp_path / "toy_plugin.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def toy_plugin_net(pretrained=False, num_classes=1000, **kwargs):
                kwargs = {k: v for k, v in kwargs.items() if v is not None}
                for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
                    kwargs.pop(key, None)
                assert not kwargs, kwargs
                return nn.Linear(4, num_classes)

            toy_plugin_net.pretrained_cfg = dict(url="https://example.invalid/toy.pth", tag="toy_v1",
                                                 input_size=(3, 32, 32), num_classes=1000)
            """
        )
    )
    info = tmp_path / "toy_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[timm.models]\ntoy_plugin_net = toy_plugin:toy_plugin_net\n")
    out = _run(
        """
        import json, sys, warnings
        warnings.simplefilter("error")
        import timm, deit_registry
        before = timm.list_models("toy_*")
        installed = deit_registry.register_entry_points()
        m = timm.create_model("toy_plugin_net", num_classes=3)
        print(json.dumps(dict(
            before=before, installed=installed, out=m.out_features,
            pretrained=timm.list_models("toy_*", pretrained=True),
            module=timm.list_models(module="toy_plugin"),
            crop=m.pretrained_cfg if hasattr(m, "pretrained_cfg") else None,
            ours=type(timm.create_model("deit_tiny_patch16_224", device="meta")).__name__,
        )))
        """,
        cwd=tmp_path,
    )
    assert out["before"] == [] and out["out"] == 3
    assert "toy_plugin_net" in out["installed"] and set(NAMES) <= set(out["installed"])
    assert out["pretrained"] == ["toy_plugin_net.toy_v1"] and out["module"] == ["toy_plugin_net"]
    assert out["ours"] == "DeiT"
