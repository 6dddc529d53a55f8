"""Weights sources (issue 4, points 1, 2, 9, 10): official URL through torch.hub's cache with the sha256 check,
URLs, ``hf-hub:`` ids through huggingface_hub, offline mode, and every download failure - all served from a
local HTTP server on 127.0.0.1 with caches under tmp_path."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from weights_server import Route, WeightsServer

import deit_registry as dr
from deit_registry import weights
from deit_registry.deit import build_deit
from deit_registry.errors import (
    CheckpointNotFoundError,
    DownloadError,
    HashMismatchError,
    OfflineError,
    WeightsError,
)
from deit_registry.variants import VARIANTS
from deit_registry.weights.urlfetch import RECORD_SUFFIX, cache_path

TINY = "deit_tiny_patch16_224"
HUB_REPO = "timm/deit_tiny_patch16_224.fb_in1k"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def server():
    s = WeightsServer()
    yield s
    s.close()


def _tiny(seed: int):
    torch.manual_seed(seed)
    return build_deit(TINY).eval()


@pytest.fixture(scope="module")
def reference():
    return _tiny(0)


@pytest.fixture(scope="module")
def other():
    return _tiny(1)


@pytest.fixture(scope="module")
def official_bytes(reference) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": reference.state_dict()}, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def safetensors_bytes(reference, other) -> dict[str, bytes]:
    from safetensors.torch import save

    return {
        "ref": save({k: v.contiguous() for k, v in reference.state_dict().items()}),
        "other": save({k: v.contiguous() for k, v in other.state_dict().items()}),
    }


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, server: WeightsServer) -> Path:
    """Fresh caches under tmp_path, online, the official root on our server; returns the checkpoint folder."""
    for var in ("HF_HUB_OFFLINE", "DEIT_REGISTRY_OFFLINE", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", server.root)
    monkeypatch.setenv("DEIT_REGISTRY_URL_ROOT", server.root + f"/{tmp_path.name}/")
    return tmp_path / "torch" / "hub" / "checkpoints"


def _with_real_hash(monkeypatch: pytest.MonkeyPatch, data: bytes) -> str:
    """Point the tiny variant's official file name at ``data``'s hash (a random checkpoint cannot match Meta's)."""
    v = VARIANTS[TINY]
    name = f"{TINY}-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    monkeypatch.setitem(
        VARIANTS, TINY, dataclasses.replace(v, weights=dataclasses.replace(v.weights, file_name=name))
    )
    return name


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_clean(cache: Path, name: str) -> None:
    """Nothing but lock files is left in the cache: no partial download, no corrupt file under the real name."""
    left = sorted(p.name for p in cache.rglob("*") if p.is_file()) if cache.exists() else []
    assert [n for n in left if not n.endswith(".lock")] == [], left
    assert not (cache / name).exists()


# ------------------------------------------------------------------------------------- official + URL sources
def test_official_weights_download_once_check_hash_and_load(
    env, server, monkeypatch, official_bytes, reference
):
    name = _with_real_hash(monkeypatch, official_bytes)
    path = f"/{env.parent.parent.parent.name}/{name}"
    server.add(path, Route(official_bytes))
    assert not weights.is_cached(TINY)
    model = dr.create_model(TINY, pretrained=True, progress=False)
    assert _equal(model, reference)
    assert weights.is_cached(TINY) and (env / name).read_bytes() == official_bytes
    assert server.gets[path] == 1
    again = dr.create_model(TINY, pretrained=True)  # from the cache: no second request
    assert _equal(again, reference) and server.gets[path] == 1
    assert weights.download(TINY) == env / name
    # sorted: directory order is the filesystem's
    assert sorted(p.name for p in env.iterdir() if not p.name.endswith(".lock")) == [
        name,
        name + RECORD_SUFFIX,
    ]


def test_url_source_checks_hash_in_its_name(env, server, official_bytes, reference):
    name = f"{TINY}-{hashlib.sha256(official_bytes).hexdigest()[:8]}.pth"
    url = server.add(f"/url/{name}", Route(official_bytes))
    model = dr.create_model(TINY, pretrained=True, weights=url, progress=False)
    assert _equal(model, reference) and cache_path(url) == env / name


