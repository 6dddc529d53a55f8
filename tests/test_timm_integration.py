"""timm's door: registration in either import order, the options timm.create_model passes, pretrained weights
through our loader, the evaluation transform, mistyped names and the ``timm.models`` entry-point plugin contract."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import timm
import timm.data
import torch
from weights_server import Route, WeightsServer

import deit_registry
from deit_registry import DeiT, timm_adapter
from deit_registry.timm_adapter import is_registered
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


def test_registered_through_timms_public_registry() -> None:
    """Our entries (timm_adapter's) and our cfgs, once each, next to timm's deit3_*; listed by module."""
    names = timm.list_models("deit*")
    assert (
        len(names) == len(set(names))
        and set(NAMES) <= set(names)
        and any(n.startswith("deit3_") for n in names)
    )
    assert {timm.models.model_entrypoint(n).__module__ for n in NAMES} == {"deit_registry.timm_adapter"}
    assert sorted(timm.list_models(module="timm_adapter")) == NAMES
    assert timm.list_models("deit_*", pretrained=True) == sorted(f"{n}.fb_in1k" for n in NAMES)
    assert timm_adapter.default_cfgs[TINY].tags[0] == "fb_in1k"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # registering again is silent (and a no-op)
        assert deit_registry.register_with_timm() == list(timm_adapter.ENTRIES)
        assert timm_adapter.is_registered()


def test_reregistering_over_timms_own_entries_filters_only_our_overwrite_warning() -> None:
    import importlib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        importlib.reload(timm.models.deit)  # timm's own deit_* entries are back
    assert not is_registered() and type(timm.create_model(TINY, device="meta")).__name__ != "DeiT"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # timm's "Overwriting ... in registry" for our names must not escape
        deit_registry.register_with_timm()
    assert is_registered() and isinstance(timm.create_model(TINY, device="meta"), DeiT)
    assert timm.models.get_pretrained_cfg(TINY).crop_pct == 0.875


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
        ours = deit_registry.create_model(name)  # every door's model carries the cfg, as timm's do
    cfg = timm.data.resolve_data_config(model=m)
    assert (
        cfg["interpolation"] == "bicubic"
        and cfg["crop_pct"] == 0.875
        and cfg["input_size"] == (3, crop, crop)
    )
    assert timm.data.resolve_model_data_config(ours) == timm.data.resolve_model_data_config(m)
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


def test_pretrained_from_url_overlay_into_cache_dir(tiny_checkpoint, server, tmp_path: Path) -> None:
    path, state = tiny_checkpoint
    hub_dir, hf_cache = torch.hub.get_dir(), os.environ.get("HF_HUB_CACHE")
    url = server.add(f"/mirror/{path.name}", Route(path.read_bytes()))
    m = timm.create_model(
        f"{TINY}.fb_in1k", pretrained=True, pretrained_cfg_overlay=dict(url=url), cache_dir=tmp_path / "cache"
    )
    assert _same(m, state)
    assert (tmp_path / "cache" / "checkpoints" / path.name).is_file()  # timm's cache_dir is honoured
    # ... for that call only: torch.hub's folder and HF_HUB_CACHE are as they were
    assert torch.hub.get_dir() == hub_dir and os.environ.get("HF_HUB_CACHE") == hf_cache
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


def test_cache_dir_pins_nothing_afterwards(tiny_checkpoint, server, tmp_path: Path, monkeypatch) -> None:
    """cache_dir= is that call's alone: a later TORCH_HOME still decides where torch.hub's cache is."""
    path, _ = tiny_checkpoint
    url = server.add(f"/pins/{path.name}", Route(path.read_bytes()))
    timm.create_model(TINY, pretrained=True, pretrained_cfg_overlay=dict(url=url), cache_dir=tmp_path / "a")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "b"))
    assert torch.hub.get_dir() == str(tmp_path / "b" / "hub")
    deit_registry.create_model(TINY, pretrained=True, weights=url)
    assert (tmp_path / "b" / "hub" / "checkpoints" / path.name).is_file()


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
def test_mistyped_name_is_timms_own_error() -> None:
    with pytest.raises(RuntimeError, match="Unknown model") as info:
        timm.create_model("deit_smal_patch16_224")
    assert not isinstance(info.value, deit_registry.UnknownModelError)  # timm's message stands, unpatched
    with pytest.raises(deit_registry.UnknownModelError, match="deit_small_patch16_224"):
        deit_registry.create_model("deit_smal_patch16_224")  # ours keeps its close names


# ------------------------------------------------------------------------------------ entry-point plugins
def test_register_entry_points_installs_a_third_party_model(tmp_path: Path) -> None:
    """Throw-away distributions publishing in the ``timm.models`` group: one with a timm-style module
    ``default_cfgs`` (its cfg is registered), one with only a ``pretrained_cfg`` attribute (not read: timm's
    public register_model reads module cfgs only), one whose name timm already has (kept as timm's)."""
    (tmp_path / "toy_plugin.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            default_cfgs = {"toy_plugin_net": dict(url="https://example.invalid/toy.pth", input_size=(3, 32, 32))}

            def toy_plugin_net(pretrained=False, num_classes=1000, **kwargs):
                kwargs = {k: v for k, v in kwargs.items() if v is not None}
                for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
                    kwargs.pop(key, None)
                assert not kwargs, kwargs
                return nn.Linear(4, num_classes)

            def toy_attr_net(pretrained=False, **kwargs):
                return nn.Identity()

            toy_attr_net.pretrained_cfg = dict(url="https://example.invalid/attr.pth")

            def resnet18(pretrained=False, **kwargs):
                return nn.Identity()
            """
        )
    )
    info = tmp_path / "toy_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[timm.models]\ntoy_plugin_net = toy_plugin:toy_plugin_net\ntoy_attr_net = toy_plugin:toy_attr_net\n"
        "resnet18 = toy_plugin:resnet18\n"
    )
    out = _run(
        """
        import json, sys, warnings
        warnings.simplefilter("error")
        import timm, deit_registry
        before = timm.list_models("toy_*")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            installed = deit_registry.register_entry_points()
        m = timm.create_model("toy_plugin_net", num_classes=3)
        print(json.dumps(dict(
            before=before, installed=installed, out=m.out_features,
            said=[str(w.message) for w in caught],
            pretrained=timm.list_models("toy_*", pretrained=True),
            module=timm.list_models(module="toy_plugin"),
            cfg_url=timm.models.get_pretrained_cfg("toy_plugin_net").url,
            resnet=type(timm.create_model("resnet18", pretrained=False)).__name__,
            ours=type(timm.create_model("deit_tiny_patch16_224", device="meta")).__name__,
        )))
        """,
        cwd=tmp_path,
    )
    assert out["before"] == [] and out["out"] == 3
    assert {"toy_plugin_net", "toy_attr_net"} <= set(out["installed"]) and set(NAMES) <= set(out["installed"])
    assert "resnet18" not in out["installed"] and out["resnet"] == "ResNet"
    assert len(out["said"]) == 1 and "resnet18" in out["said"][0] and "replace=True" in out["said"][0]
    assert out["pretrained"] == ["toy_plugin_net"] and out["cfg_url"] == "https://example.invalid/toy.pth"
    assert out["module"] == ["toy_attr_net", "toy_plugin_net"]
    assert out["ours"] == "DeiT"


# ---------------------------------------------------------------------------------- timm's own keywords
def test_timm_vit_keywords_that_keep_a_deit_work() -> None:
    import functools

    from torch import nn

    m = timm.create_model(
        TINY,
        act_layer="gelu",
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
        weight_init="",
        fix_init=False,
        class_token=True,
        reg_tokens=0,
        no_embed_class=False,
        init_values=None,
        qk_norm=False,
        pre_norm=False,
        fc_norm=False,
        pos_embed="learn",
        patch_drop_rate=0.0,
        qkv_bias=True,
        proj_bias=True,
        block_fn=timm.models.vision_transformer.Block,
        mlp_layer=timm.layers.Mlp,
        embed_layer=timm.layers.PatchEmbed,
        depth=2,
    )
    assert isinstance(m, DeiT) and m.norm.eps == 1e-6 and len(m.blocks) == 2
    assert timm.create_model(TINY, norm_layer=nn.LayerNorm, depth=1).norm.eps == 1e-5  # torch's default eps
    assert timm.create_model(TINY, act_layer=nn.GELU, depth=1).blocks[0].mlp.act.approximate == "none"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("reg_tokens", 4),
        ("class_token", False),
        ("init_values", 1e-5),
        ("qk_norm", True),
        ("no_embed_class", True),
        ("patch_drop_rate", 0.5),
        ("weight_init", "jax"),
        ("fix_init", True),
        ("pre_norm", True),
        ("fc_norm", True),
        ("pos_embed", "none"),
        ("proj_bias", False),
        ("act_layer", "relu"),
        ("norm_layer", "rmsnorm"),
        ("block_fn", torch.nn.Identity),
    ],
)
def test_timm_vit_keywords_that_change_the_model_name_the_reason(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key):
        timm.create_model(TINY, **{key: value})
    with pytest.raises(ValueError, match=key):
        deit_registry.create_model(TINY, **{key: value})


def test_set_fused_attn_is_honoured() -> None:
    fused = timm.layers.use_fused_attn()
    try:
        timm.layers.set_fused_attn(False)
        m = timm.create_model(TINY, depth=2)
        assert [b.attn.fused_attn for b in m.blocks] == [False, False]
        timm.layers.set_fused_attn(True)
        assert all(b.attn.fused_attn for b in timm.create_model(TINY, depth=2).blocks)
    finally:
        timm.layers.set_fused_attn(fused)


# --------------------------------------------------------------------------- what the weights layer is asked
def test_pretrained_sources_passed_to_the_weights_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our own cfg asks for ``source=None`` (the weights layer's default order); an overlay goes through as is."""
    import deit_registry.weights

    asked = []

    def load_pretrained(variant, options, source=None, **kwargs):
        asked.append((variant.name, source))
        return DeiT(**{**variant.model_kwargs(), **options})

    monkeypatch.setattr(deit_registry.weights, "load_pretrained", load_pretrained)
    with torch.device("meta"):
        timm.create_model(TINY, pretrained=True)
        timm.create_model(f"{TINY}.fb_in1k", pretrained=True, features_only=True)
        timm.create_model(TINY, pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id="someone/deit-ft"))
        timm.create_model(TINY, pretrained=True, pretrained_cfg_overlay=dict(url="http://127.0.0.1:9/x.pth"))
        deit_registry.create_model(TINY, pretrained=True)
    assert asked == [
        (TINY, None),
        (TINY, None),
        (TINY, "hf-hub:someone/deit-ft"),
        (TINY, "http://127.0.0.1:9/x.pth"),
        (TINY, None),
    ]