def test_hash_mismatch_deletes_download(env, server, monkeypatch, official_bytes, other):
    name = VARIANTS[TINY].weights.file_name  # the real a1311bcf name, with other content
    server.add(f"/{env.parent.parent.parent.name}/{name}", Route(official_bytes))
    with pytest.raises(HashMismatchError) as e:
        dr.create_model(TINY, pretrained=True, progress=False)
    msg = str(e.value)
    assert name in msg and "a1311bcf" in msg and "Try again" in msg
    _assert_clean(env, name)
    # load_checkpoint on an existing model: nothing changes
    before = _snapshot(other)
    with pytest.raises(HashMismatchError):
        weights.load_checkpoint(other, server.url(f"/{env.parent.parent.parent.name}/{name}"), progress=False)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


@pytest.mark.parametrize("status", [404, 500])
def test_http_error(env, server, status, other):
    name = f"{TINY}-deadbeef.pth"
    url = server.add(f"/err{status}/{name}", Route(b"error page", status=status))
    before = _snapshot(other)
    with pytest.raises(DownloadError) as e:
        weights.load_checkpoint(other, url, progress=False)
    msg = str(e.value)
    assert name in msg and f"HTTP {status}" in msg and "weights=PATH" in msg
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    _assert_clean(env, name)


def test_connection_dropped_mid_download(env, server, official_bytes, other):
    name = f"{TINY}-{hashlib.sha256(official_bytes).hexdigest()[:8]}.pth"
    url = server.add(f"/drop/{name}", Route(official_bytes, drop_after=len(official_bytes) // 3))
    before = _snapshot(other)
    with pytest.raises(DownloadError) as e:
        weights.load_checkpoint(other, url, progress=False)
    msg = str(e.value)
    assert name in msg and "dropped" in msg and "try again" in msg
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    _assert_clean(env, name)


def test_unreachable_server(env, monkeypatch, other):
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    name = f"{TINY}-deadbeef.pth"
    with pytest.raises(DownloadError) as e:
        weights.load_checkpoint(other, f"http://127.0.0.1:{port}/{name}", progress=False)
    assert name in str(e.value) and "network" in str(e.value)
    _assert_clean(env, name)


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "DEIT_REGISTRY_OFFLINE"])
def test_offline_with_nothing_cached(env, server, monkeypatch, var):
    monkeypatch.setenv(var, "1")
    name = VARIANTS[TINY].weights.file_name
    requests = sum(server.gets.values())
    with pytest.raises(OfflineError) as e:
        dr.create_model(TINY, pretrained=True)
    msg = str(e.value)
    assert name in msg and "offline" in msg and "Unset offline mode" in msg
    assert sum(server.gets.values()) == requests  # not even tried
    _assert_clean(env, name)


def test_offline_uses_the_cache(env, monkeypatch, official_bytes, reference):
    name = _with_real_hash(monkeypatch, official_bytes)
    env.mkdir(parents=True)
    (env / name).write_bytes(official_bytes)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights.is_cached(TINY)
    assert _equal(dr.create_model(TINY, pretrained=True), reference)


def test_missing_local_path_names_the_fix(env):
    with pytest.raises(CheckpointNotFoundError) as e:
        dr.create_model(TINY, pretrained=True, weights="/nonexistent/deit.pth")
    assert "/nonexistent/deit.pth" in str(e.value) and "hf-hub:" in str(e.value)
    assert isinstance(e.value, WeightsError) and isinstance(e.value, FileNotFoundError)


def test_two_processes_download_once(env, server, monkeypatch, tmp_path, official_bytes):
    """Both processes wait at a barrier, then ask at once; the file lock makes the second reuse the first's."""
    name = f"{TINY}-{hashlib.sha256(official_bytes).hexdigest()[:8]}.pth"
    path = f"/twice/{name}"
    url = server.add(path, Route(official_bytes, delay_s=1.5))
    go = tmp_path / "go"
    code = textwrap.dedent(
        f"""
        import json, os, sys, time
        from deit_registry.weights import download
        open(sys.argv[1], "w").close()
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        start = time.time()
        path = download("{TINY}", {url!r}, progress=False)
        print(json.dumps(dict(start=start, end=time.time(), path=str(path))))
        """
    )
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for r in ready
    ]
    deadline = time.time() + 120
    while not all(r.exists() for r in ready) and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert max(r["start"] for r in results) < min(r["end"] for r in results)  # they overlapped
    assert {r["path"] for r in results} == {str(cache_path(url))}
    assert server.gets[path] == 1
    assert cache_path(url).read_bytes() == official_bytes


# ---------------------------------------------------------------------------------------- Hugging Face Hub
def test_hf_hub_cache_revision_pinning_and_offline(
    env, server, monkeypatch, safetensors_bytes, reference, other
):
    server.add_hub_file(HUB_REPO, "main", COMMIT_A, "model.safetensors", safetensors_bytes["ref"])
    server.add_hub_file(HUB_REPO, "v2", COMMIT_B, "model.safetensors", safetensors_bytes["other"])
    path_a = f"/{HUB_REPO}/resolve/main/model.safetensors"
    model = dr.create_model(TINY, pretrained=True, weights=f"hf-hub:{HUB_REPO}")
    assert _equal(model, reference) and server.gets[path_a] == 1
    assert any(
        (env.parent.parent.parent / "hf" / "hub").glob(
            "models--timm--deit_tiny*/snapshots/*/model.safetensors"
        )
    )
    pinned = dr.create_model(TINY, pretrained=True, weights=f"hf-hub:{HUB_REPO}@v2", progress=False)
    assert _equal(pinned, other)
    # offline: served from huggingface_hub's cache, no request
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gets = sum(server.gets.values())
    assert _equal(dr.create_model(TINY, pretrained=True, weights=f"hf-hub:{HUB_REPO}@v2"), other)
    assert sum(server.gets.values()) == gets
    with pytest.raises(OfflineError) as e:
        dr.create_model(TINY, pretrained=True, weights="hf-hub:timm/not_cached_repo")
    assert "hf-hub:timm/not_cached_repo" in str(e.value) and "Unset offline mode" in str(e.value)


def test_hf_hub_config_layer_norm_eps_is_honoured(env, server, reference):
    """A repository whose config.json says layer_norm_eps (transformers: 1e-12) builds the model with it."""
    from safetensors.torch import save

    sd = reference.state_dict()
    repo = "facebook/deit-tiny-patch16-224"
    server.add_hub_file(
        repo, "main", COMMIT_A, "model.safetensors", save({k: v.contiguous() for k, v in sd.items()})
    )
    server.add_hub_file(repo, "main", COMMIT_A, "config.json", json.dumps({"layer_norm_eps": 1e-12}).encode())
    model = dr.create_model(TINY, pretrained=True, weights=f"hf-hub:{repo}", progress=False)
    assert model.norm_eps == 1e-12 and model.norm.eps == 1e-12 and model.blocks[0].norm1.eps == 1e-12
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    explicit = dr.create_model(TINY, pretrained=True, weights=f"hf-hub:{repo}", norm_eps=1e-6)
    assert explicit.norm.eps == 1e-6


def test_hf_hub_missing_repo_file(env, server):
    with pytest.raises(WeightsError) as e:
        dr.create_model(TINY, pretrained=True, weights="hf-hub:timm/empty_repo", progress=False)
    assert "hf-hub:timm/empty_repo" in str(e.value)


def test_env_offline_is_read_at_call_time(monkeypatch):
    from deit_registry.weights.sources import is_offline

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("DEIT_REGISTRY_OFFLINE", "0")
    assert not is_offline()
    monkeypatch.setenv("DEIT_REGISTRY_OFFLINE", "true")
    assert is_offline()
